"""Phase 1: federated training of the global ConvNet with Flower's FedAvg.

Uses ``flwr.serverapp.strategy.FedAvg(...).start(...)`` unchanged except for a thin
subclass that records, for every train reply, which client sent how many bytes (the
strategy does not expose per-node replies otherwise) and stops the run when fewer than
``federation.min_clients`` clients answered a round.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.records import CFG_SCENARIO, KEY_ARRAYS, KEY_CLIENT, record_bytes, record_to_state_dict, state_dict_to_record
from common.scenario import Scenario

__all__ = ["FederationError", "FederationResult", "wait_for_nodes", "run_federation"]


class FederationError(RuntimeError):
    """Too few clients, or the clients failed to train."""


@dataclass
class FederationResult:
    state_dict: OrderedDict[str, torch.Tensor]
    rounds: list[dict]  # per round: round, test_acc, test_loss (+ train-loss, eval-acc when available)
    uploads: list[dict]  # per train reply: round, node_id, partition_id, bytes
    node_partitions: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def wait_for_nodes(grid: Grid, expected: int | None, minimum: int, timeout: float = 120.0,
                   settle: float = 2.0) -> list[int]:
    """Node ids once ``expected`` nodes are connected (or, when ``expected`` is None, once at
    least ``minimum`` are and the count has not changed for ``settle`` seconds)."""
    need = max(expected or 0, minimum, 1)
    start = last_change = time.monotonic()
    nodes: list[int] = []
    while True:
        now_nodes = sorted(grid.get_node_ids())
        if len(now_nodes) != len(nodes):
            last_change = time.monotonic()
        nodes = now_nodes
        if expected is not None and len(nodes) >= expected:
            if len(nodes) > expected:
                raise FederationError(
                    f"federation.num_clients is {expected} but {len(nodes)} nodes are connected; "
                    "set num_clients to null (use every node) or match the number of SuperNodes"
                )
            return nodes
        if expected is None and len(nodes) >= need and time.monotonic() - last_change >= settle:
            return nodes
        if time.monotonic() - start > timeout:
            raise FederationError(f"only {len(nodes)} of the {need} required nodes connected within {timeout:.0f}s")
        time.sleep(0.2)


class _TrackingFedAvg(FedAvg):
    """FedAvg that logs per-client upload bytes and enforces ``min_clients`` per round."""

    def __init__(self, min_clients: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_clients = min_clients
        self.uploads: list[dict] = []
        self.node_partitions: dict[int, int] = {}
        self.train_metrics: dict[int, dict] = {}
        self.eval_metrics: dict[int, dict] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # may be a one-shot iterable; we read it twice
        ok = [m for m in replies if not m.has_error()]
        for msg in ok:
            node = msg.metadata.src_node_id
            client = msg.content.config_records.get(KEY_CLIENT, {})
            pid = int(client.get("partition-id", -1))
            self.node_partitions[node] = pid
            self.uploads.append({"round": server_round, "node_id": node, "partition_id": pid,
                                 "shard_bytes": client.get("shard-bytes"),
                                 "bytes": record_bytes(msg.content[KEY_ARRAYS]),
                                 "message_bytes": record_bytes(msg.content)})
        if len(ok) < self.min_clients:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error())
            raise FederationError(
                f"round {server_round}: only {len(ok)} of {len(replies)} clients trained "
                f"(federation.min_clients = {self.min_clients}). {reasons}"
            )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for m in replies:
            if m.has_error():
                log(WARNING, "client evaluation failed on node %d: %s", m.metadata.src_node_id, m.error.reason)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.eval_metrics[server_round] = dict(metrics)
        return metrics


def run_federation(
    grid: Grid,
    scenario: Scenario,
    initial_state: OrderedDict[str, torch.Tensor],
    node_ids: list[int],
    central_eval: Callable[[OrderedDict[str, torch.Tensor]], tuple[float, float]],
) -> FederationResult:
    """FedAvg for ``federation.rounds`` rounds; ``central_eval(state) -> (acc, loss)`` on the test set."""
    f = scenario.federation
    start = time.perf_counter()
    n = len(node_ids)
    client_eval = f.client_eval and f.holdout_fraction > 0
    if f.client_eval and not client_eval:
        log(WARNING, "federation.client_eval is on but holdout_fraction is 0: skipping client evaluation")
    strategy = _TrackingFedAvg(
        min_clients=f.min_clients,
        fraction_train=1.0,
        fraction_evaluate=1.0 if client_eval else 0.0,
        min_train_nodes=n,
        min_evaluate_nodes=n if client_eval else 0,
        min_available_nodes=n,
    )
    central: dict[int, tuple[float, float]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = central_eval(record_to_state_dict(arrays))
        central[server_round] = (acc, loss)
        log(INFO, "federate: round %d, global model test accuracy %.4f (loss %.4f)", server_round, acc, loss)
        return MetricRecord({"test-acc": acc, "test-loss": loss})

    scenario_json = scenario.to_json()
    train_config = ConfigRecord({CFG_SCENARIO: scenario_json, "lr": float(f.lr), "local-epochs": int(f.local_epochs)})
    result = strategy.start(
        grid=grid,
        initial_arrays=state_dict_to_record(initial_state),
        num_rounds=f.rounds,
        train_config=train_config,
        evaluate_config=ConfigRecord({CFG_SCENARIO: scenario_json}),
        evaluate_fn=evaluate_fn,
    )
    final = record_to_state_dict(result.arrays) if f.rounds > 0 and len(result.arrays) else initial_state
    rounds = []
    for r in sorted(central):
        row = {"round": r, "test_acc": central[r][0], "test_loss": central[r][1]}
        train_m = strategy.train_metrics.get(r, {})
        eval_m = strategy.eval_metrics.get(r, {})
        row["train_loss"] = train_m.get("train-loss")
        row["client_eval_acc"] = eval_m.get("eval-acc")
        rounds.append(row)
    return FederationResult(state_dict=final, rounds=rounds, uploads=strategy.uploads,
                            node_partitions=dict(strategy.node_partitions), seconds=time.perf_counter() - start)

