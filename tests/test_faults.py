"""Reliability without Flower running: injected client faults (edge_client/faults.py), the
server's reply checks (server/federation/validate.py), collection that drops failed clients and
rebalances, FedAvg that leaves rejected replies out, the manifest, and a NaN in one cell."""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common.records import KEY_ARRAYS, KEY_CLIENT, KEY_METRICS, KEY_SAFE, ImageSet, images_to_record, state_dict_to_record
from common.scenario import ScenarioError, scenario_from_dict
from edge_client.faults import QUERY_CORRUPTIONS, TRAIN_CORRUPTIONS, InjectedFault, before_handler, corrupt_reply, is_faulty
from server.federation.collect import CollectError, SafeReply, plan_collection
from server.federation.validate import FailureLog, ReplyRejected, check_eval_reply, check_safe_images, check_train_reply, weight_signature


class _Reply:
    """A stand-in for a Flower reply (Message() needs a running Flower task)."""

    def __init__(self, content: RecordDict, node: int = 0) -> None:
        self.content = content
        self.metadata = type("Meta", (), {"src_node_id": node})()

    def has_error(self) -> bool:
        return False


def _scenario(**faults):
    return scenario_from_dict({"federation": {"num_clients": 3, "reply_timeout_s": 0.05}, "faults": faults})


# ------------------------------------------------------------------ scenario keys


def test_faults_section_defaults_and_validation() -> None:
    s = scenario_from_dict({})
    assert s.faults.clients is None and s.federation.reply_timeout_s == 600.0
    with pytest.raises(ScenarioError, match="faults.mode"):
        scenario_from_dict({"faults": {"clients": [0], "mode": "explode"}})
    with pytest.raises(ScenarioError, match=r"faults.phases\[0\]"):
        scenario_from_dict({"faults": {"clients": [0], "phases": ["distill"]}})
    with pytest.raises(ScenarioError, match=r"faults.clients\[0\]"):
        scenario_from_dict({"federation": {"num_clients": 2}, "faults": {"clients": [5]}})
    with pytest.raises(ScenarioError, match="federation.reply_timeout_s"):
        scenario_from_dict({"federation": {"reply_timeout_s": 0}})
    # the scenario travels to the clients as JSON: it must survive the round trip
    s = _scenario(clients=[1], mode="malformed", phases=["query"])
    assert scenario_from_dict(json.loads(s.to_json())).faults == s.faults


# ------------------------------------------------------------------ client side


def test_fault_modes_on_the_client() -> None:
    s = _scenario(clients=[1], mode="raise", phases=["train"])
    before_handler(s, 0, "train")  # a healthy client is untouched
    before_handler(s, 1, "query")  # not a listed phase
    with pytest.raises(InjectedFault, match="client 1"):
        before_handler(s, 1, "train")
    drop = _scenario(clients=[2], mode="drop_after_train")
    before_handler(drop, 2, "train")
    assert not is_faulty(drop, 2, "train") and is_faulty(drop, 2, "query") and is_faulty(drop, 2, "evaluate")
    with pytest.raises(InjectedFault):
        before_handler(drop, 2, "query")
    slow = _scenario(clients=[0], mode="timeout", phases=["query"])
    with pytest.raises(InjectedFault, match="timeout"):
        before_handler(slow, 0, "query")  # sleeps reply_timeout_s + 1 s first


def _train_content(state) -> RecordDict:
    return RecordDict({KEY_ARRAYS: state_dict_to_record(state),
                       KEY_METRICS: MetricRecord({"num-examples": 10, "train-loss": 0.5, "train-acc": 0.5}),
                       KEY_CLIENT: ConfigRecord({"partition-id": 0, "shard-size": 12, "shard-bytes": 192})})


STATE = OrderedDict(w=torch.randn(4, 3), b=torch.zeros(4), n=torch.tensor(3, dtype=torch.int64))


@pytest.mark.parametrize("kind", TRAIN_CORRUPTIONS)
def test_every_malformed_train_reply_is_rejected(kind: str) -> None:
    s = _scenario(clients=[0], mode="malformed", phases=["train"])
    sig = weight_signature(STATE)
    check_train_reply(_train_content(STATE), sig)  # the healthy reply passes
    content, name = corrupt_reply(s, 0, "train", _train_content(STATE), kind=kind)
    assert name == kind
    with pytest.raises(ReplyRejected):
        check_train_reply(content, sig)


def test_train_reply_with_bad_weight_count_is_rejected() -> None:
    content = _train_content(STATE)
    content[KEY_METRICS]["num-examples"] = -3
    with pytest.raises(ReplyRejected, match="num-examples"):
        check_train_reply(content, weight_signature(STATE))


def _query_content(quota: list[int]) -> RecordDict:
    y = torch.tensor([c for c, q in enumerate(quota) for _ in range(q)], dtype=torch.int64)
    x = torch.zeros(len(y), 1, 4, 4, dtype=torch.uint8)
    return RecordDict({KEY_SAFE: images_to_record(x, y),
                       KEY_METRICS: MetricRecord({"num-examples": len(y), "shortfall": [0] * len(quota)}),
                       KEY_CLIENT: ConfigRecord({"partition-id": 0, "shard-size": 12, "shard-bytes": 192})})


@pytest.mark.parametrize("kind", QUERY_CORRUPTIONS)
def test_every_malformed_query_reply_is_rejected(kind: str) -> None:
    from server.federation.collect import _decode

    s = _scenario(clients=[0], mode="malformed", phases=["query"])
    quota = [2, 1, 0]
    content, _ = corrupt_reply(s, 0, "query", _query_content(quota), kind=kind)
    msg = _Reply(content)
    with pytest.raises((ReplyRejected, ValueError)):
        reply = _decode(msg, 3, quota, (1, 4, 4))  # screened before decoding ...
        check_safe_images(reply.images.x, reply.images.y, reply.shortfall, quota, 3, (1, 4, 4))  # ... the rest here


def test_eval_reply_checks() -> None:
    s = _scenario(clients=[0], mode="malformed", phases=["evaluate"])
    good = RecordDict({KEY_METRICS: MetricRecord({"eval-acc": 0.5, "eval-loss": 1.0, "num-examples": 3})})
    check_eval_reply(good)
    bad, _ = corrupt_reply(s, 0, "evaluate", good)
    with pytest.raises(ReplyRejected):
        check_eval_reply(bad)


# ------------------------------------------------------------------ collection with failing clients


def _clients(holdings, broken: dict[int, str]):
    """ask() where clients in ``broken`` misbehave: 'error', 'silent' or 'over_quota'."""

    def ask(requests):
        replies = {}
        for node, (quota, offset) in requests.items():
            mode = broken.get(node)
            if mode == "silent":
                continue
            if mode == "error":
                replies[node] = "error reply: boom"
                continue
            ys, short = [], []
            for c, (q, o) in enumerate(zip(quota, offset)):
                give = max(0, min(q, holdings[node][c] - o))
                ys += [c] * give
                short.append(q - give)
            if mode == "over_quota":
                ys = ys * 2 + [0]
            y = torch.tensor(ys, dtype=torch.int64)
            replies[node] = SafeReply(images=ImageSet(x=torch.zeros(len(ys), 1, 2, 2, dtype=torch.uint8), y=y),
                                      shortfall=np.array(short), partition_id=node, num_bytes=len(ys))
        return replies

    return ask


@pytest.mark.parametrize("mode", ["error", "silent", "over_quota"])
def test_collection_drops_a_failed_client_and_rebalances(mode: str) -> None:
    failures = FailureLog()
    received, uploads = plan_collection([0, 1, 2], num_classes=2, pipc=6, ask=_clients([[9, 9]] * 3, {1: mode}),
                                        failures=failures, min_clients=2)
    per_node = {n: len(torch.cat([im.y for im in sets])) if sets else 0 for n, sets in received.items()}
    assert per_node[1] == 0, "nothing from the failed client may enter the pool"
    assert per_node[0] + per_node[2] == 12
    assert [r["node_id"] for r in failures.rows] == [1] and failures.rows[0]["phase"] == "query"
    # without a failure log the old strict behaviour stays
    with pytest.raises(CollectError, match="node 1"):
        plan_collection([0, 1, 2], num_classes=2, pipc=6, ask=_clients([[9, 9]] * 3, {1: mode}))


def test_collection_stops_below_min_clients() -> None:
    with pytest.raises(CollectError, match="min_clients = 2"):
        plan_collection([0, 1], num_classes=2, pipc=4, ask=_clients([[9, 9]] * 2, {0: "error"}),
                        failures=FailureLog(), min_clients=2)


def test_failure_log_writes_csv_and_results_section(tmp_path: Path) -> None:
    (tmp_path / "results.md").write_text("# r\n\n| a |\n")
    log = FailureLog()
    log.add("train", 77, "error reply: x | y", 1)
    log.add("query", 78, "malformed", 1, 2)
    log.fill_partitions({77: 0})
    log.write(tmp_path)
    log.write(tmp_path)  # idempotent: one section only
    rows = list(csv.DictReader((tmp_path / "failures.csv").open()))
    assert [(r["phase"], r["node_id"], r["partition_id"]) for r in rows] == [("train", "77", "0"), ("query", "78", "2")]
    md = (tmp_path / "results.md").read_text()
    assert md.count("## Client failures") == 1 and "| train | 1 | 77 | 0 |" in md


# ------------------------------------------------------------------ FedAvg leaves rejected replies out


def test_fedavg_aggregates_only_valid_replies() -> None:
    from server.federation.federate import _TrackingFedAvg

    sig = weight_signature(STATE)
    good = {k: torch.ones_like(v) for k, v in STATE.items()}
    nan = {k: v.clone() for k, v in good.items()}
    nan["w"][0, 0] = float("nan")
    replies = []
    for node, (state, pid) in {11: (good, 0), 12: (nan, 1)}.items():
        content = _train_content(state)
        content[KEY_CLIENT]["partition-id"] = pid
        replies.append(_Reply(content, node))
    strat = _TrackingFedAvg(min_clients=1, signature=sig, expected_nodes=[11, 12, 13], fraction_train=1.0)
    arrays, _ = strat.aggregate_train(1, replies)
    assert torch.isfinite(torch.as_tensor(arrays["w"].numpy())).all()
    assert sorted((r["node_id"], r["reason"].split(":")[0]) for r in strat.failures.rows) == [
        (12, "malformed reply rejected"), (13, "no reply within federation.reply_timeout_s")]
    strict = _TrackingFedAvg(min_clients=2, signature=sig, expected_nodes=[11, 12], fraction_train=1.0)
    from server.federation.federate import FederationError

    with pytest.raises(FederationError, match="min_clients = 2"):
        strict.aggregate_train(1, replies)
