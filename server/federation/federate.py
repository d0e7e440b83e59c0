"""Phase 1: federated training of the global ConvNet with one of Flower's strategies.

``federation.strategy`` picks the class from ``flwr.serverapp.strategy`` (FedAvg, FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan), run by its own ``start(...)``. A thin mixin around it
(:func:`tracking_strategy`) screens every reply (server/federation/validate.py), records who sent
how many bytes, bounds each client's update relative to the global model
(``federation.update_norm_bound``: clip or reject, reported per client), stops the run when fewer
than ``federation.min_clients`` clients answered a round, and never lets a non-finite model out of
a round: the client with the largest update is named and left out, and the round is rolled back
when no finite aggregate remains.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from common.records import CFG_SCENARIO, KEY_ARRAYS, KEY_CLIENT, record_bytes, record_to_state_dict, state_dict_to_record
from common.scenario import Scenario
from server.federation.dp import dp_wrap
from server.federation.validate import (FailureLog, ReplyRejected, ShardPlan, check_eval_reply, check_train_reply,
                             weight_signature)

__all__ = ["FederationError", "FederationResult", "STRATEGY_CLASSES", "finite_outputs", "plateau_stop",
           "is_simulation", "tracking_strategy", "wait_for_nodes", "run_federation"]


class FederationError(RuntimeError):
    """Too few clients, or the clients failed to train."""


@dataclass
class FederationResult:
    state_dict: OrderedDict[str, torch.Tensor]
    rounds: list[dict]  # per round: round, test_acc, test_loss (+ train-loss, eval-acc when available)
    uploads: list[dict]  # per train reply: round, node_id, partition_id, bytes
    node_partitions: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def is_simulation(grid: Grid) -> bool:
    """True for the Simulation Engine's grid: it registers every SuperNode at once, before the clients start,
    so a count that has settled is final (under the Deployment Engine SuperNodes connect one by one)."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # flwr 1.41's simulation grid
    except ImportError:
        return False
    return isinstance(grid, InMemoryGrid)


def _size_hint(want: int, have: int, key: str, simulation: bool) -> str:
    """The fix for a federation of ``have`` SuperNodes where the scenario wants ``want`` (one line)."""
    if simulation:
        grow = f'run with --federation-config "num-supernodes={want}" (scenarios/quickstart.sh: CLIENTS={want})'
    else:
        grow = f"start {want} SuperNodes (bash scenarios/deployment.sh {want})"
    shrink = (f'--run-config "clients={have}"' if key == "federation.num_clients"
              else f"--run-config \"overrides='federation.min_clients={have}'\"")
    return f"{grow}, or {shrink}"


def wait_for_nodes(grid: Grid, expected: int | None, minimum: int, timeout: float = 120.0,
                   settle: float = 2.0, source: str = "the scenario", simulation: bool | None = None) -> list[int]:
    """Node ids once ``expected`` nodes are connected (or, when ``expected`` is None, once at
    least ``minimum`` are and the count has not changed for ``settle`` seconds).

    In a simulation (``simulation`` None: detected from ``grid``) every SuperNode is registered at once,
    so a nonzero count that has not changed for ``settle`` seconds is final: a mismatch fails then, with the
    ``num-supernodes`` to use, instead of after ``timeout``. Errors are one line (the run's status file keeps
    the first line only)."""
    simulation = is_simulation(grid) if simulation is None else simulation
    need = max(expected or 0, minimum, 1)
    key = "federation.num_clients" if expected is not None and expected >= minimum else "federation.min_clients"
    start = last_change = time.monotonic()
    nodes: list[int] = []
    while True:
        now_nodes = sorted(grid.get_node_ids())
        if len(now_nodes) != len(nodes):
            last_change = time.monotonic()
        nodes = now_nodes
        settled = bool(nodes) and time.monotonic() - last_change >= settle
        if expected is not None and len(nodes) >= expected:
            if len(nodes) > expected:
                raise FederationError(
                    f"{source}: federation.num_clients is {expected} but {len(nodes)} SuperNodes are connected; "
                    f"{_size_hint(expected, len(nodes), key, simulation)}, or set num_clients to null (every node)")
            return nodes
        if expected is None and len(nodes) >= need and settled:
            return nodes
        if simulation and settled:  # fewer than needed, and no more will come
            raise FederationError(
                f"{source}: {key} is {need} but the simulation has {len(nodes)} SuperNodes; "
                f"{_size_hint(need, len(nodes), key, simulation)}")
        if time.monotonic() - start > timeout:
            raise FederationError(
                f"{source}: {key} is {need} but only {len(nodes)} SuperNodes connected within {timeout:.0f}s; "
                f"{_size_hint(need, len(nodes), key, simulation)}")
        time.sleep(0.2)


class _Plateau(Exception):
    """evaluate_fn's way out of Strategy.start once the validation accuracy has plateaued."""


def plateau_stop(accuracies: list[float], window: int, delta: float) -> bool:
    """True once the best accuracy of the last ``window`` rounds is at most ``delta`` above the best
    before them (accuracies per round from round 0, fractions; ``delta`` a fraction too)."""
    if window <= 0 or len(accuracies) <= window:
        return False
    return max(accuracies[-window:]) <= max(accuracies[:-window]) + delta


class _Tracking:
    """Mixed in before one of Flower's strategies: screens replies, bounds updates, keeps the model finite.

    ``norm_bound``: the largest ``||w_client - w_global|| / ||w_global||`` a reply may carry
    (``norm_action`` "reject" leaves it out, "clip" scales the update to the bound); every client's
    ratio is logged each round. ``probe(state) -> bool``: False when the model's outputs are not
    finite (e.g. 3e38 weights average to finite but useless numbers); checked on every aggregate.
    """

    def __init__(self, min_clients: int, failures: FailureLog | None = None,
                 signature: dict | None = None, expected_nodes: list[int] | None = None,
                 plan: ShardPlan | None = None, norm_bound: float | None = None, norm_action: str = "reject",
                 probe: Callable[[OrderedDict[str, torch.Tensor]], bool] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.plan = plan  # shard sizes: bounds num-examples and partition ids (server/federation/validate.py)
        self.min_clients = min_clients
        # reliability: failed / malformed / missing replies are logged and left out of the average
        self.failures = failures if failures is not None else FailureLog()
        self.signature = signature
        self.expected_nodes = list(expected_nodes or [])
        self.norm_bound = norm_bound
        self.norm_action = norm_action
        self.probe = probe
        self.global_arrays: ArrayRecord | None = None  # the model this round's clients started from
        self.rolled_back: list[int] = []  # rounds whose aggregate was discarded
        self.prescreened = -1  # round whose replies a DP wrapper already had screened (see run_federation)
        self.uploads: list[dict] = []
        self.node_partitions: dict[int, int] = {}
        self.train_metrics: dict[int, dict] = {}
        self.eval_metrics: dict[int, dict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = arrays  # the reference of every update norm, and the rollback target
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # may be a one-shot iterable; we read it twice
        ok = replies if self.prescreened == server_round else self._screen(server_round, "train", replies)
        for msg in ok:
            node = msg.metadata.src_node_id
            client = msg.content.config_records.get(KEY_CLIENT, {})
            pid = int(client.get("partition-id", -1))
            self.node_partitions[node] = pid
            self.uploads.append({"round": server_round, "node_id": node, "partition_id": pid,
                                 "shard_bytes": client.get("shard-bytes"),
                                 "bytes": record_bytes(msg.content[KEY_ARRAYS]),
                                 "message_bytes": record_bytes(msg.content)})
        # only the replies that passed; in partition order so the float sums repeat run to run
        ok.sort(key=lambda m: (self.node_partitions.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))
        weights = {id(m): _weights(m) for m in ok}  # decoded once: norms, clipping, and retries read these
        norms = self._bound_updates(server_round, ok, weights)
        if len(ok) < self.min_clients:
            reasons = "; ".join(f"node {r['node_id']}: {r['reason']}" for r in self.failures.rows
                                if r["phase"] == "train" and r["round"] == server_round)
            raise FederationError(
                f"round {server_round}: only {len(ok)} of {max(len(replies), len(self.expected_nodes))} clients "
                f"trained (federation.min_clients = {self.min_clients}). {reasons}"
            )
        while True:
            for msg in ok:  # FedMedian / FedTrimmedAvg pop the arrays they read: every try gets them whole
                msg.content[KEY_ARRAYS] = ArrayRecord({k: Array(np.array(v)) for k, v in weights[id(msg)].items()})
            arrays, metrics = super().aggregate_train(server_round, ok)  # type: ignore[misc]
            if arrays is None:
                raise FederationError(
                    f"round {server_round}: {type(self).__name__.removeprefix('_Tracking')} aggregated nothing from "
                    f"{len(ok)} replies (bulyan needs at least 4 * byzantine_clients + 3)")
            if self._finite(arrays):
                break
            # the aggregate is not finite: the client whose update is largest goes, never the others
            # (without a global model to compare with, the largest weight magnitude decides)
            size = {id(m): norms.get(id(m), _abs_max(weights[id(m)])) for m in ok}
            worst = max(ok, key=lambda m: size[id(m)])
            node = worst.metadata.src_node_id
            what = "norm" if id(worst) in norms else "largest weight"
            self.failures.add("train", node, f"the aggregate including its update ({what} {size[id(worst)]:.3g}"
                              f"{' x the global model' + chr(39) + 's' if what == 'norm' else ''}, the largest of "
                              "the round) is not finite: left out of the round", server_round,
                              self.node_partitions.get(node))
            ok = [m for m in ok if m is not worst]
            if len(ok) < max(self.min_clients, 1):
                log(WARNING, "federate: round %d rolled back: no finite aggregate of at least %d clients; the "
                    "global model stays as it was", server_round, self.min_clients)
                self.rolled_back.append(server_round)
                return self.global_arrays, None
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)
        return arrays, metrics

    def _bound_updates(self, server_round: int, ok: list[Message], weights: dict[int, dict]) -> dict[int, float]:
        """Each reply's update norm relative to the global model; beyond ``norm_bound`` it is clipped or
        dropped from ``ok`` (in place) and reported. Returns id(msg) -> relative norm."""
        if self.global_arrays is None:
            return {}
        ref = {k: v.numpy() for k, v in self.global_arrays.items()}
        ref_norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in ref.values())) or 1.0
        norms: dict[int, float] = {}
        for msg in ok:
            w = weights[id(msg)]
            sq = sum(float(np.sum(np.square(w[k].astype(np.float64) - ref[k].astype(np.float64)))) for k in ref)
            norms[id(msg)] = math.sqrt(sq) / ref_norm if math.isfinite(sq) else math.inf
        log(INFO, "federate: round %d update norms (x the global model's): %s", server_round,
            ", ".join(f"partition {self.node_partitions.get(m.metadata.src_node_id, '?')} {norms[id(m)]:.3g}"
                      for m in ok))
        bound = self.norm_bound
        if bound is None:
            return norms
        for msg in list(ok):
            r = norms[id(msg)]
            if r <= bound:
                continue
            node = msg.metadata.src_node_id
            pid = self.node_partitions.get(node)
            if self.norm_action == "clip" and math.isfinite(r):
                scale = bound / r
                w = weights[id(msg)]
                for k in w:
                    if w[k].dtype.kind == "f":
                        w[k] = (ref[k] + (w[k].astype(np.float64) - ref[k]) * scale).astype(w[k].dtype)
                norms[id(msg)] = bound
                self.failures.add("train", node, f"update norm {r:.3g} x the global model's exceeds "
                                  f"federation.update_norm_bound {bound:g}: clipped to the bound", server_round, pid)
            else:
                ok.remove(msg)
                self.failures.add("train", node, f"update norm {r:.3g} x the global model's exceeds "
                                  f"federation.update_norm_bound {bound:g}: rejected", server_round, pid)
        return norms

    def _finite(self, arrays: ArrayRecord) -> bool:
        """Finite weights, and (with a probe) finite outputs of the model they make."""
        for value in arrays.values():
            v = value.numpy()
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                return False
        return self.probe is None or bool(self.probe(record_to_state_dict(arrays)))

    def _screen(self, server_round: int, phase: str, replies: list[Message]) -> list[Message]:
        """Replies that carry no error and pass server/federation/validate.py; the rest go to the failure log."""
        good: list[Message] = []
        seen: set[int] = set()
        accepted: dict[int, int] = {}  # node -> partition id of the replies accepted this round
        for msg in replies:
            node = msg.metadata.src_node_id
            seen.add(node)
            pid = self.node_partitions.get(node)
            if msg.has_error():
                self.failures.add(phase, node, f"error reply: {msg.error.reason}", server_round, pid)
                continue
            if pid is None:  # a reply we may reject still says who sent it (for the report only)
                try:
                    pid = int(msg.content.config_records[KEY_CLIENT]["partition-id"])
                except (KeyError, TypeError, ValueError):
                    pid = None
            known = self.node_partitions.get(node)
            claimed = {**self.node_partitions, **accepted}
            try:
                if node in accepted:
                    raise ReplyRejected("a second reply from this node in the same round")
                if phase == "train" and self.signature is not None:
                    got = check_train_reply(msg.content, self.signature, self.plan, known, claimed, node)
                elif phase == "evaluate":
                    got = check_eval_reply(msg.content, self.plan, known, claimed, node)
                else:
                    got = -1
            except ReplyRejected as err:
                self.failures.add(phase, node, f"malformed reply rejected: {err}", server_round, pid)
                continue
            if got is not None and got >= 0:
                accepted[node] = got
            good.append(msg)
        if phase == "train" or replies:  # evaluation may be switched off: no replies expected then
            for node in self.expected_nodes:
                if node not in seen:
                    self.failures.add(phase, node, "no reply within federation.reply_timeout_s", server_round,
                                      self.node_partitions.get(node))
        return good

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._screen(server_round, "evaluate", list(replies))
        # partition order, not arrival order: the weighted float sums then repeat bit for bit run to run
        replies.sort(key=lambda m: (self.node_partitions.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if metrics is not None:
            self.eval_metrics[server_round] = dict(metrics)
        return metrics


def _abs_max(weights: dict[str, np.ndarray]) -> float:
    return max((float(np.max(np.abs(v.astype(np.float64)))) for v in weights.values() if v.size), default=0.0)


def _weights(msg: Message) -> dict[str, np.ndarray]:
    """A reply's weights, decoded (screened before: keys, shapes, dtypes and finiteness hold)."""
    return {k: np.array(v.numpy()) for k, v in msg.content[KEY_ARRAYS].items()}


class _TrackingFedAvg(_Tracking, FedAvg):
    """FedAvg, screened and bounded (the default ``federation.strategy``)."""


class _TrackingFedMedian(_Tracking, FedMedian):
    """Coordinate-wise median of the client models."""


class _TrackingFedTrimmedAvg(_Tracking, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``trim_beta`` of each tail."""


class _TrackingKrum(_Tracking, Krum):
    """The one client model closest to its n - f - 2 nearest others."""


class _TrackingMultiKrum(_Tracking, MultiKrum):
    """FedAvg of the n - f client models Krum scores best."""


class _TrackingBulyan(_Tracking, Bulyan):
    """MultiKrum selection, then a coordinate-wise trimmed mean around the median."""


STRATEGY_CLASSES: dict[str, type[_Tracking]] = {
    "fedavg": _TrackingFedAvg, "fedmedian": _TrackingFedMedian, "fedtrimmedavg": _TrackingFedTrimmedAvg,
    "krum": _TrackingKrum, "multikrum": _TrackingMultiKrum, "bulyan": _TrackingBulyan,
}


def tracking_strategy(scenario: Scenario, num_nodes: int, **kwargs) -> _Tracking:  # noqa: ANN003
    """``federation.strategy``'s Flower class with the screening mixin; ``kwargs`` go to both."""
    f = scenario.federation
    extra: dict = {}
    if f.strategy == "fedtrimmedavg":
        extra["beta"] = float(f.trim_beta)
    if f.strategy in ("krum", "multikrum", "bulyan"):
        extra["num_malicious_nodes"] = int(f.byzantine_clients)
    if f.strategy == "multikrum":
        extra["num_nodes_to_select"] = max(1, num_nodes - int(f.byzantine_clients))
    if f.strategy == "bulyan" and num_nodes < 4 * f.byzantine_clients + 3:
        raise FederationError(f"federation.strategy bulyan needs at least 4 * byzantine_clients + 3 = "
                              f"{4 * f.byzantine_clients + 3} clients, {num_nodes} are connected")
    return STRATEGY_CLASSES[f.strategy](norm_bound=f.update_norm_bound, norm_action=f.update_norm_action,
                                        **extra, **kwargs)


def finite_outputs(model: torch.nn.Module, x: torch.Tensor) -> Callable[[OrderedDict[str, torch.Tensor]], bool]:
    """A probe for :func:`run_federation`: does ``model`` with a given state give finite outputs on ``x``?"""

    def probe(state: OrderedDict[str, torch.Tensor]) -> bool:
        model.load_state_dict(state)
        device = next(model.parameters()).device  # an evaluation may have moved the model
        with torch.no_grad():
            return bool(torch.isfinite(model.eval()(x.to(device))).all())

    return probe


def run_federation(
    grid: Grid,
    scenario: Scenario,
    initial_state: OrderedDict[str, torch.Tensor],
    node_ids: list[int],
    central_eval: Callable[[OrderedDict[str, torch.Tensor]], tuple[float, float]],
    failures: FailureLog | None = None,
    plan: ShardPlan | None = None,
    val_eval: Callable[[OrderedDict[str, torch.Tensor]], float] | None = None,
    probe: Callable[[OrderedDict[str, torch.Tensor]], bool] | None = None,
) -> FederationResult:
    """``federation.strategy`` for ``federation.rounds`` rounds; ``central_eval(state) -> (acc, loss)`` on the test set.

    ``probe(state) -> bool``: are the model's outputs finite (on a few inputs)? An aggregate that
    fails it is never the next global model (see :class:`_Tracking`).

    ``val_eval(state) -> acc`` on the validation split, recorded per round; with
    ``federation.plateau_rounds`` it stops FedAvg at the plateau (``plateau_stop``) and theta* is
    the model of the last round run."""
    f = scenario.federation
    start = time.perf_counter()
    n = len(node_ids)
    client_eval = f.client_eval and f.holdout_fraction > 0
    if f.client_eval and not client_eval:
        log(WARNING, "federation.client_eval is on but holdout_fraction is 0: skipping client evaluation")
    strategy = tracking_strategy(
        scenario, n,
        probe=probe,
        min_clients=f.min_clients,
        failures=failures,
        signature=weight_signature(initial_state),
        expected_nodes=list(node_ids),
        plan=plan,
        fraction_train=1.0,
        fraction_evaluate=1.0 if client_eval else 0.0,
        min_train_nodes=n,
        min_evaluate_nodes=n if client_eval else 0,
        min_available_nodes=n,
    )
    central: dict[int, tuple[float, float]] = {}
    val_acc: dict[int, float] = {}
    last: dict[str, ArrayRecord] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = record_to_state_dict(arrays)
        acc, loss = central_eval(state)
        central[server_round] = (acc, loss)
        metrics = {"test-acc": acc, "test-loss": loss}
        if val_eval is not None:
            val_acc[server_round] = metrics["val-acc"] = val_eval(state)
        log(INFO, "federate: round %d, global model test accuracy %.4f (loss %.4f)%s", server_round, acc, loss,
            f", validation {val_acc[server_round]:.4f}" if server_round in val_acc else "")
        last["arrays"] = arrays
        if f.plateau_rounds and server_round > 0 and plateau_stop(
                [val_acc[r] for r in sorted(val_acc)], f.plateau_rounds, f.plateau_delta / 100.0):
            log(INFO, "federate: validation accuracy gained <= %.2f points over the last %d rounds: "
                "plateau after round %d", f.plateau_delta, f.plateau_rounds, server_round)
            raise _Plateau(server_round)
        return MetricRecord(metrics)

    scenario_json = scenario.to_json()
    train_config = ConfigRecord({CFG_SCENARIO: scenario_json, "lr": float(f.lr), "local-epochs": int(f.local_epochs)})
    # privacy.dp: Flower's fixed-clipping DP wrapper (no-op when off)

    outer = dp_wrap(strategy, scenario, n)
    if outer is not strategy:
        # Flower's DP wrappers skip a whole round when any reply is an error and would clip a
        # malformed one: screen the replies before the wrapper sees them.
        wrapped_aggregate = outer.aggregate_train

        def screened_aggregate(server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
            good = strategy._screen(server_round, "train", list(replies))
            strategy.prescreened = server_round
            return wrapped_aggregate(server_round, good)

        outer.aggregate_train = screened_aggregate  # type: ignore[method-assign]
    try:
        result = outer.start(
            grid=grid,
            initial_arrays=state_dict_to_record(initial_state),
            num_rounds=f.rounds,
            timeout=f.reply_timeout_s,
            train_config=train_config,
            evaluate_config=ConfigRecord({CFG_SCENARIO: scenario_json}),
            evaluate_fn=evaluate_fn,
        )
        final_arrays = result.arrays
    except _Plateau:  # raised by evaluate_fn after the round's aggregate: that round's model is theta*
        final_arrays = last["arrays"]
    final = record_to_state_dict(final_arrays) if f.rounds > 0 and len(final_arrays) else initial_state
    rounds = []
    for r in sorted(central):
        row = {"round": r, "test_acc": central[r][0], "test_loss": central[r][1]}
        train_m = strategy.train_metrics.get(r, {})
        eval_m = strategy.eval_metrics.get(r, {})
        if r in val_acc:
            row["val_acc"] = val_acc[r]
        row["train_loss"] = train_m.get("train-loss")
        row["client_eval_acc"] = eval_m.get("eval-acc")
        rounds.append(row)
    return FederationResult(state_dict=final, rounds=rounds, uploads=strategy.uploads,
                            node_partitions=dict(strategy.node_partitions), seconds=time.perf_counter() - start)

