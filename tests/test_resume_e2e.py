"""Kill and restart: a run interrupted after phase 2 and started again with the same scenario
resumes from its saved theta* and T' (phases 1-2 skipped, checked by passing no Flower grid
at all) and ends with the same results as an uninterrupted run of the same seed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from test_app_e2e import _fake_fashion_mnist
from test_reliability_e2e import _scenario, _simulate


class _Killed(RuntimeError):
    pass


def _results(run_dir: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted((run_dir / "cells").glob("*.json")):
        rec = json.loads(path.read_text())
        out[path.stem] = (tuple(rec["result"]["accuracies"]), rec["config"]["inputs"])
    return out


@pytest.mark.slow  # two Flower simulations (~35 s each on a loaded 2-core box)
def test_killed_and_restarted_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    import server.run
    from common.scenario import scenario_from_dict
    from server.store.manifest import read_manifest

    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data")
    faults = {"clients": [1], "mode": "raise", "phases": ["query"]}  # a failure record must survive the restart
    whole = _simulate(tmp_path, _scenario(tmp_path, "whole", faults))

    values = _scenario(tmp_path, "killed", faults)
    mp = pytest.MonkeyPatch()

    def kill(*args, **kwargs):
        raise _Killed("simulated kill after phase 2")

    mp.setattr(server.run, "run_pipeline", kill)
    killed = scenario_from_dict(values).run_dir
    try:
        _simulate(tmp_path, values)
    except Exception as err:  # run_simulation may hand the server's exception on
        assert "simulated kill" in str(err)
    finally:
        mp.undo()
    assert (killed / "safe_pool.pt").is_file() and not (killed / "results.md").exists()
    assert set(read_manifest(killed)["files"]) >= {"global_model.pt", "safe_pool.pt"}

    # restart: no grid at all, so any attempt to federate again would fail
    server.run.run_scenario(None, scenario_from_dict(values))  # type: ignore[arg-type]
    timings = json.loads((killed / "timings.json").read_text())
    assert "federate" not in timings and "collect" not in timings

    assert _results(killed) == _results(whole) and _results(whole)
    for name in ("rounds.csv", "failures.csv"):
        a = list(csv.DictReader((whole / name).open()))
        b = list(csv.DictReader((killed / name).open()))
        drop = {"node_id"}  # node ids are random per simulation
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
               [{k: v for k, v in r.items() if k not in drop} for r in b], name
