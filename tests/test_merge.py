"""Shards that merge: a grid run whole equals the same grid run as two shards (distill.shard /
distill.cells) merged with ``python -m server.merge``; folders that do not belong together, and a
cell that differs between two folders, are refused with one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import server.merge
import server.reports.figures
from common.grid import select_cells
from common.scenario import ScenarioError, save_resolved, scenario_from_dict
from server.merge import main as merge_main
from server.pipeline import run_pipeline
from server.sweep.cells import cell_specs
from tests.test_sweep import _inputs, _tables_only

GRID = {"methods": ["dm", "dsv", "blend", "random_real"], "ipc": [1, 2], "pipc": [3], "seeds": [0, 1]}


def _run(tmp_path: Path, folder: str, **part) -> Path:
    inp = _inputs(tmp_path, {**GRID, **part}, name=folder)
    inp.scenario.name = "study"  # one study, several folders
    save_resolved(inp.scenario, inp.run_dir)
    run_pipeline(inp, progress=False)
    return inp.run_dir


@pytest.fixture
def no_figures(monkeypatch):
    _tables_only(monkeypatch)
    monkeypatch.setattr(server.merge, "rebuild_report",
                        lambda run_dir, **kw: server.reports.figures.rebuild_report(run_dir, figures=False))


def test_shards_cover_the_grid_once_and_keep_dsv_groups_together():
    s = scenario_from_dict({"distill": GRID})
    specs = cell_specs(s)
    shards = [select_cells(specs, s.distill.methods, None, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(c.name for sh in shards for c in sh) == sorted(c.name for c in specs)  # every cell exactly once
    for sh in shards:  # blend reuses its group's dsv set: both in the same shard
        groups = {(c.pipc, c.ipc, c.seed) for c in sh}
        assert len(sh) == 4 * len(groups)
    only = select_cells(specs, s.distill.methods, "method=blend; ipc=2", None)
    assert {c.method for c in only} == set(GRID["methods"]) and {c.ipc for c in only} == {2}  # the group comes along
    plain = scenario_from_dict({"distill": {**GRID, "methods": ["dm", "random_real"]}})
    half = select_cells(cell_specs(plain), plain.distill.methods, None, "2/2")
    assert [c.name for c in half] == [c.name for c in cell_specs(plain)][1::2]  # unlinked: one cell per unit
    with pytest.raises(ScenarioError, match=r"distill\.cells.*ipc 5 is not in the grid"):
        scenario_from_dict({"distill": {**GRID, "cells": "ipc=5"}})
    with pytest.raises(ScenarioError, match=r"distill\.shard.*k/N"):
        scenario_from_dict({"distill": {**GRID, "shard": "3/2"}})


def test_two_shards_merged_equal_the_whole_run(tmp_path, no_figures, capsys):
    whole = _run(tmp_path, "whole")
    a = _run(tmp_path, "a", shard="1/2")
    b = _run(tmp_path, "b", cells="seed=1")  # the other half, named by a filter instead
    assert len(list((a / "cells").glob("*.json"))) == 8 and len(list((b / "cells").glob("*.json"))) == 8
    out = tmp_path / "merged"
    assert merge_main([str(a), str(b), "--out", str(out)]) == 0
    for f in ("results.md", "results.csv"):
        assert (out / f).read_bytes() == (whole / f).read_bytes(), f

    # a cell that differs between two folders: refused, one line, exit 2
    rec_path = b / "cells" / "dm_ipc1_pipc3_seed1.json"
    tampered = tmp_path / "tampered"
    assert merge_main([str(a), str(b), str(whole), "--out", str(tmp_path / "m2")]) == 0  # overlapping, equal cells
    rec = json.loads(rec_path.read_text())
    rec["result"]["accuracies"] = [0.5, 0.5]
    rec["result"]["mean"], rec["result"]["std"] = 0.5, 0.0
    rec_path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert merge_main([str(whole), str(b), "--out", str(tampered)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dm_ipc1_pipc3_seed1.json" in err and "manifest" in err, err
    from server.store.manifest import record_files  # recorded, so only the cross-folder check can catch it

    record_files(b, ["cells/dm_ipc1_pipc3_seed1.json"])
    assert merge_main([str(whole), str(b), "--out", str(tampered)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cell dm_ipc1_pipc3_seed1 differs" in err and "accuracies" in err, err

    # another study (other evaluation) and another federation: refused by name
    other = _inputs(tmp_path, {**GRID, "shard": "2/2"}, name="other")
    other.scenario.name = "study"
    other.scenario.evaluation.epochs = 3
    save_resolved(other.scenario, other.run_dir)
    assert merge_main([str(a), str(other.run_dir), "--out", str(tmp_path / "m3")]) == 2
    assert "evaluation.epochs" in capsys.readouterr().err
    other.scenario.evaluation.epochs = 1
    other.scenario.federation.rounds = 7
    save_resolved(other.scenario, other.run_dir)
    assert merge_main([str(a), str(other.run_dir), "--out", str(tmp_path / "m4")]) == 2
    err = capsys.readouterr().err
    assert "another federation" in err and "federation.rounds" in err, err
