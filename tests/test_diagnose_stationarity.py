"""python -m server.diagnose_stationarity on a finished run folder (conftest's tiny_dkkt_run: theta* is one
GD step from the scenario-seeded theta_0 on the whole training view, so the real data meet the condition
at theta_0 exactly: a wrongly rebuilt theta_0 or gradients taken anywhere else would not give cos = 1)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from server.diagnose_stationarity import main


def _rows(out: Path) -> dict[tuple[str, str, str], float]:
    with (out / "stationarity.csv").open() as fh:
        return {(r["set"], r["weights"], r["at"]): float(r["cos"]) for r in csv.DictReader(fh)}


def test_real_data_meet_the_condition_at_theta0_and_not_at_theta_star(tiny_dkkt_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "diag"
    assert main([str(tiny_dkkt_run), "--samples", "1000", "--path-points", "3", "--nnls-samples", "20",
                 "--out", str(out), "--device", "cpu"]) == 0
    by = _rows(out)
    assert by[("real (train)", "uniform", "0.00")] == pytest.approx(1.0, abs=1e-4)
    assert by[("real (train)", "uniform", "1.00")] < by[("real (train)", "uniform", "0.00")]
    assert 0 < by[("real (train)", "nnls", "0.00")] <= 1 + 1e-6  # NNLS over 20 of the 400 images
    cell = "dkkt_dm_ipc1_pipc3_seed0"
    assert {w for (s, w, _) in by if s == cell} == {"uniform", "lambda", "nnls"}
    assert not any(s.startswith("dm_") for (s, _, _) in by)  # dm has no multipliers / model terms
    md = (out / "stationarity.md").read_text()
    assert "| images | lambda | n | t = 0.00 | t = 0.50 | t = 1.00 | path mean |" in md
    ratio = float(md.split("(ratio ")[1].split(";")[0])
    assert 0 < ratio < 1  # theta_0 rebuilt from the right seed: the update is small against theta*


def test_every_dkkt_cell_trace_has_its_diagnostic(tiny_dkkt_run: Path) -> None:
    text = (tiny_dkkt_run / "traces" / "dkkt_dm_ipc1_pipc3_seed0_stationarity.md").read_text()
    assert "| safe | uniform | 30 |" in text and "| synthetic | lambda | 10 |" in text
    assert not (tiny_dkkt_run / "traces" / "dm_ipc1_pipc3_seed0_stationarity.md").exists()


def test_not_a_run_folder_and_a_tampered_model_exit_2_with_one_line(tiny_dkkt_run: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--no-cells"]) == 2
    err = capsys.readouterr().err
    assert "scenario.resolved.yaml not found" in err and err.count("\n") == 1
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dkkt_run, copy)
    with (copy / "global_model.pt").open("ab") as fh:
        fh.write(b"x")
    assert main([str(copy), "--no-cells", "--samples", "10"]) == 2
    err = capsys.readouterr().err
    assert "global_model.pt does not match" in err and err.count("\n") == 1
    assert main([str(copy), "--path-points", "0"]) == 2
    assert "--path-points must be >= 1" in capsys.readouterr().err
