"""python -m server.reevaluate on a finished run folder (conftest's tiny_dkkt_run): the recorded protocol
reproduces the recorded accuracies (same sets, same seeds, same split), another protocol scores the same
sets, the run folder is only read, and bad input is one line with exit status 2."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from server.reevaluate import main


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(out: Path) -> dict[str, dict]:
    with (out / "reevaluation.csv").open() as fh:
        return {f"{r['method']}_seed{r['seed']}": r for r in csv.DictReader(fh)}


def test_the_recorded_protocol_gives_the_recorded_accuracies(tiny_dkkt_run: Path, tmp_path: Path) -> None:
    before = _tree(tiny_dkkt_run)
    assert main([str(tiny_dkkt_run), "--out", str(tmp_path / "same"), "--device", "cpu"]) == 0
    rows = _rows(tmp_path / "same")
    assert set(rows) == {"dm_seed0", "dkkt_dm_seed0"}
    for name, row in rows.items():
        rec = json.loads((tiny_dkkt_run / "cells" / f"{name.replace('_seed', '_ipc1_pipc3_seed')}.json").read_text())
        assert [float(a) for a in row["new_accuracies"].split()] == pytest.approx(rec["result"]["accuracies"], abs=1e-6)
    assert _tree(tiny_dkkt_run) == before  # read only


def test_another_protocol_and_architecture_score_the_same_sets(tiny_dkkt_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sam"
    assert main([str(tiny_dkkt_run), "--out", str(out), "--device", "cpu", "--cells", "method=dkkt_dm",
                 "--set", "evaluation.optimizer=sam", "--set", "evaluation.epochs=2",
                 "--set", "evaluation.num_models=2", "--set", "evaluation.width=16"]) == 0
    rows = _rows(out)
    assert list(rows) == ["dkkt_dm_seed0"]
    accs = [float(a) for a in rows["dkkt_dm_seed0"]["new_accuracies"].split()]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    md = (out / "reevaluation.md").read_text()
    assert "New protocol: sam lr 0.1 rho 0.001, 2 epochs, 2 models, ConvNet width 16 depth 2" in md
    assert "| 1 | 3 | dkkt_dm | 1 |" in md


@pytest.mark.parametrize("args, message", [
    (["--set", "distill.alpha=1"], "only evaluation.* keys"),
    (["--set", "evaluation.optimizer=adagrad"], "evaluation.optimizer"),
    (["--set", "evaluation.epochs"], "expected KEY=VALUE"),
    (["--cells", "method=dsv"], "no finished cell"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dkkt_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          args: list[str], message: str) -> None:
    assert main([str(tiny_dkkt_run), "--out", str(tmp_path / "o"), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o" / "reevaluation.md").exists()


def test_out_inside_the_run_folder_is_refused(tiny_dkkt_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tiny_dkkt_run), "--out", str(tiny_dkkt_run / "x"), "--device", "cpu"]) == 2
    assert "only read" in capsys.readouterr().err
    assert not (tiny_dkkt_run / "x").exists()
