"""The ServerApp compares the connected SuperNodes with the scenario at once: in a simulation a mismatch
fails in seconds, one line naming the --federation-config to use, and reaches the status file."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.federation.federate import FederationError, wait_for_nodes


class _Grid:
    """A grid whose SuperNodes are a fixed list (what the Simulation Engine registers at once)."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_simulation_with_too_few_supernodes_fails_after_the_settle_time_with_the_fix() -> None:
    t0 = time.monotonic()
    with pytest.raises(FederationError) as err:
        wait_for_nodes(_Grid(2), 4, 4, timeout=60, settle=0.5, source="q.yaml", simulation=True)
    assert time.monotonic() - t0 < 10  # not the 60 s timeout
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("q.yaml: federation.num_clients is 4 but the simulation has 2 SuperNodes")
    assert '--federation-config "num-supernodes=4"' in msg and 'clients=2' in msg


def test_min_clients_is_named_when_num_clients_is_unset() -> None:
    with pytest.raises(FederationError) as err:
        wait_for_nodes(_Grid(2), None, 3, timeout=60, settle=0.3, simulation=True)
    msg = str(err.value)
    assert "federation.min_clients is 3" in msg and "num-supernodes=3" in msg
    assert "federation.min_clients=2" in msg


def test_too_many_supernodes_fail_at_once_and_a_match_returns_the_nodes() -> None:
    with pytest.raises(FederationError, match='num-supernodes=4'):
        wait_for_nodes(_Grid(5), 4, 1, timeout=60, settle=0.3, simulation=True)
    assert wait_for_nodes(_Grid(4), 4, 4, timeout=60, settle=0.3, simulation=True) == [1, 2, 3, 4]
    assert wait_for_nodes(_Grid(3), None, 2, timeout=60, settle=0.3, simulation=True) == [1, 2, 3]


def test_deployment_keeps_waiting_for_supernodes_that_connect_later() -> None:
    grid = _Grid(1)
    # SuperNodes of the Deployment Engine connect one by one: a settled count is not final there
    t0 = time.monotonic()
    with pytest.raises(FederationError) as err:
        wait_for_nodes(grid, 3, 3, timeout=1.5, settle=0.2, simulation=False)
    assert time.monotonic() - t0 >= 1.5
    assert "only 1 SuperNodes connected within 2s" in str(err.value)
    assert "bash scenarios/deployment.sh 3" in str(err.value)


def test_serverapp_under_the_simulation_engine_fails_in_seconds_into_the_status_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.simulation import run_simulation

    from common.scenario import load_scenario
    from edge_client.app import app as client_app
    from server.app import create_server_app

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, flwr.serverapp"], timeout=300, check=True)
    startup = time.perf_counter() - t0  # one interpreter start with these imports, on this machine now
    # a data root that does not exist: were the SuperNode check missing, the run would fail on it instead
    scenario = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml",
                             overrides={"output_dir": str(tmp_path / "run"), "data.root": str(tmp_path / "none")})
    status = tmp_path / "status.json"
    monkeypatch.setenv("FEDPDD_STATUS_FILE", str(status))
    monkeypatch.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    start = time.time()
    with pytest.raises(FederationError):  # run_simulation re-raises the ServerApp's error; `flwr run` exits 0
        run_simulation(server_app=create_server_app(scenario), client_app=client_app, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    wall = time.time() - start
    record = json.loads(status.read_text())
    assert record["ok"] is False
    assert record["reason"].startswith("FederationError: "), record
    assert "federation.num_clients is 4 but the simulation has 2 SuperNodes" in record["reason"]
    assert '--federation-config "num-supernodes=4"' in record["reason"]
    # the ServerApp starts before the simulation's workers, so it fails at settle time, not after 120 s
    assert record["time"] - start < 2 + 10 + 3 * startup, (record["time"] - start, startup)
    assert not (tmp_path / "run").exists()  # nothing written: the check comes before the run folder
    assert wall < 120  # the old silent wait alone was 120 s
