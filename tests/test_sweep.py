"""Sweeps on tiny data, without Flower: table shape, resume after an interrupt, nested pools,
skipped cells, byte-identical report rebuild, compare, and the scenario-key reference."""

from __future__ import annotations

import csv
import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import server.sweep.cell_pool as cell_pool
import server.sweep.cells as sweep
from common.datasets import get_meta
from common.models import build_model
from common.scenario import ScenarioError, save_resolved, scenario_from_dict
from server.federation.collect import pool_subset
from server.pipeline import run_pipeline
from server.sweep.inputs import PipelineInputs

META = get_meta("fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
_REAL_SYNTH = cell_pool.synthesize  # the original, before any test wraps it


def _inputs(tmp_path: Path, distill: dict, name: str = "sw", pool_per_class: int = 6) -> PipelineInputs:
    values = {"name": name, "seed": 1, "device": "cpu", "output_dir": str(tmp_path / name),
              "model": {"width": 8}, "distill": {"iterations": 2, "real_batch": 4, "workers": 1, **distill},  # in process: spies see the calls
              "evaluation": {"epochs": 1, "num_models": 2, "batch_size": 32},
              "privacy": {"audit": False}}  # the audit has its own tests; keep these fast
    s = scenario_from_dict(values)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(pool_per_class)
    pool_x = torch.randint(0, 256, (len(y), 1, 28, 28), generator=g, dtype=torch.uint8)
    test_y = torch.arange(10).repeat(3)
    test_x = torch.randint(0, 256, (len(test_y), 1, 28, 28), generator=g, dtype=torch.uint8)
    state = OrderedDict(build_model(META, {"width": 8}, seed=0).state_dict())
    save_resolved(s, s.run_dir)
    return PipelineInputs(scenario=s, meta=META, model_state=state, pool_x=pool_x, pool_y=y, test_x=test_x,
                          test_y=test_y, run_dir=s.run_dir, device=torch.device("cpu"))


class SimulatedInterrupt(RuntimeError):
    """Stands for a killed process: raised inside a cell, after the earlier cells were recorded."""


def _tables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the PNGs (matplotlib dominates these tests' time); test_2x2 covers the figures."""
    import server.reports.figures
    import server.pipeline

    monkeypatch.setattr(server.pipeline, "rebuild_report",
                        lambda run_dir, **kw: server.reports.figures.rebuild_report(run_dir, figures=False))


def _count_synth(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None) -> list[str]:
    calls: list[str] = []
    real = _REAL_SYNTH

    def counting(method: str, **kw):  # type: ignore[no-untyped-def]
        name = f"{method}_ipc{kw['ipc']}_seed{kw['seed']}"
        if fail_on is not None and name == fail_on:
            raise SimulatedInterrupt(name)
        calls.append(name)
        return real(method, **kw)

    monkeypatch.setattr(cell_pool, "synthesize", counting)
    return calls


def test_2x2_sweep_table_shape_and_rebuild_identical(tmp_path, monkeypatch):
    inp = _inputs(tmp_path, {"methods": ["dm", "random_real"], "ipc": [1, 2], "pipc": [3, 6]})
    calls = _count_synth(monkeypatch)
    run_pipeline(inp, progress=False)
    assert len(calls) == 8
    run = inp.run_dir
    with (run / "results.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ipc", "pipc", "dm", "random_real"]
    assert [r[:2] for r in rows[1:]] == [["1", "3"], ["1", "6"], ["2", "3"], ["2", "6"]]
    assert all("±" in v for r in rows[1:] for v in r[2:])
    md = (run / "results.md").read_bytes()
    assert len(list((run / "cells").glob("*.json"))) == 8
    for f in ("figures/accuracy_vs_pipc.png", "images/dm_ipc1_pipc3_seed1.png", "frequency.csv"):
        assert (run / f).is_file(), f
    (run / "results.md").unlink()
    from server.report import main as report_main  # the `python -m server.report RUN_DIR` entry point

    assert report_main([str(run)]) == 0
    assert (run / "results.md").read_bytes() == md


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    distill = {"methods": ["dm", "dsv", "blend"], "ipc": [1], "pipc": [4], "seeds": [1, 2]}
    inp = _inputs(tmp_path, distill)
    _tables_only(monkeypatch)
    _count_synth(monkeypatch, fail_on="blend_ipc1_seed2")
    with pytest.raises(SimulatedInterrupt):
        run_pipeline(inp, progress=False)
    done = sorted(p.stem for p in (inp.run_dir / "cells").glob("*.json"))
    assert len(done) == 5  # all of seed 1 and dm, dsv of seed 2
    calls = _count_synth(monkeypatch)
    cells = run_pipeline(_inputs(tmp_path, distill), progress=False)
    assert calls == ["blend_ipc1_seed2"]  # blend reads the stored DSVs of seed 2 back
    assert len(cells) == 6
    md = (inp.run_dir / "results.md").read_text()
    assert "2 distillation seeds" in md
    # A changed evaluation config invalidates the records: everything is recomputed (and logged).
    calls = _count_synth(monkeypatch)
    inp2 = _inputs(tmp_path, distill)
    inp2.scenario.evaluation.epochs = 2
    run_pipeline(inp2, progress=False)
    assert len(calls) == 6


def test_nested_pools_and_skipped_cells(tmp_path, monkeypatch):
    inp = _inputs(tmp_path, {"methods": ["dsv", "dm", "random_real"], "ipc": [1, 3], "pipc": [0, 2, "all"]})
    assert inp.scenario.distill.pipc == [0, 2, -1]
    small_x, small_y = pool_subset(inp.pool_x, inp.pool_y, 2, 10)
    big_x, big_y = pool_subset(inp.pool_x, inp.pool_y, 5, 10)
    for c in range(10):  # the first pipc images per class of the larger pool are the smaller pool
        assert torch.equal(small_x[small_y == c], big_x[big_y == c][:2])
    _tables_only(monkeypatch)
    seen = []
    real = _REAL_SYNTH

    def spy(method, **kw):  # type: ignore[no-untyped-def]
        seen.append((method, kw["pipc"], None if kw["safe_x"] is None else kw["safe_x"].shape[0]))
        return real(method, **kw)

    monkeypatch.setattr(cell_pool, "synthesize", spy)
    cells = run_pipeline(inp, progress=False)
    skipped = {(c.method, c.ipc, c.pipc) for c in cells if c.skipped}
    assert skipped == {("dm", 1, 0), ("dm", 3, 0), ("random_real", 1, 0), ("random_real", 3, 0),
                       ("random_real", 3, 2)}
    assert ("dm", 6, 60) in seen  # pipc 'all' = the whole pool, synthesize sees its real size
    md = (inp.run_dir / "results.md").read_text()
    assert "| 1 | all |" in md and "n/a" in md and "pipc is 0" in md


def test_federated_phases_resume_only_with_same_settings(tmp_path):
    s = scenario_from_dict({"name": "fr", "output_dir": str(tmp_path / "fr")})
    s.run_dir.mkdir(parents=True)
    assert not sweep.resumable_federation(s)  # nothing there yet
    for f in ("global_model.pt", "safe_pool.pt"):
        (s.run_dir / f).write_bytes(b"x")
    sweep.write_federation_stamp(s)
    assert sweep.resumable_federation(s)
    same_grid_change = scenario_from_dict({"name": "fr", "output_dir": str(tmp_path / "fr"),
                                           "distill": {"ipc": [1, 3]}, "evaluation": {"epochs": 7}})
    assert sweep.resumable_federation(same_grid_change)  # the grid does not touch theta* / T'
    other = scenario_from_dict({"name": "fr", "output_dir": str(tmp_path / "fr"), "federation": {"rounds": 5}})
    assert not sweep.resumable_federation(other)
    bigger_pool = scenario_from_dict({"name": "fr", "output_dir": str(tmp_path / "fr"), "distill": {"pipc": [50]}})
    assert not sweep.resumable_federation(bigger_pool)


def test_method_without_runnable_cell_is_rejected():
    with pytest.raises(ScenarioError, match="no cell of method 'dm'"):
        scenario_from_dict({"distill": {"methods": ["dm"], "pipc": [0]}})
    s = scenario_from_dict({"distill": {"methods": ["dsv", "dm"], "pipc": [0, 10]}})
    assert s.pool_pipc == 10
    with pytest.raises(ScenarioError, match="distill.pipc\\[1\\]"):
        scenario_from_dict({"distill": {"pipc": [10, "most"]}})


def test_compare_two_runs(tmp_path, monkeypatch):
    _tables_only(monkeypatch)
    a = _inputs(tmp_path, {"methods": ["random_real"], "ipc": [1], "pipc": [3]}, name="ra")
    run_pipeline(a, progress=False)
    b = _inputs(tmp_path, {"methods": ["random_real"], "ipc": [1], "pipc": [3], "iterations": 3}, name="rb")
    run_pipeline(b, progress=False)
    from server.compare import main as compare_main  # `python -m server.compare A B --out DIR`

    assert compare_main([str(a.run_dir), str(b.run_dir), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "distill.iterations" in md and "| ra |" in md and "| rb |" in md
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["ra", "rb"] and rows[1]["distill.iterations"] == "3"


def test_compare_a_dp_noise_sweep_plots_accuracy_against_epsilon(tmp_path, monkeypatch):
    """Two runs that differ only in privacy.dp.noise_multiplier: compare.png's x axis is the epsilon each
    noise buys (Flower's accountant), not the noise."""
    pytest.importorskip("dp_accounting")
    import dataclasses

    import server.compare as compare
    from server.federation.dp import dp_summary

    _tables_only(monkeypatch)
    runs = []
    for name, noise in (("n1", 1.0), ("n2", 2.0)):
        inp = _inputs(tmp_path, {"methods": ["random_real"], "ipc": [1], "pipc": [3]}, name=name)
        dp = dataclasses.replace(inp.scenario.privacy.dp, enabled=True, noise_multiplier=noise)
        s = dataclasses.replace(inp.scenario, privacy=dataclasses.replace(inp.scenario.privacy, dp=dp),
                                federation=dataclasses.replace(inp.scenario.federation, num_clients=4))
        save_resolved(s, s.run_dir)
        run_pipeline(dataclasses.replace(inp, scenario=s), progress=False)
        runs.append(s)
    seen = {}
    monkeypatch.setattr(compare, "_plot_sweep", lambda key, xs, *a: seen.update(key=key, xs=xs) or tmp_path / "x.png")
    paths = compare.compare_runs([s.run_dir for s in runs], tmp_path / "cmp")
    assert "png" in paths and seen["key"].startswith("epsilon at delta = 1e-05")
    expected = [dp_summary(s, 4, s.federation.rounds)["epsilon"] for s in runs]
    assert seen["xs"] == pytest.approx(expected) and expected[0] > expected[1] > 0  # more noise, smaller epsilon


def test_readme_key_reference_matches_dataclasses():
    sys.path.insert(0, str(ROOT / "scenarios"))
    try:
        import schema_doc
    finally:
        sys.path.pop(0)
    readme = (ROOT / "scenarios" / "README.md").read_text()
    assert schema_doc.reference_markdown() in readme, "run: python scenarios/schema_doc.py --write"


def test_scenario_catalogue_loads():
    from common.scenario import load_scenario

    names = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))
    for required in ("paper-table1.yaml", "fmnist-table1.yaml", "pipc-sweep.yaml", "non-iid.yaml", "clients-sweep.yaml"):
        assert required in names
    for n in names:
        s = load_scenario(ROOT / "scenarios" / n)
        json.dumps(s.to_dict())
    t1 = load_scenario(ROOT / "scenarios" / "paper-table1.yaml")
    assert t1.distill.ipc == [1, 3, 10, 50] and t1.distill.pipc == [10, 50, -1] and t1.evaluation.epochs == 5000


def test_cells_in_two_worker_processes_match_one_process(tmp_path, monkeypatch):
    """distill.workers 2: the cells run in spawned processes (the in-process spy sees no call), their
    log lines reach this process, and every result and synthetic set equals the one-process run."""
    import logging

    from server.store.artifacts import load_synthetic_artifact
    from server.pipeline import run_grid

    grid = {"methods": ["dm", "dkkt_dm", "random_real"], "ipc": [1], "pipc": [3], "seeds": [0, 1]}
    runs = {}
    for workers in (1, 2):
        inp = _inputs(tmp_path, {**grid, "workers": workers}, name=f"w{workers}")
        calls = _count_synth(monkeypatch)
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("flwr").addHandler(handler)
        try:
            cells = run_grid(inp, progress=False)
        finally:
            logging.getLogger("flwr").removeHandler(handler)
        assert len(calls) == (6 if workers == 1 else 0)  # every cell here; none in this process with 2 workers
        assert sum("distill + evaluate ..." in line for line in lines) == 6, lines  # also from the workers
        runs[workers] = {(c.method, c.seed): (c.accuracies,
                                              load_synthetic_artifact(c.files["synthetic"], dataset=META.name).x)
                         for c in cells}
    assert runs[1].keys() == runs[2].keys() and len(runs[1]) == 6
    for key, (acc, x) in runs[1].items():
        assert runs[2][key][0] == acc, key
        assert torch.equal(runs[2][key][1], x), key


def test_resolve_workers_defaults():
    from server.sweep.cell_pool import resolve_workers

    assert resolve_workers(0, torch.device("cuda"), 9) == 1  # one process drives the GPU
    assert resolve_workers(3, torch.device("cpu"), 9) == 3
    assert resolve_workers(8, torch.device("cpu"), 2) == 2  # never more processes than chains
    assert resolve_workers(0, torch.device("cpu"), 1) == 1


def test_sweep_progress_line_counts_cells_and_weighs_the_eta_by_cost():
    from server.sweep.cells import SweepProgress

    now = [0.0]
    p = SweepProgress(["dkkt_dm", "dm", "random_real", "dkkt_dm"], clock=lambda: now[0])  # costs 3, 2, 1, 3
    now[0] = 300.0
    assert p.done("dkkt_dm", "a") == "sweep: 1/4 cells done (a), 5 min elapsed, ETA 10 min"  # 6 units left at 100 s
    now[0] = 3900.0
    assert p.done("dm", "b") == "sweep: 2/4 cells done (b), 1 h 5 min elapsed, ETA 52 min"  # 780 s/unit, 4 left
    p.done("random_real", "c")
    assert p.done("dkkt_dm", "d").endswith("4/4 cells done (d), 1 h 5 min elapsed, ETA done")
