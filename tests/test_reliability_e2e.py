"""Failing clients through Flower (run_simulation, 3 tiny clients, as tests/test_app_e2e.py).

* one client raises in train and query: the run completes with the other two, the pool is
  rebalanced over them, failures.csv and results.md name the failures;
* one client answers with malformed weights and a malformed safe subset: both are rejected
  (never averaged, never pooled) and reported;
* too few clients answer the query (min_clients 3): the run stops, and what was written
  before (scenario, global model, failures.csv) stays.
"""

from __future__ import annotations

import builtins
import csv
from pathlib import Path

import pytest
import torch

from test_app_e2e import _fake_fashion_mnist

NUM_CLIENTS = 3


def _scenario(tmp_path: Path, name: str, faults: dict, min_clients: int = 2) -> dict:
    return {
        "name": name, "seed": 5, "device": "cpu", "output_dir": str(tmp_path / name),
        "data": {"dataset": "fashion-mnist", "root": str(tmp_path / "data")},
        "federation": {"num_clients": NUM_CLIENTS, "partition": "iid", "rounds": 1, "local_epochs": 1,
                       # the default deadline: a loaded 2-core box can take minutes to start the client actors;
                       # the test that is about the deadline sets its own from the measured start-up
                       "batch_size": 32, "min_clients": min_clients, "reply_timeout_s": 600},
        "model": {"width": 8},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [3], "iterations": 2, "real_batch": 4},
        "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 64},
        "faults": faults,
    }


def _simulate(tmp_path: Path, values: dict) -> Path:
    from flwr.simulation import run_simulation

    from common.scenario import scenario_from_dict
    from edge_client.app import app as client_app
    from server.app import create_server_app

    scenario = scenario_from_dict(values)
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    mp.setenv("FEDPDD_DATA_ROOT", str(scenario.data.root))  # the simulated devices' own data folder
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=create_server_app(scenario), client_app=client_app, num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    return scenario.run_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rel")
    (tmp / "data").mkdir()
    _fake_fashion_mnist(tmp / "data")
    return tmp


def _failures(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "failures.csv").open()))


def _pool_partitions(run_dir: Path) -> set[int]:
    from server.store.artifacts import load_safe_artifact

    safe = load_safe_artifact(run_dir / "safe_pool.pt")
    counts = torch.bincount(safe.y, minlength=10)
    assert counts.tolist() == [3] * 10, "the pool must still be full: rebalanced over the others"
    return set(safe.extra["partition_ids"].tolist())


def test_one_raising_client_is_reported_and_the_run_completes(data_dir: Path) -> None:
    run_dir = _simulate(data_dir, _scenario(data_dir, "raise", {"clients": [1], "mode": "raise",
                                                                "phases": ["train", "query"]}))
    assert (run_dir / "results.md").is_file() and (run_dir / "global_model.pt").is_file()
    rows = _failures(run_dir)
    assert {r["phase"] for r in rows} == {"train", "query"}
    assert all("injected raise fault" in r["reason"] for r in rows)
    assert len({r["node_id"] for r in rows}) == 1, "one client failed"
    assert _pool_partitions(run_dir) == {0, 2}
    md = (run_dir / "results.md").read_text()
    assert "## Client failures" in md and "injected raise fault" in md


@pytest.mark.slow  # another ~40 s simulation; the rejection logic itself is unit-tested in test_faults.py
def test_malformed_replies_are_rejected(data_dir: Path) -> None:
    run_dir = _simulate(data_dir, _scenario(data_dir, "malformed", {"clients": [2], "mode": "malformed",
                                                                    "phases": ["train", "query"]}))
    rows = _failures(run_dir)
    assert {r["phase"] for r in rows} == {"train", "query"}
    assert all("malformed reply rejected" in r["reason"] for r in rows), rows
    assert _pool_partitions(run_dir) == {0, 1}
    assert {r["partition_id"] for r in rows} == {"2"}
    from server.store.artifacts import load_model_artifact

    state = load_model_artifact(run_dir / "global_model.pt").state_dict
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow  # another simulation; the min_clients logic is unit-tested in test_faults.py
def test_below_min_clients_stops_and_keeps_artifacts(data_dir: Path) -> None:
    values = _scenario(data_dir, "below", {"clients": [0], "mode": "drop_after_train"}, min_clients=3)
    with pytest.raises(Exception, match=r"only 2 of 3 clients answered the safe-subset query \(federation.min_clients = 3\)"):
        _simulate(data_dir, values)
    run_dir = data_dir / "below"
    # phase 1 finished (every client trained), phase 2 lost a client: stop before distillation
    assert (run_dir / "global_model.pt").is_file() and (run_dir / "scenario.resolved.yaml").is_file()
    assert not (run_dir / "safe_pool.pt").exists() and not (run_dir / "results.md").exists()
    rows = _failures(run_dir)
    assert [r["phase"] for r in rows] == ["query"] and rows[0]["partition_id"] == "0"


@pytest.fixture(scope="module")
def startup_s(data_dir: Path) -> float:
    """Seconds this machine, as loaded right now, needs for Ray start-up + one tiny FedAvg round.

    Read from a run this module already made (its timings.json), else measured with one fault-free
    run. Deadlines below are multiples of it, so they hold on a loaded 2-core box and stay tight
    on a fast one.
    """
    import json

    for name in ("raise", "calibrate"):
        timings = data_dir / name / "timings.json"
        if timings.is_file():
            return float(json.loads(timings.read_text())["federate"])
    run_dir = _simulate(data_dir, _scenario(data_dir, "calibrate", {}))
    return float(json.loads((run_dir / "timings.json").read_text())["federate"])


@pytest.mark.slow  # waits out a reply timeout
def test_a_client_past_the_reply_timeout_is_dropped(data_dir: Path, startup_s: float) -> None:
    import json

    values = _scenario(data_dir, "timeout", {"clients": [0], "mode": "timeout", "phases": ["query"]})
    # honest clients must answer train and query within the deadline: 3x the measured start-up + round
    # (a fresh Ray start per run); the faulty client sleeps deadline + 1 s, so it always misses it
    timeout = max(15.0, 3.0 * startup_s)
    values["federation"]["reply_timeout_s"] = timeout
    run_dir = _simulate(data_dir, values)
    rows = _failures(run_dir)
    # a server that ignored the deadline would wait for the late reply and log its error instead
    assert [(r["phase"], r["partition_id"]) for r in rows] == [("query", "0")], (rows, timeout)
    assert "no reply within federation.reply_timeout_s" in rows[0]["reason"]
    assert _pool_partitions(run_dir) == {1, 2} and (run_dir / "results.md").is_file()
    collect = json.loads((run_dir / "timings.json").read_text())["collect"]
    assert collect >= 0.9 * timeout, f"the query round ended after {collect:.1f}s, before the {timeout:.0f}s deadline"
