"""Artifact integrity (server/store/manifest.py) and a NaN planted in one distillation cell.

The kill-and-restart run through Flower is in tests/test_reliability_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from common.datasets import get_meta
from common.models import build_model
from common.scenario import scenario_from_dict
from server.store.artifacts import save_model_artifact, save_safe_artifact
from server.store.manifest import ManifestError, fingerprint, read_manifest, record_files, verify_files


def _artifacts(run_dir: Path) -> None:
    meta = get_meta("fashion-mnist")
    save_model_artifact(run_dir / "global_model.pt", build_model(meta, {"width": 8}, seed=0), {"width": 8},
                        meta.name, extra={"rounds": [{"round": 0, "test_acc": 0.1}]})
    x = torch.randint(0, 255, (20, 1, 28, 28), dtype=torch.uint8)
    save_safe_artifact(run_dir / "safe_pool.pt", x, torch.arange(20) % 10, meta.name, extra={"uploads": []})


def test_manifest_records_and_detects_changes(tmp_path: Path) -> None:
    _artifacts(tmp_path)
    s = scenario_from_dict({"model": {"width": 8}})
    record_files(tmp_path, ["global_model.pt", "safe_pool.pt"], fingerprint(s))
    man = read_manifest(tmp_path)
    assert man["fingerprint"] == fingerprint(s)
    entry = man["files"]["safe_pool.pt"]
    assert entry["tensors"]["x"] == [[20, 1, 28, 28], "uint8"] and len(entry["sha256"]) == 64
    verify_files(tmp_path, ["global_model.pt", "safe_pool.pt"])  # untouched: fine
    blob = (tmp_path / "safe_pool.pt").read_bytes()
    (tmp_path / "safe_pool.pt").write_bytes(blob[: len(blob) // 2])  # a truncated copy
    with pytest.raises(ManifestError, match="safe_pool.pt"):
        verify_files(tmp_path, ["global_model.pt", "safe_pool.pt"])
    (tmp_path / "global_model.pt").unlink()
    with pytest.raises(ManifestError, match="global_model.pt.*missing"):
        verify_files(tmp_path, ["global_model.pt"])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json"):
        verify_files(tmp_path, ["global_model.pt"])


def test_fingerprint_covers_federation_not_distillation() -> None:
    base = scenario_from_dict({})
    assert fingerprint(base) == fingerprint(scenario_from_dict({"distill": {"iterations": 5}, "name": "other"}))
    assert fingerprint(base) != fingerprint(scenario_from_dict({"federation": {"rounds": 3}}))
    assert fingerprint(base) != fingerprint(scenario_from_dict({"seed": 1}))
    assert fingerprint(base) != fingerprint(scenario_from_dict({"faults": {"clients": [0]}}))


def test_nan_in_one_cell_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """theta* with a NaN: the DKKT cell fails at once (its S checkpointed), dm and random_real go on."""
    from server.pipeline import run_grid
    from server.sweep.inputs import PipelineInputs

    meta = get_meta("fashion-mnist")
    s = scenario_from_dict({"name": "nan", "device": "cpu", "output_dir": str(tmp_path), "model": {"width": 8},
                            "distill": {"methods": ["dkkt_dm", "dm", "random_real"], "ipc": [1], "pipc": [2],
                                        "iterations": 3, "real_batch": 4},
                            "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 32}})
    state = build_model(meta, dataclasses.asdict(s.model), seed=0).state_dict()
    key = [k for k in state if k.endswith("weight")][-1]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")  # planted numerical fault
    g = torch.Generator().manual_seed(0)
    inp = PipelineInputs(
        scenario=s, meta=meta, model_state=state,
        pool_x=torch.randint(0, 255, (20, 1, 28, 28), dtype=torch.uint8, generator=g), pool_y=torch.arange(20) % 10,
        test_x=torch.randint(0, 255, (30, 1, 28, 28), dtype=torch.uint8, generator=g), test_y=torch.arange(30) % 10,
        run_dir=tmp_path, device=torch.device("cpu"))
    cells = run_grid(inp, progress=False)
    by = {c.method: c for c in cells}
    assert set(by) == {"dkkt_dm", "dm", "random_real"}, "the sweep must go on after the failed cell"
    assert by["dkkt_dm"].skipped.startswith("failed:") and "non-finite" in by["dkkt_dm"].skipped
    for m in ("dm", "random_real"):
        assert not by[m].skipped and 0.0 <= by[m].mean <= 1.0
    rec = json.loads(next((tmp_path / "cells").glob("dkkt_dm_*.json")).read_text())
    assert rec["failed"]["error"] == "DistillationError"
    ckpt = rec["failed"]["checkpoint"]
    assert ckpt and Path(ckpt).is_file(), "the last good S must be kept"
    saved = torch.load(ckpt, weights_only=True)
    assert torch.isfinite(saved["x"]).all() and saved["error"]
