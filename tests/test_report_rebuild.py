"""python -m server.report rebuilds every file a run writes: delete them all, rebuild, byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from common.datasets import federation_train_set
from common.models import build_model
from common.scenario import load_scenario, save_resolved
from server.store.artifacts import save_model_artifact, save_safe_artifact
from server.federation.collect import pool_subset
from server.pipeline import run_pipeline
from server.sweep.inputs import PipelineInputs
from server.report import main as report_main
from server.federation.validate import FailureLog

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# Written by the run and rebuilt by server.reports.tables (artifacts, cells, manifest, timings are the inputs).
REBUILT = ["results.md", "results.csv", "results_long.csv", "rounds.csv", "rounds.png", "uploads.csv", "uploads.json",
           "failures.csv", "communication.csv", "communication.md", "privacy.md", "privacy_audit.csv",
           "frequency.csv", "images/safe_pool.png", "figures/accuracy_vs_pipc.png"]


def _tiny_run(run_dir: Path) -> Path:
    overrides = {
        "output_dir": str(run_dir), "device": "cpu", "data.train_limit": 400, "data.test_limit": 100,
        "model.width": 8, "federation.num_clients": 2, "federation.min_clients": 1,
        "distill.methods": ["dm", "dkkt_dm", "random_real"], "distill.ipc": [1], "distill.pipc": [3],
        "distill.iterations": 2, "evaluation.epochs": 1, "evaluation.num_models": 1,
        "privacy.audit_reference": 20,
    }
    s = load_scenario("scenarios/quickstart.yaml", overrides=overrides)
    save_resolved(s, run_dir)
    data = federation_train_set(s)
    meta = data.meta
    arch = {"width": 8, "depth": 3, "norm": "instancenorm", "activation": "relu", "pooling": "avgpooling"}
    model = build_model(meta, arch, seed=0)
    # phase 1-2 records as the federation stores them in the artifacts (server.store.manifest.load_history)
    rounds = [{"round": 0, "test_acc": 0.1, "test_loss": 2.3}, {"round": 1, "test_acc": 0.42, "test_loss": 1.7}]
    weight_uploads = [{"partition_id": p, "node_id": 10 + p, "round": 1, "bytes": 12345, "shard_bytes": 156800}
                      for p in range(2)]
    order = torch.argsort(data.train_y, stable=True)
    pool_x, pool_y = pool_subset(data.train_x[order], data.train_y[order], 3, meta.num_classes)
    indices = order[torch.cat([torch.nonzero(data.train_y[order] == c).flatten()[:3] for c in range(10)])]
    safe_uploads = [{"partition_id": p, "node_id": 10 + p, "request": 1, "images": 15, "bytes": 11760,
                     "shard_bytes": 156800} for p in range(2)]
    failures = [{"phase": "evaluate", "round": 1, "node_id": 11, "partition_id": 1, "reason": "timeout after 600 s"}]
    save_model_artifact(run_dir / "global_model.pt", model.state_dict(), arch, meta.name,
                        extra={"rounds": rounds, "weight_uploads": weight_uploads})
    save_safe_artifact(run_dir / "safe_pool.pt", pool_x, pool_y, meta.name,
                       extra={"indices": indices.tolist(), "pipc": 3, "uploads": safe_uploads, "failures": failures})
    run_pipeline(PipelineInputs(scenario=s, meta=meta, model_state=model.state_dict(), pool_x=pool_x, pool_y=pool_y,
                                test_x=data.test_x, test_y=data.test_y, run_dir=run_dir, device=torch.device("cpu"),
                                rounds=rounds, weight_uploads=weight_uploads, safe_uploads=safe_uploads),
                 progress=False)
    FailureLog(rows=failures).write(run_dir)  # as server.run does after the pipeline
    return run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_report_rebuilds_every_run_file_byte_identical(tmp_path: Path) -> None:
    run_dir = _tiny_run(tmp_path / "run")
    derived = sorted(p for p in run_dir.rglob("*") if p.is_file() and (
        p.relative_to(run_dir).as_posix() in REBUILT or p.suffix == ".png" or p.parent.name == "traces"))
    names = {p.relative_to(run_dir).as_posix() for p in derived}
    assert set(REBUILT) <= names, set(REBUILT) - names
    assert {"privacy/closest_safe_pool.png", "privacy/closest_dkkt_dm_ipc1_pipc3_seed0.png",
            "images/dm_ipc1_pipc3_seed0.png"} <= names
    assert any(n.startswith("traces/") and n.endswith(".csv") for n in names)  # DKKT loss-term traces
    assert "## Client failures" in (run_dir / "results.md").read_text()
    before = {p: _digest(p) for p in derived}
    for p in derived:
        p.unlink()

    assert report_main([str(run_dir)]) == 0
    missing = [p.relative_to(run_dir).as_posix() for p in derived if not p.is_file()]
    assert not missing, f"not rebuilt: {missing}"
    changed = [p.relative_to(run_dir).as_posix() for p in derived if _digest(p) != before[p]]
    assert not changed, f"rebuilt differently: {changed}"


def test_report_on_a_folder_that_is_not_a_run_fails_with_a_message(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(tmp_path)]) == 1
    assert "scenario.resolved.yaml not found" in capsys.readouterr().err
