"""Poisoned model updates through the real message path, against Flower's robust strategies.

One ``run_simulation`` (Ray, the real ClientApp handlers) of ``NUM_CLIENTS`` clients; the ServerApp
runs several federations on the same grid (``server.federation.federate.run_federation``, the
server's phase 1), honest and poisoned, each with its own ``federation.strategy``. Partition
``ATTACKER``'s train replies are poisoned after the real handler trained: which attack comes from
the scenario's name, so one Ray start serves every case. The honest outcome asserted: the global
model within 2 points of the same strategy's honest run, the attacker (and nobody else) named in
the failure log when a bound or the finiteness check caught it.
"""

from __future__ import annotations

import builtins
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from common.records import KEY_ARRAYS

FMNIST = Path("/usr/share/datasets/fashion-mnist")
NUM_CLIENTS = 5
ATTACKER = 4


def _poison(kind: str, local: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attacker's weights from its honest ones (``local``) and the global model it started from."""
    if kind == "scale":  # the update times 1e30: finite, and swamps any average
        return {k: (start[k] + 1e30 * (v - start[k])).astype(v.dtype) for k, v in local.items()}
    if kind == "flip":  # the sign-flipped model
        return {k: -v for k, v in local.items()}
    if kind == "huge":  # finite but huge everywhere
        return {k: np.full_like(v, 3e38) for k, v in local.items()}
    raise ValueError(kind)


def _hostile_app() -> ClientApp:
    import edge_client.app as real

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = {k: v.numpy() for k, v in msg.content[KEY_ARRAYS].items()}
        reply = real.train(msg, context)
        name = json.loads(str(msg.content["config"]["scenario-json"]))["name"]
        kind = name.split("-")[1]
        if int(context.node_config["partition-id"]) == ATTACKER and kind != "honest":
            local = {k: v.numpy() for k, v in reply.content[KEY_ARRAYS].items()}
            reply.content[KEY_ARRAYS] = ArrayRecord(OrderedDict(
                (k, Array(np.ascontiguousarray(v))) for k, v in _poison(kind, local, start).items()))
        return reply

    return app


def _values(tmp: Path, strategy: str, kind: str, **federation) -> dict:  # noqa: ANN003
    return {
        "name": f"{strategy}-{kind}", "seed": 2, "device": "cpu", "output_dir": str(tmp / f"{strategy}-{kind}"),
        "data": {"dataset": "fashion-mnist", "root": str(FMNIST), "train_limit": 1000, "test_limit": 1000},
        "federation": {"num_clients": NUM_CLIENTS, "partition": "iid", "rounds": 2, "local_epochs": 1,
                       "batch_size": 32, "min_clients": 2, "reply_timeout_s": 300, "strategy": strategy,
                       **federation},
        "model": {"width": 8},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [1]},
    }


def _federate(tmp: Path, cases: list[dict]) -> list[dict]:
    """Run every case's federation in one simulation; returns per case the accuracy and failure rows."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from common.datasets import federation_train_set, normalize
    from common.evaluate import test_accuracy
    from common.models import build_model
    from common.scenario import scenario_from_dict
    from server.federation.federate import finite_outputs, run_federation, wait_for_nodes
    from server.federation.validate import FailureLog, shard_plan

    out: list[dict] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, NUM_CLIENTS, NUM_CLIENTS)
        for values in cases:
            s = scenario_from_dict(values)
            data = federation_train_set(s)
            meta = data.meta
            import dataclasses

            arch = dataclasses.asdict(s.model)
            eval_model = build_model(meta, arch)
            test_x = normalize(data.test_x, meta)

            def central(state, m=eval_model, x=test_x, y=data.test_y):  # noqa: ANN001, ANN202
                m.load_state_dict(state)
                return test_accuracy(m, x, y, "cpu")

            failures = FailureLog()
            fed = run_federation(grid, s, build_model(meta, arch, seed=s.seed).state_dict(), nodes, central,
                                 failures=failures, plan=shard_plan(s, data.train_y, len(nodes), meta.num_classes),
                                 probe=finite_outputs(build_model(meta, arch), test_x[:64]))
            out.append({"name": s.name, "acc": fed.rounds[-1]["test_acc"], "rows": list(failures.rows)})

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp / "cache"))
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=_hostile_app(), num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    assert len(out) == len(cases), "the ServerApp stopped early"
    return out


needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")


def _named(rows: list[dict]) -> set[int]:
    return {int(r["partition_id"]) for r in rows if r["phase"] == "train"}


@needs_fmnist
def test_norm_bound_and_finiteness_name_the_attacker(tmp_path: Path) -> None:
    """FedAvg: x1e30 and sign-flipped updates are rejected by the norm bound, 3e38 weights by the
    finiteness check; the model stays within 2 points of the honest run and only the attacker is named."""
    bound = {"update_norm_bound": 1.0}
    cases = [_values(tmp_path, "fedavg", "honest"),
             _values(tmp_path, "fedavg", "scale", **bound),
             _values(tmp_path, "fedavg", "flip", **bound),
             _values(tmp_path, "fedavg", "huge")]  # no bound: the aggregate's outputs are not finite
    honest, scale, flip, huge = _federate(tmp_path, cases)
    print({r["name"]: r["acc"] for r in (honest, scale, flip, huge)})
    assert honest["rows"] == [] and honest["acc"] > 0.4
    for run in (scale, flip, huge):
        assert abs(run["acc"] - honest["acc"]) <= 0.02, (run["name"], run["acc"], honest["acc"])
        assert _named(run["rows"]) == {ATTACKER}, run["rows"]
        assert len(run["rows"]) == 2  # once per round
    assert all("exceeds federation.update_norm_bound 1: rejected" in r["reason"] for r in scale["rows"] + flip["rows"])
    assert all("is not finite: left out of the round" in r["reason"] for r in huge["rows"])


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("fedmedian", {}),
    ("fedtrimmedavg", {"trim_beta": 0.2}),
    ("krum", {"byzantine_clients": 1}),
    ("multikrum", {"byzantine_clients": 1}),
])
def test_robust_strategies_hold_against_one_poisoned_client(tmp_path: Path, strategy: str, extra: dict) -> None:
    """Without any bound, Flower's robust aggregate of 4 honest + 1 poisoned client stays within 2 points."""
    cases = [_values(tmp_path, strategy, "honest", **extra), _values(tmp_path, strategy, "scale", **extra),
             _values(tmp_path, strategy, "flip", **extra)]
    honest, scale, flip = _federate(tmp_path, cases)
    print(strategy, {r["name"]: r["acc"] for r in (honest, scale, flip)})
    assert honest["acc"] > 0.4
    for run in (scale, flip):
        assert abs(run["acc"] - honest["acc"]) <= 0.02, (run["name"], run["acc"], honest["acc"])
        assert ATTACKER not in {int(r["partition_id"]) for r in run["rows"] if r["partition_id"] != ""} or \
            _named(run["rows"]) == {ATTACKER}
