"""A greedy server against the devices' own privacy budget, through the real message path.

Two ``run_simulation`` runs of the real ClientApp share the devices' state (their release ledgers).
The ServerApp of each run asks every device, again and again, for far more safe images than any
pool needs, changing the scenario's seed, ``safe.policy``, ``data.root`` and the offsets between
queries, and asks for 10**7 DSVs per class. Asserted: over both runs, no device released more
than its cap of distinct images per class, the DSV request is refused by the device, and the
device read its data from its own folder, not the one the server named.
"""

from __future__ import annotations

import builtins
from collections import defaultdict
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.records import KEY_CLIENT, KEY_SAFE, image_keys
from tests.test_app_e2e import _fake_fashion_mnist

NUM_CLIENTS = 3
CAP = 4


def _scenario_json(tmp: Path, seed: int, policy: str) -> str:
    from common.scenario import scenario_from_dict

    return scenario_from_dict({
        "name": f"greedy{seed}", "seed": seed, "device": "cpu", "output_dir": str(tmp / "runs"),
        # a folder the server picks on the device: never read, never created
        "data": {"dataset": "fashion-mnist", "root": str(tmp / "server-picked"), "download": True},
        "federation": {"num_clients": NUM_CLIENTS}, "safe": {"policy": policy},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [10**6]},
    }).to_json()


def _greedy_run(tmp: Path, seeds: list[int]) -> tuple[dict, list[str]]:
    """Released keys per (partition, class) and the DSV error replies of one simulation."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from edge_client.app import app as client_app
    from server.federation.federate import wait_for_nodes

    got: dict[tuple[int, int], set[int]] = defaultdict(set)
    dsv_errors: list[str] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, NUM_CLIENTS, NUM_CLIENTS)
        for seed in seeds:
            for policy in ("random", "first"):
                for offset in (0, CAP, 7):
                    cfg = ConfigRecord({"scenario-json": _scenario_json(tmp, seed, policy),
                                        "quota": [10**3] * 10, "offset": [offset] * 10})
                    for reply in grid.send_and_receive([Message(content=RecordDict({"config": cfg}), dst_node_id=n,
                                                                message_type="query") for n in nodes], timeout=300):
                        assert not reply.has_error(), reply.error.reason
                        pid = int(reply.content.config_records[KEY_CLIENT]["partition-id"])
                        x = reply.content[KEY_SAFE]["x"].numpy()
                        y = reply.content[KEY_SAFE]["y"].numpy()
                        for key, c in zip(image_keys(x).tolist() if len(y) else [], y.tolist()):
                            got[(pid, c)].add(key)
        cfg = ConfigRecord({"scenario-json": _scenario_json(tmp, seeds[0], "random"), "ipc": 10**7})
        for reply in grid.send_and_receive([Message(content=RecordDict({"config": cfg}), dst_node_id=n,
                                                    message_type="query.dsv") for n in nodes], timeout=300):
            dsv_errors.append(reply.error.reason if reply.has_error() else "answered")

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp / "cache"))  # the devices' state dir lives in their cache
    mp.setenv("FEDPDD_DATA_ROOT", str(tmp / "data"))
    mp.setenv("FEDPDD_SAFE_CAP", str(CAP))
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    return got, dsv_errors


def test_a_greedy_server_never_gets_more_than_the_device_cap(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data", n_train=300, n_test=30)  # ~10 images per class per device
    first, dsv_errors = _greedy_run(tmp_path, seeds=[0, 1])
    second, _ = _greedy_run(tmp_path, seeds=[2, 3])  # a later run, new seeds: the ledger is the device's
    released = {k: first.get(k, set()) | second.get(k, set()) for k in set(first) | set(second)}
    assert len(released) == NUM_CLIENTS * 10, sorted(released)
    assert max(len(v) for v in released.values()) == CAP, {k: len(v) for k, v in released.items()}
    # the images are real shard images, not nothing: every class of every device gave its CAP
    assert all(len(v) == CAP for v in released.values())
    assert len(dsv_errors) == NUM_CLIENTS
    assert all("max-dsv-per-class" in e for e in dsv_errors), dsv_errors
    assert not (tmp_path / "server-picked").exists()
    ledgers = list((tmp_path / "cache" / "node-state").glob("released-*.json"))
    assert len(ledgers) == NUM_CLIENTS


def test_the_ledger_counts_distinct_images_per_class(tmp_path: Path) -> None:
    from edge_client.policy import ReleaseLedger

    ledger = ReleaseLedger(tmp_path / "state" / "released.json")
    assert ledger.release([1, 2, 3, 4], [0, 0, 0, 1], cap=2).tolist() == [True, True, False, True]
    # a second query (or run): what was released may go again, nothing new past the cap
    again = ReleaseLedger(tmp_path / "state" / "released.json")
    assert again.release([3, 2, 1, 5, 6], [0, 0, 0, 1, 1], cap=2).tolist() == [False, True, True, True, False]
    assert {c: len(k) for c, k in again.released().items()} == {0: 2, 1: 2}
    (tmp_path / "state" / "released.json").write_text('{"released": {"0": ["not a key"]}}')
    with pytest.raises(ValueError, match="not a release ledger"):
        again.release([1], [0], cap=2)


def test_node_settings_come_from_the_node_then_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_client.policy import DEFAULT_SAFE_CAP, node_data, node_policy

    for var in ("FEDPDD_SAFE_CAP", "FEDPDD_SAFE_POLICY", "FEDPDD_SAFE_SEED", "FEDPDD_DATA_ROOT",
                "FEDPDD_DATA_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    p = node_policy({})
    assert (p.safe_cap, p.safe_policy, p.safe_seed) == (DEFAULT_SAFE_CAP, "random", 0)
    assert node_data({}) == (None, False)
    monkeypatch.setenv("FEDPDD_SAFE_CAP", "7")
    monkeypatch.setenv("FEDPDD_DATA_DOWNLOAD", "true")
    assert node_policy({}).safe_cap == 7 and node_policy({"max-safe-per-class": 3}).safe_cap == 3
    assert node_data({"data-root": "/d"}) == ("/d", True)
    with pytest.raises(ValueError, match="safe-policy"):
        node_policy({"safe-policy": "greedy"})
    with pytest.raises(ValueError, match="max-safe-per-class"):
        node_policy({"max-safe-per-class": -5})
