"""Tests for server/store/artifacts.py, server/reports/images.py and the offline CLI (python -m server.distill)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.datasets import DatasetError, get_meta, load_dataset
from common.models import build_model
from server.store.artifacts import (
    ArtifactError,
    build_model_from_artifact,
    load_model_artifact,
    load_safe_artifact,
    load_synthetic_artifact,
    save_model_artifact,
    save_safe_artifact,
    save_synthetic_artifact,
)
from common.distill import SyntheticSet
from server.distill.__main__ import main
from server.reports.images import save_image_grid




FM = get_meta("fashion-mnist")
ARCH = {"width": 8, "depth": 2}


def _safe(per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(per_class)
    return torch.randint(0, 256, (len(y), 1, 28, 28), generator=g, dtype=torch.uint8), y


def test_model_artifact_roundtrip_and_mismatch(tmp_path: Path) -> None:
    model = build_model(FM, ARCH, seed=0)
    p = save_model_artifact(tmp_path / "m.pt", model, ARCH, "fashion-mnist")
    art = load_model_artifact(p, dataset="fashion-mnist")
    rebuilt = build_model_from_artifact(art, FM)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    with pytest.raises(ArtifactError, match=r"m\.pt is for dataset 'fashion-mnist', but 'cifar10'"):
        load_model_artifact(p, dataset="cifar10")
    wrong = load_model_artifact(p)
    wrong.arch = {"width": 16, "depth": 2}
    with pytest.raises(ArtifactError, match=r"m\.pt: weights do not fit arch"):
        build_model_from_artifact(wrong, FM)
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match=r"bad\.pt lacks key\(s\) \['arch', 'dataset'\]"):
        load_model_artifact(tmp_path / "bad.pt")


def test_safe_and_synthetic_artifacts(tmp_path: Path) -> None:
    x, y = _safe()
    p = save_safe_artifact(tmp_path / "s.pt", x, y, "fashion-mnist", extra={"clients": 3})
    s = load_safe_artifact(p, meta=FM)
    assert torch.equal(s.x, x) and torch.equal(s.y, y) and s.extra == {"clients": 3}
    torch.save({"x": x.float(), "y": y, "dataset": "fashion-mnist"}, tmp_path / "f.pt")
    with pytest.raises(ArtifactError, match=r"f\.pt: 'x' must have dtype torch.uint8"):
        load_safe_artifact(tmp_path / "f.pt", meta=FM)
    torch.save({"x": x[:, :, :20], "y": y, "dataset": "fashion-mnist"}, tmp_path / "shape.pt")
    with pytest.raises(ArtifactError, match=r"shape\.pt: images are \(1, 20, 28\)"):
        load_safe_artifact(tmp_path / "shape.pt", meta=FM)
    syn = SyntheticSet(x=torch.randn(10, 1, 28, 28), y=torch.arange(10), method="dm", ipc=1,
                       info={"loss_history": [{"total": 1.0}], "path": tmp_path})
    q = save_synthetic_artifact(tmp_path / "syn.pt", syn, "fashion-mnist", pipc=3)
    back = load_synthetic_artifact(q, meta=FM)
    assert torch.equal(back.x, syn.x) and back.method == "dm" and back.pipc == 3
    assert back.info["path"] == str(tmp_path)


def test_image_grid_png(tmp_path: Path) -> None:
    x = torch.randn(6, 1, 28, 28)
    y = torch.tensor([0, 0, 3, 3, 3, 9])
    p1 = save_image_grid(x, y, tmp_path / "a.png", FM)
    p2 = save_image_grid(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 2]), tmp_path / "b.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    model = build_model(FM, ARCH, seed=0)
    m = save_model_artifact(tmp_path / "model.pt", model, ARCH, "fashion-mnist")
    s = save_safe_artifact(tmp_path / "safe.pt", *_safe(3), dataset="fashion-mnist")
    return m, s


def test_cli_distills_writes_files_and_appends_results(tmp_path: Path) -> None:
    m, s = _write_inputs(tmp_path)
    out = tmp_path / "out"
    base = ["--model", str(m), "--safe", str(s), "--dataset", "fashion-mnist", "--ipc", "1",
            "--pipc", "2", "--iterations", "2", "--eval-epochs", "0", "--out", str(out),
            "--device", "cpu", "--real-batch", "4", "--no-progress", "--init-seed", "0"]
    assert main(base + ["--method", "dkkt_dm"]) == 0
    assert main(base + ["--method", "random_real"]) == 0
    assert (out / "synthetic_dkkt_dm_ipc1_pipc2.pt").is_file()
    assert (out / "synthetic_dkkt_dm_ipc1_pipc2.png").is_file()
    syn = load_synthetic_artifact(out / "synthetic_dkkt_dm_ipc1_pipc2.pt", meta=FM)
    assert syn.x.shape == (10, 1, 28, 28) and syn.y.tolist() == list(range(10))
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dkkt_dm", "random_real"]
    assert rows[0]["alpha"] == 0.1 and rows[0]["iterations_done"] == 2
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("timestamp,dataset,method")
    # blend from the DSVs of an earlier run
    assert main(base + ["--method", "dsv"]) == 0
    assert main(base + ["--method", "blend", "--dsv", str(out / "synthetic_dsv_ipc1_pipc2.pt")]) == 0
    # the stationarity target theta* - theta_0 needs theta_0's seed: without it, a clear error
    no_seed = base[:-2]  # base ends with "--init-seed", "0"
    assert no_seed[-1] == "--no-progress"
    assert main(no_seed + ["--method", "dkkt_dm"]) == 2


def test_cli_prints_progress_off_a_terminal(tmp_path: Path) -> None:
    """Piped (no terminal), server.distill logs a progress line every FEDPDD_PROGRESS_EVERY_S seconds before
    its result line, instead of nothing until the end."""
    import os
    import subprocess
    import sys

    m, s = _write_inputs(tmp_path)
    cmd = [sys.executable, "-m", "server.distill", "--model", str(m), "--safe", str(s), "--dataset", "fashion-mnist",
           "--ipc", "1", "--pipc", "2", "--iterations", "40", "--eval-epochs", "0", "--out", str(tmp_path / "o"),
           "--device", "cpu", "--real-batch", "4", "--method", "dm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "FEDPDD_PROGRESS_EVERY_S": "0"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "dm ipc=1: 40/40" in out and "ETA" in out, out[-2000:]


def test_cli_rejects_bad_files_with_their_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m, s = _write_inputs(tmp_path)
    args = ["--method", "dm", "--dataset", "cifar10", "--ipc", "1", "--iterations", "1",
            "--eval-epochs", "0", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert main(args + ["--model", str(m), "--safe", str(s)]) == 2
    assert "model.pt is for dataset 'fashion-mnist'" in capsys.readouterr().err
    assert main(args + ["--safe", str(s)]) == 2
    assert "safe.pt is for dataset 'fashion-mnist'" in capsys.readouterr().err
    assert main(["--method", "dsv", "--dataset", "fashion-mnist", "--ipc", "1", "--out",
                 str(tmp_path / "o"), "--eval-epochs", "0", "--device", "cpu", "--no-progress"]) == 2
    assert "needs the trained model" in capsys.readouterr().err


def _have_fashion_mnist() -> bool:
    try:
        load_dataset("fashion-mnist")
        return True
    except DatasetError:
        return False


@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST files not found on this machine")
def test_cli_with_evaluation(tmp_path: Path) -> None:
    m, s = _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = main(["--model", str(m), "--safe", str(s), "--dataset", "fashion-mnist", "--method", "dm",
               "--ipc", "1", "--iterations", "2", "--eval-epochs", "2", "--num-models", "2",
               "--test-limit", "200", "--out", str(out), "--device", "cpu", "--real-batch", "4",
               "--no-progress"])
    assert rc == 0
    row = json.loads((out / "results.json").read_text())[-1]
    assert len(row["accuracies"]) == 2 and all(0 <= a <= 1 for a in row["accuracies"])
    assert row["pipc"] == 3  # default: everything in SAFE.pt
