"""Server side of the privacy-constrained modes (scenario section ``privacy``).

``privacy.mode: no_model_access`` (paper contribution 3, Fig. 3). No FedAvg rounds and no
model weights ever travel client -> server. Phase 1 becomes: every client trains a model on its
own shard for ``privacy.local_epochs`` epochs, extracts ``max(distill.ipc)`` Deep Support Vectors
per class from it (DKKT only, ``privacy.dsv_iterations`` iterations) and uploads them (a
``query.dsv`` message, handled by the ClientApp's ``@app.query("dsv")``). Phase 2 collects the
safe pool as usual. The server then distills without theta*:

* ``dm``          DM on the safe pool alone;
* ``dsv``         the combined client DSVs as they are;
* ``blend``       pixel average of the combined DSVs and DM images (Fig. 3);
* ``dm_from_dsv`` DM started from the combined DSVs.

Combining N clients' DSVs into ipc per class (``privacy.dsv_combine``):

* ``average`` (default): slot j of class c = the mean of every client's j-th DSV of class c.
  Every client contributes to every synthetic image (like the paper's blend, an average of
  complementary views) and no single client's DSV is shown as is;
* ``median``: slot j of class c = the coordinate-wise median of every client's j-th DSV of class c
  (robust: one client's shifted or inverted DSVs cannot move it far);
* ``select``: slot j of class c = client (j mod N)'s DSV number (j div N), clients in
  partition order: the DSVs stay intact and are spread over the clients.

Before combining, every client's DSVs are compared with the others' (:func:`dsv_outliers`): a
client whose per-class mean DSV sits far from the clients' median is dropped and named (phase
``dsv``), and is not asked for safe images.

``privacy.dp`` (mode ``model``): server/federation/dp.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.datasets import DatasetMeta
from common.records import (CFG_SCENARIO, DSV_ACTION, KEY_CLIENT, KEY_CONFIG, KEY_DSV, KEY_METRICS, record_bytes,
                            record_to_dsvs)
from common.scenario import Scenario
from server.store.artifacts import save_safe_artifact
from server.federation.collect import SafePool, collect_safe_pool
from server.federation.federate import FederationError, wait_for_nodes
from server.store.manifest import fingerprint
from server.store.run_folder import RunFolder
from server.federation.validate import (DSV_METRICS, FailureLog, ReplyRejected, ShardPlan, _check_declared, _count,
                             check_client_record, check_metric_keys, check_record_names, check_training_metrics,
                             claimed_partition,
                             shard_plan)

__all__ = ["ClientDSVs", "NoModelResult", "DSV_MESSAGE_TYPE", "combine_dsvs", "dsv_outliers",
           "collect_client_dsvs", "federate_without_model"]

DSV_MESSAGE_TYPE = f"{MessageType.QUERY}.{DSV_ACTION}"  # "query.dsv"


# ---------------------------------------------------------------- no model access


@dataclass
class ClientDSVs:
    """Every client's uploaded DSVs (class-major, ``ipc`` per class), in partition order."""

    partition_ids: list[int]
    x: list[torch.Tensor]  # float32 normalized, per client
    y: list[torch.Tensor]
    ipc: int
    combine: str = "average"

    def combined(self, ipc: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return combine_dsvs(self.x, self.y, ipc, num_classes, self.combine)


def combine_dsvs(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], ipc: int, num_classes: int,
                 how: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
    """N clients' DSVs -> ``ipc`` per class, class-major (see the module docstring)."""
    if not xs:
        raise ValueError("no client DSVs to combine")
    per_client = []  # [client][class] -> tensor (k, C, H, W)
    for x, y in zip(xs, ys):
        per_client.append([x[y == c] for c in range(num_classes)])
    n = len(per_client)
    out = []
    for c in range(num_classes):
        for j in range(ipc):
            if how in ("average", "median"):
                if any(pc[c].shape[0] <= j for pc in per_client):
                    raise ValueError(f"{how} needs {ipc} DSVs of class {c} from every client")
                stack = torch.stack([pc[c][j] for pc in per_client])
                # torch.median takes the lower middle for an even count: the mean of the two middles is symmetric
                out.append(stack.mean(0) if how == "average" else stack.quantile(0.5, dim=0))
            elif how == "select":
                k, i = j % n, j // n
                if per_client[k][c].shape[0] <= i:
                    raise ValueError(f"select needs {i + 1} DSVs of class {c} from client {k}")
                out.append(per_client[k][c][i])
            else:
                raise ValueError(f"privacy.dsv_combine must be 'average', 'median' or 'select', got {how!r}")
    y = torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)
    return torch.stack(out).to(torch.float32), y


def dsv_outliers(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], num_classes: int, factor: float = 4.0,
                 floor: float = 0.5) -> dict[int, str]:
    """Index -> reason of the clients whose DSVs sit far from everyone else's.

    Per client, the mean DSV of each class; its distance (mean absolute pixel difference, normalized
    units) to the coordinate-wise median of those means over the clients, averaged over the classes.
    Flagged: more than ``factor`` times the median distance and more than ``floor`` above it. Needs 3
    clients (with two, neither is the odd one out).
    """
    if len(xs) < 3:
        return {}
    means = torch.stack([torch.stack([x[y == c].mean(0) for c in range(num_classes)]) for x, y in zip(xs, ys)])
    center = means.quantile(0.5, dim=0)
    dist = (means - center).abs().flatten(2).mean(2).mean(1)  # per client
    typical = float(dist.median())
    flagged: dict[int, str] = {}
    for k, d in enumerate(dist.tolist()):
        if d > factor * typical and d > typical + floor:
            flagged[k] = (f"its DSVs lie {d:.3g} (mean absolute pixel difference per class) from the clients' median, "
                          f"the typical client's {typical:.3g}")
    return flagged


def dsv_per_client(scenario: Scenario, num_clients: int) -> int:
    """DSVs per class each client extracts: enough for the largest ipc of the grid."""
    ipc = max(scenario.distill.ipc)
    if scenario.privacy.dsv_combine == "select":
        return -(-ipc // num_clients)  # ceil: the clients together hold ipc per class
    return ipc


def _screen_dsv_reply(reply: Message, meta: DatasetMeta, ipc: int, plan: ShardPlan | None,
                      claimed: dict[int, int]) -> tuple[int, torch.Tensor, torch.Tensor, dict]:
    """One DSV reply, checked like every other reply (server/federation/validate.py) before it is decoded."""
    content = reply.content
    node = reply.metadata.src_node_id
    check_record_names(content, {KEY_DSV}, {KEY_METRICS}, {KEY_CLIENT})
    metrics = check_metric_keys(content, DSV_METRICS)
    pid = check_client_record(content, plan, claimed.get(node), claimed, node)
    if plan is not None:
        _count(metrics["num-examples"], "'num-examples'", 1, plan.num_train[pid])
    check_training_metrics(metrics)
    record = content.array_records[KEY_DSV]
    if set(record.keys()) != {"x", "y"}:
        raise ReplyRejected(f"a DSV record holds exactly the arrays x and y, got {sorted(record.keys())}")
    n = meta.num_classes * ipc
    _check_declared(record["x"], "x", (n, *meta.image_shape), "float32")  # size before decoding
    _check_declared(record["y"], "y", (n,), "int64")
    try:  # decodes, then checks dtype, shape, NaN/Inf, normalization range and ipc per class
        x, y = record_to_dsvs(record, meta.num_classes, ipc, meta.image_shape,
                              where=f"DSVs from node {node} (partition {pid})")
    except ValueError as err:
        raise ReplyRejected(str(err)) from err
    return pid, x, y, metrics


def collect_client_dsvs(grid: Grid, nodes: Sequence[int], scenario: Scenario, meta: DatasetMeta,
                        timeout: float = 600.0, failures: FailureLog | None = None,
                        plan: ShardPlan | None = None) -> tuple[ClientDSVs, list[dict], dict[int, int]]:
    """Send ``query.dsv`` to every node; returns the DSVs, the upload log and node -> partition.

    A client that errs, answers late (``timeout``) or sends a reply that fails the checks is
    dropped and logged in ``failures`` (phase ``dsv``); the run goes on while at least
    ``federation.min_clients`` clients answered.
    """
    failures = failures if failures is not None else FailureLog()
    ipc = dsv_per_client(scenario, len(nodes))
    cfg = ConfigRecord({CFG_SCENARIO: scenario.to_json(), "ipc": ipc})
    messages = [Message(content=RecordDict({KEY_CONFIG: cfg}), dst_node_id=n, message_type=DSV_MESSAGE_TYPE)
                for n in nodes]
    got: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    uploads: list[dict] = []
    partition_of: dict[int, int] = {}
    seen: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if node not in nodes or node in seen:
            continue
        seen.add(node)
        if reply.has_error():
            failures.add("dsv", node, f"error reply: {reply.error.reason}")
            continue
        try:
            pid, x, y, metrics = _screen_dsv_reply(reply, meta, ipc, plan, partition_of)
        except (ReplyRejected, ValueError, TypeError, KeyError) as err:
            failures.add("dsv", node, f"malformed reply rejected: {err}", partition_id=claimed_partition(reply.content))
            continue
        partition_of[node] = pid
        got.append((pid, x, y))
        content = reply.content
        uploads.append({"node_id": node, "partition_id": pid, "images": int(y.numel()),
                        "bytes": record_bytes(content[KEY_DSV]), "message_bytes": record_bytes(content),
                        "shard_bytes": int(content.config_records[KEY_CLIENT]["shard-bytes"]),
                        "local_train_acc": metrics.get("train-acc")})
    for node in nodes:
        if node not in seen:
            failures.add("dsv", node, "no reply within federation.reply_timeout_s")
    got.sort(key=lambda g: g[0])
    by_pid = {pid: node for node, pid in partition_of.items()}
    for k, why in sorted(dsv_outliers([g[1] for g in got], [g[2] for g in got], meta.num_classes).items(),
                         reverse=True):
        pid = got[k][0]
        node = by_pid[pid]
        failures.add("dsv", node, f"DSVs rejected: {why}", partition_id=pid)
        del got[k]
        del partition_of[node]  # a dropped client is not asked for safe images either
    failures.fill_partitions(partition_of)
    if len(got) < max(scenario.federation.min_clients, 1):
        reasons = "; ".join(f"node {r['node_id']}: {r['reason']}" for r in failures.rows if r["phase"] == "dsv")
        raise FederationError(f"only {len(got)} of {len(nodes)} clients sent DSVs (federation.min_clients = "
                              f"{scenario.federation.min_clients}). {reasons}")
    dsvs = ClientDSVs(partition_ids=[g[0] for g in got], x=[g[1] for g in got], y=[g[2] for g in got], ipc=ipc,
                      combine=scenario.privacy.dsv_combine)
    return dsvs, uploads, partition_of


@dataclass
class NoModelResult:
    pool: SafePool
    dsvs: ClientDSVs
    dsv_uploads: list[dict] = field(default_factory=list)


def federate_without_model(grid: Grid, scenario: Scenario, meta: DatasetMeta, timings: dict[str, float],
                           failures: FailureLog | None = None, train_y: torch.Tensor | None = None) -> NoModelResult:
    """Phases 1-2 of mode no_model_access: client DSVs (no weights), then the safe pool."""
    f = scenario.federation
    failures = failures if failures is not None else FailureLog()
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, f.num_clients, f.min_clients, source=scenario.source)
    plan = shard_plan(scenario, train_y, len(nodes), meta.num_classes) if train_y is not None else None
    log(INFO, "no-model-access: %d clients train locally and upload DSVs (no model weights leave them)", len(nodes))
    dsvs, uploads, partition_of = collect_client_dsvs(grid, nodes, scenario, meta, timeout=float(f.reply_timeout_s),
                                                      failures=failures, plan=plan)
    timings["client_dsv"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # only the clients whose DSVs passed are asked for safe images (a dropped client stays dropped)
    answered = [n for n in nodes if n in partition_of]
    pool = collect_safe_pool(grid, answered, scenario.to_json(), meta.num_classes, scenario.pool_pipc,
                             seed=scenario.seed, image_shape=meta.image_shape, partition_of=partition_of,
                             timeout=float(f.reply_timeout_s), failures=failures, min_clients=f.min_clients,
                             plan=plan)
    timings["collect"] = time.perf_counter() - t0
    run_dir = scenario.run_dir
    save_safe_artifact(run_dir / "safe_pool.pt", pool.x, pool.y, meta.name,
                       extra={"keys": pool.keys, "partition_ids": pool.partition_ids, "pipc": pool.pipc,
                              "uploads": pool.uploads, "failures": list(failures.rows)})
    folder = RunFolder(run_dir)
    folder.torch_save("client_dsvs.pt", {"partition_ids": dsvs.partition_ids, "x": dsvs.x, "y": dsvs.y, "ipc": dsvs.ipc,
                                         "combine": dsvs.combine, "dataset": meta.name, "uploads": uploads})
    folder.record(["safe_pool.pt", "client_dsvs.pt"], fingerprint(scenario))  # hashed like theta*
    log(INFO, "no-model-access: %d DSVs from %d clients, %d safe images", sum(int(y.numel()) for y in dsvs.y),
        len(dsvs.x), int(pool.y.numel()))
    return NoModelResult(pool=pool, dsvs=dsvs, dsv_uploads=uploads)


def client_dsv_set(dsvs: ClientDSVs, ipc: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSV set a cell of the grid uses (ipc per class), combined per ``privacy.dsv_combine``."""
    return dsvs.combined(ipc, num_classes)
