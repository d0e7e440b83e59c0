"""Poisoned model updates through the real message path, against Flower's robust strategies.

One ``run_simulation`` (Ray, the real ClientApp handlers) of ``NUM_CLIENTS`` clients; the ServerApp
runs several federations on the same grid (``server.federation.federate.run_federation``, the
server's phase 1), honest and poisoned, each with its own ``federation.strategy``. Partition
``ATTACKER``'s train replies are poisoned after the real handler trained: which attack comes from
the scenario's name, so one Ray start serves every case. The honest outcome asserted: the global
model no more than 2 points below the same strategy's honest run, the attacker (and nobody else) named in
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
    if kind == "boost":  # the update times 1000: outputs stay finite, the model is ruined
        return {k: (start[k] + 1e3 * (v - start[k])).astype(v.dtype) for k, v in local.items()}
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
        name = json.loads(str(msg.content["config"]["scenario-json"]))["name"]
        kind = name.split("-")[1]
        attacker = int(context.node_config["partition-id"]) == ATTACKER
        if attacker and kind == "parts":  # a SuperNode started with another num-partitions
            context = Context(run_id=context.run_id, node_id=context.node_id, state=context.state,
                              node_config={**context.node_config, "num-partitions": 2 * NUM_CLIENTS},
                              run_config=context.run_config)
        reply = real.train(msg, context)
        if attacker and kind == "negloss":
            reply.content["metrics"]["train-loss"] = -5.0  # would pull the logged mean loss below zero
        if attacker and kind in ("scale", "boost", "flip", "huge"):
            local = {k: v.numpy() for k, v in reply.content[KEY_ARRAYS].items()}
            reply.content[KEY_ARRAYS] = ArrayRecord(OrderedDict(
                (k, Array(np.ascontiguousarray(v))) for k, v in _poison(kind, local, start).items()))
        return reply

    return app


def _values(tmp: Path, strategy: str, kind: str, num_clients: int = NUM_CLIENTS, **federation) -> dict:  # noqa: ANN003
    return {
        "name": f"{strategy}-{kind}", "seed": 2, "device": "cpu", "output_dir": str(tmp / f"{strategy}-{kind}"),
        "data": {"dataset": "fashion-mnist", "root": str(FMNIST), "train_limit": 1000, "test_limit": 1000},
        "federation": {"num_clients": num_clients, "partition": "iid", "rounds": 2, "local_epochs": 1,
                       "batch_size": 32, "min_clients": 2, "reply_timeout_s": 300, "strategy": strategy,
                       **federation},
        "model": {"width": 8},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [1]},
    }


def _federate(tmp: Path, cases: list[dict], num_clients: int = NUM_CLIENTS) -> list[dict]:
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
        nodes = wait_for_nodes(grid, num_clients, num_clients)
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
        run_simulation(server_app=server_app, client_app=_hostile_app(), num_supernodes=num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    assert len(out) == len(cases), "the ServerApp stopped early"
    return out


needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")


def _named(rows: list[dict]) -> set[int]:
    return {int(r["partition_id"]) for r in rows if r["phase"] == "train"}


@needs_fmnist
@pytest.mark.slow  # whole Flower simulations (minutes); the in-process tests below cover the same checks
def test_norm_bound_and_finiteness_name_the_attacker(tmp_path: Path) -> None:
    """FedAvg: x1e30, x1000 and sign-flipped updates are rejected by the norm bound, 3e38 weights by the
    finiteness check; the model stays within 2 points of the honest run and only the attacker is named.
    Without the bound the x1000 update costs FedAvg more than 5 points (the attack is real)."""
    bound = {"update_norm_bound": 1.0}
    cases = [_values(tmp_path, "fedavg", "honest"),
             _values(tmp_path, "fedavg", "scale", **bound),
             _values(tmp_path, "fedavg", "flip", **bound),
             _values(tmp_path, "fedavg", "huge", update_norm_bound=None),  # the aggregate's outputs are not finite
             _values(tmp_path, "fedavg", "boost", **bound),
             _values(tmp_path, "fedavg", "boost", update_norm_bound=None)]  # the control: no bound at all
    honest, scale, flip, huge, boost, unbounded = _federate(tmp_path, cases)
    print({r["name"]: r["acc"] for r in (honest, scale, flip, huge, boost)}, "unbounded boost", unbounded["acc"])
    assert honest["rows"] == [] and honest["acc"] > 0.4
    assert unbounded["acc"] < honest["acc"] - 0.05, "the attack must hurt when unchecked"
    for run in (scale, flip, huge, boost):
        assert run["acc"] >= honest["acc"] - 0.02, (run["name"], run["acc"], honest["acc"])
        assert _named(run["rows"]) == {ATTACKER}, run["rows"]
        assert len(run["rows"]) == 2  # once per round
    assert all("exceeds federation.update_norm_bound 1: rejected" in r["reason"]
               for r in scale["rows"] + flip["rows"] + boost["rows"])
    assert all("is not finite: left out of the round" in r["reason"] for r in huge["rows"])


@needs_fmnist
@pytest.mark.slow  # whole Flower simulations (minutes); the in-process tests below cover the same checks
def test_numbers_the_server_can_check_against_its_plan(tmp_path: Path) -> None:
    """A device whose shard is not the planned one (another num-partitions, num_clients left open) and one
    that reports a negative loss are rejected and named; the honest clients' model is what remains."""
    open_count = {"num_clients": None, "rounds": 1}
    parts, negloss = _federate(tmp_path, [_values(tmp_path, "fedavg", "parts", **open_count),
                                          _values(tmp_path, "fedavg", "negloss", **open_count)])
    for run, reason in ((parts, "'shard-size'"), (negloss, "'train-loss' must be >= 0")):
        assert _named(run["rows"]) == {ATTACKER}, run["rows"]
        assert all(reason in r["reason"] for r in run["rows"]), run["rows"]
    assert "num-partitions" in parts["rows"][0]["reason"]


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra, n", [
    ("fedmedian", {}, NUM_CLIENTS),
    ("fedtrimmedavg", {"trim_beta": 0.2}, NUM_CLIENTS),
    ("krum", {"byzantine_clients": 1}, NUM_CLIENTS),
    ("multikrum", {"byzantine_clients": 1}, NUM_CLIENTS),
    ("bulyan", {"byzantine_clients": 1}, 7),  # needs 4f + 3 clients
])
def test_robust_strategies_hold_against_one_poisoned_client(tmp_path: Path, strategy: str, extra: dict,
                                                            n: int) -> None:
    """Without any bound, Flower's robust aggregate of n - 1 honest + 1 poisoned client stays within 2 points."""
    extra = {**extra, "update_norm_bound": None, "num_clients": n}  # the strategy alone
    cases = [_values(tmp_path, strategy, "honest", **extra), _values(tmp_path, strategy, "scale", **extra),
             _values(tmp_path, strategy, "flip", **extra)]
    honest, scale, flip = _federate(tmp_path, cases, n)
    print(strategy, {r["name"]: r["acc"] for r in (honest, scale, flip)})
    assert honest["acc"] > 0.3  # learnt something (chance is 0.1): a fair reference
    for run in (scale, flip):
        assert run["acc"] >= honest["acc"] - 0.02, (run["name"], run["acc"], honest["acc"])
        assert _named(run["rows"]) <= {ATTACKER}, run["rows"]  # an honest client is never blamed


# ------------------------------------------------------------------ the strategies without Flower's message path


def _replies(states: list[dict[str, torch.Tensor]]) -> list:
    from tests.test_faults import _Reply, _train_content

    out = []
    for pid, state in enumerate(states):
        content = _train_content(state)
        content["client"]["partition-id"] = pid
        out.append(_Reply(content, 100 + pid))
    return out


def _strategy(strategy: str, n: int, **federation):  # noqa: ANN003, ANN202
    from common.records import state_dict_to_record
    from common.scenario import scenario_from_dict
    from server.federation.federate import tracking_strategy
    from server.federation.validate import weight_signature
    from tests.test_faults import STATE

    s = scenario_from_dict({"federation": {"strategy": strategy, "num_clients": n, **federation}})
    strat = tracking_strategy(s, n, min_clients=1, signature=weight_signature(STATE),
                              expected_nodes=[100 + i for i in range(n)])
    strat.global_arrays = state_dict_to_record(STATE)  # what configure_train records in a real round
    return strat


def _honest(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from tests.test_faults import STATE

    g = torch.Generator().manual_seed(seed)
    return [{k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in STATE.items()} for _ in range(n)]


@pytest.mark.parametrize("strategy, extra", [("bulyan", {"byzantine_clients": 1}), ("fedmedian", {}),
                                             ("multikrum", {"byzantine_clients": 1}),
                                             ("krum", {"byzantine_clients": 1}),
                                             ("fedtrimmedavg", {})])
def test_each_strategy_keeps_one_scaled_update_out(strategy: str, extra: dict) -> None:
    from tests.test_faults import STATE

    states = _honest(7)
    states[3] = {k: (STATE[k] + 1e30 * (v - STATE[k]) if v.is_floating_point() else v) for k, v in states[3].items()}
    arrays, _ = _strategy(strategy, 7, update_norm_bound=None, **extra).aggregate_train(1, _replies(states))
    w = torch.as_tensor(arrays["w"].numpy())
    assert (w - STATE["w"]).abs().max() < 0.1, strategy  # the honest updates are 0.01-sized
    fedavg, _ = _strategy("fedavg", 7, update_norm_bound=None).aggregate_train(1, _replies(states))
    assert torch.as_tensor(fedavg["w"].numpy()).abs().max() > 1e20  # the same attack swamps plain FedAvg


def test_clip_scales_an_update_to_the_bound_and_reports_it() -> None:
    from tests.test_faults import STATE

    states = _honest(3)
    states[2] = {k: (-v if v.is_floating_point() else v) for k, v in states[2].items()}
    strat = _strategy("fedavg", 3, update_norm_bound=0.5, update_norm_action="clip")
    arrays, _ = strat.aggregate_train(1, _replies(states))
    assert [(r["partition_id"], "clipped to the bound" in r["reason"]) for r in strat.failures.rows] == [(2, True)]
    # FedAvg of two honest models and one update of norm exactly 0.5 x ||global||
    ref = torch.cat([v.flatten().double() for v in STATE.values()])
    clipped = 3 * torch.cat([torch.as_tensor(arrays[k].numpy()).flatten().double() for k in STATE]) - sum(
        torch.cat([s[k].flatten().double() for k in STATE]) for s in states[:2])
    assert abs(float((clipped - ref).norm() / ref.norm()) - 0.5) < 1e-4


def test_a_round_with_no_finite_aggregate_is_rolled_back() -> None:
    """Every client sends huge weights: nothing finite is left, the global model stays, each is named."""
    from tests.test_faults import STATE

    states = [{k: (torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in s.items()} for s in _honest(2)]
    strat = _strategy("fedavg", 2, update_norm_bound=None)
    strat.probe = lambda state: bool(all(torch.isfinite(v.float() * 10).all() for v in state.values()))
    arrays, metrics = strat.aggregate_train(1, _replies(states))
    assert metrics is None and strat.rolled_back == [1]
    assert torch.equal(torch.as_tensor(arrays["w"].numpy()), STATE["w"])
    assert sorted(r["partition_id"] for r in strat.failures.rows) == [0, 1]


def test_bulyan_needs_4f_plus_3_clients() -> None:
    from common.config import ConfigError
    from common.scenario import scenario_from_dict

    with pytest.raises(ConfigError, match=r"federation.strategy.*num_clients >= 4 \* byzantine_clients \+ 3 = 7"):
        scenario_from_dict({"federation": {"strategy": "bulyan", "byzantine_clients": 1, "num_clients": 6}})
    with pytest.raises(ConfigError, match="federation.byzantine_clients"):
        scenario_from_dict({"federation": {"strategy": "fedavg", "byzantine_clients": 1}})


def test_client_metrics_are_aggregated_in_partition_order() -> None:
    """The same replies in any arrival order give bit-identical federated-evaluation metrics."""
    import itertools

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from tests.test_faults import _Reply

    def reply(pid: int, acc: float) -> _Reply:
        return _Reply(RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval-loss": 1.0, "eval-acc": acc}),
                                  "client": ConfigRecord({"partition-id": pid, "shard-size": 12,
                                                          "shard-bytes": 192})}), 100 + pid)

    replies = [reply(0, 0.1), reply(1, 0.2), reply(2, 0.3)]
    assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1  # float sums depend on the order
    seen = set()
    for order in itertools.permutations(replies):
        strat = _strategy("fedavg", 3)
        strat.node_partitions = {100: 0, 101: 1, 102: 2}  # learnt from the train replies
        seen.add(strat.aggregate_evaluate(1, list(order))["eval-acc"])
    assert len(seen) == 1, seen


def test_without_a_reference_model_the_largest_weights_are_named() -> None:
    from tests.test_faults import STATE

    states = _honest(3)
    states[1] = {k: (torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in states[1].items()}
    strat = _strategy("fedavg", 3)
    strat.global_arrays = None  # a strategy used outside Strategy.start
    strat.probe = lambda state: bool(all(torch.isfinite(v.float() * 10).all() for v in state.values()))
    arrays, _ = strat.aggregate_train(1, _replies(states))
    assert [r["partition_id"] for r in strat.failures.rows] == [1]
    assert "largest weight" in strat.failures.rows[0]["reason"]
    assert (torch.as_tensor(arrays["w"].numpy()) - STATE["w"]).abs().max() < 0.1
