"""Hostile clients (issue #13): every bad reply is screened before Flower or the pipeline sees it.

Two layers:

* through the real message path (``run_simulation``, Ray, the real ClientApp handlers): a
  ClientApp that runs the real handlers and then turns partition 2's reply hostile, a different
  attack per train round, in evaluate and in the safe query (mode ``model``), and NaN DSVs in
  mode ``no_model_access``. The run finishes with the other clients, the global model equals the
  FedAvg of the honest replies only, the pool comes from the honest clients only, and each attack
  is a row of failures.csv with its phase and reason;
* the same attacks, one at a time, against the checks (fast, no Flower run), plus the client's
  own safe-image cap.
"""

from __future__ import annotations

import builtins
import csv
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.records import KEY_ARRAYS, KEY_CLIENT, KEY_METRICS, KEY_SAFE, images_to_record, state_dict_to_record
from server.federation.collect import _decode
from server.federation.validate import (FailureLog, ReplyRejected, ShardPlan, check_eval_reply, check_train_reply,
                             weight_signature)
from tests.test_app_e2e import _fake_fashion_mnist
from tests.test_privacy_modes import RecordingGrid

NUM_CLIENTS = 3
HOSTILE = 2

# ------------------------------------------------------------------ the attacks


def _first_weight(content: RecordDict) -> str:
    return next(iter(content[KEY_ARRAYS].keys()))


def _lying_shape(content: RecordDict) -> None:
    """A (1,) array of 1e6 declared as the full layer (the header says one shape, the bytes another)."""
    arrays = content[KEY_ARRAYS]
    key = _first_weight(content)
    full = arrays[key]
    arrays[key] = Array(dtype=full.dtype, shape=tuple(full.shape), stype=full.stype,
                        data=Array(np.full(1, 1e6, dtype=np.float32)).data)


def _extra_array_record(content: RecordDict) -> None:
    content["extra"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})


def _extra_metric(content: RecordDict) -> None:
    content[KEY_METRICS]["surprise"] = 1.0


def _huge_weight(content: RecordDict) -> None:
    content[KEY_METRICS]["num-examples"] = 10**12  # would take over the FedAvg average


TRAIN_ATTACKS = {1: _lying_shape, 2: _extra_array_record, 3: _extra_metric, 4: _huge_weight}
TRAIN_REASONS = {1: "decodes to float32 (1,)", 2: "records must be ArrayRecords", 3: "metric keys must be",
                 4: "'num-examples'"}


def _hostile_app(kind: str) -> ClientApp:
    """The real handlers; partition HOSTILE's replies are made hostile after the fact."""
    import edge_client.app as real

    app = ClientApp()

    def hostile(context: Context) -> bool:
        return int(context.node_config["partition-id"]) == HOSTILE

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = real.train(msg, context)
        if hostile(context) and kind == "model":
            TRAIN_ATTACKS[int(msg.content["config"]["server-round"])](reply.content)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = real.evaluate(msg, context)
        if hostile(context):
            reply.content[KEY_METRICS]["num-examples"] = 0  # a zero sum of weights divided by zero
        return reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = real.query(msg, context)
        if hostile(context):
            reply.content[KEY_METRICS]["shortfall"] = [float("inf")] * 10  # OverflowError before
        return reply

    @app.query("dsv")
    def query_dsv(msg: Message, context: Context) -> Message:
        reply = real.query_dsv(msg, context)
        if hostile(context):
            x = reply.content["dsv"]["x"].numpy().copy()
            x[0, 0, 0, 0] = np.nan
            reply.content["dsv"]["x"] = Array(x)
        return reply

    return app


def _values(tmp: Path, name: str, kind: str) -> dict:
    values = {
        "name": name, "seed": 3, "device": "cpu", "output_dir": str(tmp / name),
        "data": {"dataset": "fashion-mnist", "root": str(tmp / "data")},
        "federation": {"num_clients": NUM_CLIENTS, "rounds": len(TRAIN_ATTACKS), "local_epochs": 1, "batch_size": 32,
                       "min_clients": 2, "client_eval": True, "holdout_fraction": 0.2},
        "model": {"width": 8},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [3], "iterations": 2, "real_batch": 4},
        "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 64},
        "privacy": {"audit": False},
    }
    if kind == "no_model_access":
        values["federation"]["rounds"] = 1
        values["distill"]["methods"] = ["dsv"]
        values["privacy"].update({"mode": "no_model_access", "dsv_iterations": 2, "local_epochs": 1})
    return values


def _run(tmp: Path, name: str, kind: str) -> tuple[Path, RecordingGrid]:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from common.scenario import scenario_from_dict
    from server.run import run_scenario

    scenario = scenario_from_dict(_values(tmp, name, kind))
    holder: dict[str, RecordingGrid] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["grid"] = RecordingGrid(grid)
        if kind == "model":  # a greedy server first asks every client for 10**6 images per class
            from server.federation.federate import wait_for_nodes

            nodes = wait_for_nodes(grid, NUM_CLIENTS, NUM_CLIENTS)
            cfg = ConfigRecord({"scenario-json": scenario.to_json(), "quota": [10**6] * 10, "offset": [0] * 10})
            holder["greedy"] = list(grid.send_and_receive(
                [Message(content=RecordDict({"config": cfg}), dst_node_id=n, message_type="query") for n in nodes],
                timeout=600))
        run_scenario(holder["grid"], scenario)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp / "cache"))
    mp.setenv("FEDPDD_DATA_ROOT", str(scenario.data.root))  # the simulated devices' own data folder
    mp.setenv("FEDPDD_SAFE_CAP", "3")  # each device's own cap (the pool needs 3 per class)
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=_hostile_app(kind), num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    assert "grid" in holder, "the ServerApp did not run"
    holder["grid"].greedy = holder.get("greedy", [])
    return scenario.run_dir, holder["grid"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "data").mkdir()
    _fake_fashion_mnist(tmp / "data", n_train=150, n_test=60)
    return tmp


def _failures(run_dir: Path) -> list[dict]:
    with (run_dir / "failures.csv").open() as fh:
        return list(csv.DictReader(fh))


def _pool(run_dir: Path):  # noqa: ANN202
    from server.store.artifacts import load_safe_artifact

    return load_safe_artifact(run_dir / "safe_pool.pt")


def test_hostile_client_through_flower_model_mode(data_dir: Path) -> None:
    run_dir, grid = _run(data_dir, "hostile_model", "model")
    assert (run_dir / "results.md").is_file(), "the run must finish with the honest clients"
    rows = _failures(run_dir)
    assert {r["partition_id"] for r in rows} == {str(HOSTILE)}, rows
    train = {int(r["round"]): r["reason"] for r in rows if r["phase"] == "train"}
    assert sorted(train) == sorted(TRAIN_ATTACKS)
    for rnd, reason in TRAIN_REASONS.items():
        assert "malformed reply rejected" in train[rnd] and reason in train[rnd], (rnd, train[rnd])
    evals = [r for r in rows if r["phase"] == "evaluate"]
    assert len(evals) == len(TRAIN_ATTACKS) and all("'num-examples'" in r["reason"] for r in evals)
    (query,) = [r for r in rows if r["phase"] == "query"]
    assert "shortfall" in query["reason"]

    # FedAvg of the last round = the weighted mean of the honest replies alone (the math says equal)
    from server.store.artifacts import load_model_artifact

    last = [r for r in grid.replies if r.metadata.message_type == "train" and not r.has_error()
            and r.content.config_records[KEY_CLIENT]["partition-id"] != HOSTILE][-2:]
    assert len(last) == 2
    weights = np.array([r.content[KEY_METRICS]["num-examples"] for r in last], dtype=np.float64)
    state = load_model_artifact(run_dir / "global_model.pt").state_dict
    for key, value in state.items():
        arrays = [r.content[KEY_ARRAYS][key].numpy().astype(np.float64) for r in last]
        expected = sum(w * a for w, a in zip(weights, arrays)) / weights.sum()
        assert np.allclose(value.numpy(), expected, atol=1e-5), key
    # the pool is full and holds nothing of the hostile client
    safe = _pool(run_dir)
    assert torch.bincount(safe.y, minlength=10).tolist() == [3] * 10
    assert set(safe.extra["partition_ids"].tolist()) == {0, 1} and "indices" not in safe.extra
    # nothing that identifies a training image's position left any client
    assert all("indices" not in r.content.array_records.get(KEY_SAFE, {}) for r in grid.replies)
    # the greedy 10**6-per-class request: each honest client sent at most its own cap (pipc 3) and said so
    greedy = [r for r in grid.greedy if r.content.config_records[KEY_CLIENT]["partition-id"] != HOSTILE]
    assert len(greedy) == NUM_CLIENTS - 1
    for reply in greedy:
        counts = np.bincount(reply.content[KEY_SAFE]["y"].numpy(), minlength=10)
        assert counts.max() <= 3 and set(reply.content[KEY_SAFE].keys()) == {"x", "y"}
        capped = reply.content[KEY_METRICS]["capped"]
        assert all(c >= 10**6 - 3 for c in capped), capped


def test_hostile_client_through_flower_no_model_access(data_dir: Path) -> None:
    run_dir, _ = _run(data_dir, "hostile_nomodel", "no_model_access")
    assert (run_dir / "results.md").is_file()
    rows = _failures(run_dir)
    assert [(r["phase"], r["partition_id"]) for r in rows] == [("dsv", str(HOSTILE))], rows
    assert "NaN/Inf" in rows[0]["reason"]
    # the dropped client is not asked for safe images either: the pool comes from 0 and 1
    assert set(_pool(run_dir).extra["partition_ids"].tolist()) == {0, 1}
    from server.store.artifacts import load_torch_file

    dsvs = load_torch_file(run_dir / "client_dsvs.pt")
    assert dsvs["partition_ids"] == [0, 1]


# ------------------------------------------------------------------ the checks, one attack at a time


class _Reply:
    """A stand-in for a Flower reply (a Message needs a running Flower task)."""

    def __init__(self, content: RecordDict, node: int = 0) -> None:
        self.content = content
        self.metadata = type("Meta", (), {"src_node_id": node})()

    def has_error(self) -> bool:
        return False


STATE = OrderedDict(w=torch.randn(4, 3), b=torch.zeros(4))
PLAN = ShardPlan(num_train=(20, 20), num_holdout=(5, 5), class_counts=((2, 2, 2), (9, 9, 9)))


def _client(pid: int = 0) -> ConfigRecord:
    return ConfigRecord({"partition-id": pid, "shard-size": 25, "shard-bytes": 400})


def _train(n: object = 10) -> RecordDict:
    return RecordDict({KEY_ARRAYS: state_dict_to_record(STATE),
                       KEY_METRICS: MetricRecord({"num-examples": n, "train-loss": 0.5, "train-acc": 0.5}),
                       KEY_CLIENT: _client()})


@pytest.mark.parametrize("attack, match", [
    (_lying_shape, r"decodes to float32 \(1,\), expected float32 \(4, 3\)"),
    (_extra_array_record, "records must be ArrayRecords"),
    (_extra_metric, "metric keys must be"),
    (_huge_weight, r"'num-examples'.*\[1, 20\], got 1000000000000"),
    (lambda c: c[KEY_METRICS].__setitem__("num-examples", 1e308), "num-examples"),
    (lambda c: c[KEY_METRICS].__setitem__("num-examples", 2.5), "must be an integer"),
    (lambda c: c[KEY_CLIENT].__setitem__("partition-id", 7), r"'partition-id' must lie in \[0, 1\]"),
    (lambda c: c[KEY_ARRAYS].__setitem__("w", Array(np.zeros(10**6, np.float32))), "declared float32"),
])
def test_train_attacks_are_rejected(attack, match: str) -> None:  # noqa: ANN001
    sig = weight_signature(STATE)
    assert check_train_reply(_train(), sig, PLAN) == 0
    content = _train()
    attack(content)
    with pytest.raises(ReplyRejected, match=match):
        check_train_reply(content, sig, PLAN)


def test_a_partition_id_claimed_twice_is_rejected() -> None:
    with pytest.raises(ReplyRejected, match="already held by node 11"):
        check_train_reply(_train(), weight_signature(STATE), PLAN, claimed={11: 0}, node=12)
    with pytest.raises(ReplyRejected, match="differs from the 1 this node reported"):
        check_train_reply(_train(), weight_signature(STATE), PLAN, expected_pid=1, node=12)


@pytest.mark.parametrize("n, ok", [(0, False), (-3, False), (5, True), (6, False)])
def test_eval_num_examples_bounds(n: int, ok: bool) -> None:
    content = RecordDict({KEY_METRICS: MetricRecord({"num-examples": n, "eval-loss": 1.0, "eval-acc": 0.5}),
                          KEY_CLIENT: _client()})
    if ok:
        assert check_eval_reply(content, PLAN) == 0
    else:
        with pytest.raises(ReplyRejected, match="num-examples"):
            check_eval_reply(content, PLAN)


def _query(quota: list[int], **change) -> RecordDict:  # noqa: ANN003
    y = torch.tensor([c for c, q in enumerate(quota) for _ in range(q)], dtype=torch.int64)
    content = RecordDict({KEY_SAFE: images_to_record(torch.zeros(len(y), 1, 4, 4, dtype=torch.uint8), y),
                          KEY_METRICS: MetricRecord({"num-examples": len(y), "shortfall": [0] * len(quota),
                                                     "capped": [0] * len(quota)}),
                          KEY_CLIENT: _client()})
    for key, value in change.items():
        content[KEY_METRICS][key] = value
    return content


def test_query_attacks_are_rejected_before_decoding() -> None:
    quota = [2, 1, 0]
    _decode(_Reply(_query(quota)), 3, quota, (1, 4, 4), PLAN, offset=[0, 0, 0])  # the honest reply passes
    with pytest.raises(ReplyRejected, match="shortfall"):
        _decode(_Reply(_query(quota, shortfall=[float("inf"), 0.0, 0.0])), 3, quota, (1, 4, 4))
    # far more bytes than the asked images need: refused from the header, nothing decoded
    big = _query(quota)
    x = big[KEY_SAFE]["x"]
    big[KEY_SAFE]["x"] = Array(dtype=x.dtype, shape=tuple(x.shape), stype=x.stype, data=b"\0" * (8 << 20))
    with pytest.raises(ReplyRejected, match=r"carries 8388608 bytes, uint8 \(3, 1, 4, 4\) needs 48"):
        _decode(_Reply(big), 3, quota, (1, 4, 4))
    # an index of 10**12 (or any training-set index) no longer travels at all
    with_idx = _query(quota)
    with_idx[KEY_SAFE]["indices"] = Array(np.array([10**12, 0, 1], dtype=np.int64))
    with pytest.raises(ReplyRejected, match="exactly the arrays x and y"):
        _decode(_Reply(with_idx), 3, quota, (1, 4, 4))
    # more images of a class than its shard holds (partition 0 has 2 per class, 1 already sent)
    with pytest.raises(ReplyRejected, match="has only"):
        _decode(_Reply(_query(quota)), 3, quota, (1, 4, 4), PLAN, offset=[1, 0, 0])
    with pytest.raises(ReplyRejected, match="already held by node 5"):
        _decode(_Reply(_query(quota), node=6), 3, quota, (1, 4, 4), PLAN, claimed={5: 0})


def test_no_model_access_dsv_replies_are_screened() -> None:
    from common.datasets import get_meta
    from common.records import dsvs_to_record
    from server.federation.modes import _screen_dsv_reply

    meta = get_meta("fashion-mnist")
    x, y = torch.zeros(10, 1, 28, 28), torch.arange(10)
    metrics = {"num-examples": 5, "train-loss": 1.0, "train-acc": 0.5, "dsv-seconds": 1.0}
    good = RecordDict({"dsv": dsvs_to_record(x, y), KEY_METRICS: MetricRecord(metrics), KEY_CLIENT: _client()})
    assert _screen_dsv_reply(_Reply(good), meta, 1, PLAN, {})[0] == 0
    bad_x = x.clone()
    bad_x[3] = float("nan")
    for content, match in [
        (RecordDict({"dsv": dsvs_to_record(bad_x, y), KEY_METRICS: MetricRecord(metrics), KEY_CLIENT: _client()}),
         "NaN/Inf"),
        (RecordDict({KEY_METRICS: MetricRecord(metrics), KEY_CLIENT: _client()}), "records must be"),
        (RecordDict({"dsv": dsvs_to_record(x, y), KEY_METRICS: MetricRecord(metrics)}), "records must be"),
    ]:
        with pytest.raises(ReplyRejected, match=match):
            _screen_dsv_reply(_Reply(content), meta, 1, PLAN, {})


def test_dsv_collect_logs_failures_and_applies_the_timeout() -> None:
    from common.datasets import get_meta
    from common.scenario import scenario_from_dict
    from server.federation.modes import collect_client_dsvs

    seen: dict = {}

    class _Grid:
        def send_and_receive(self, messages, timeout):  # noqa: ANN001, ANN201
            seen["timeout"] = timeout
            return []  # nobody answers in time

    s = scenario_from_dict({"federation": {"num_clients": 2, "min_clients": 1, "reply_timeout_s": 7},
                            "distill": {"methods": ["dsv"]}, "privacy": {"mode": "no_model_access"}})
    failures = FailureLog()
    import server.federation.modes
    from server.federation.federate import FederationError

    mp = pytest.MonkeyPatch()
    mp.setattr(server.federation.modes, "Message", lambda **kw: kw)  # a real Message needs a running Flower task
    try:
        with pytest.raises(FederationError, match="only 0 of 2 clients sent DSVs"):
            collect_client_dsvs(_Grid(), [1, 2], s, get_meta("fashion-mnist"), timeout=7.0, failures=failures)
    finally:
        mp.undo()
    assert seen["timeout"] == 7.0
    assert [(r["phase"], r["node_id"]) for r in failures.rows] == [("dsv", 1), ("dsv", 2)]
    assert all("no reply within federation.reply_timeout_s" in r["reason"] for r in failures.rows)


def test_shard_plan_matches_the_clients_shards(tmp_path: Path) -> None:
    from common.scenario import scenario_from_dict
    from common.datasets import federation_train_set
    from edge_client.data import load_client_shard
    from server.federation.validate import shard_plan

    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data", n_train=150, n_test=30)
    s = scenario_from_dict(_values(tmp_path, "plan", "model"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    try:
        data = federation_train_set(s)
        plan = shard_plan(s, data.train_y, NUM_CLIENTS, 10)
        for pid in range(NUM_CLIENTS):
            shard = load_client_shard(s, pid, NUM_CLIENTS)
            assert plan.num_train[pid] == shard.num_train
            assert plan.num_holdout[pid] == shard.holdout_y.shape[0]
            assert list(plan.class_counts[pid]) == torch.bincount(shard.y, minlength=10).tolist()
    finally:
        mp.undo()


# ------------------------------------------------------------------ the client's own cap


def test_client_refuses_more_than_its_own_cap(tmp_path: Path) -> None:
    """Asked for 10**6 images per class, a device sends at most its own cap: the node's setting, else its
    environment; never the run config's or the scenario's (pipc 0 here, and the run config says 10**6)."""
    import edge_client.app as client
    from common.scenario import scenario_from_dict

    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data", n_train=150, n_test=30)
    values = _values(tmp_path, "cap", "model")
    values["distill"].update(pipc=[0], methods=["dsv"])
    s = scenario_from_dict(values)

    class _Msg:
        def __init__(self, quota: list[int]) -> None:
            self.content = RecordDict({"config": ConfigRecord({"scenario-json": s.to_json(), "quota": quota,
                                                                "offset": [0] * 10})})

    captured: list[RecordDict] = []
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    mp.setattr(client, "Message", lambda content, reply_to: captured.append(content) or content)
    greedy_run_config = {"max-safe-per-class": 10**6}
    try:
        for node_config, env, expect in (({"max-safe-per-class": 0}, None, 0), ({"max-safe-per-class": 1}, None, 1),
                                          ({}, "2", 2)):
            if env is not None:
                mp.setenv("FEDPDD_SAFE_CAP", env)
            context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": NUM_CLIENTS,
                                                                "data-root": str(tmp_path / "data"), **node_config},
                              state=RecordDict(), run_config=greedy_run_config)
            client.query(_Msg([10**6] * 10), context)
            reply = captured[-1]
            counts = np.bincount(reply[KEY_SAFE]["y"].numpy(), minlength=10)
            assert counts.max() == expect and set(reply[KEY_SAFE].keys()) == {"x", "y"}
            capped = reply[KEY_METRICS]["capped"]
            assert all(c >= 10**6 - expect for c in capped), capped
            assert [q - n for q, n in zip([10**6] * 10, counts)] == reply[KEY_METRICS]["shortfall"]
    finally:
        mp.undo()
