"""Server-side checks of client replies, and the log of failed clients.

A client can crash, time out, or answer with garbage (a bug, a flipped bit, an attacker).
Every reply is checked before it touches the global model or the safe pool; a reply that
fails a check is rejected and its client counted as failed for that phase, exactly like a
client that raised. Checks:

* train    weights: same keys, shapes and dtypes as the global model, all finite;
           ``num-examples`` a positive finite number (FedAvg's weight); losses >= 0, accuracies in [0, 1];
* every    the ``client`` record: a partition id of the plan, its shard size and bytes as the plan deals them;
* query    images uint8 C x H x W of the dataset, labels int64 in [0, classes), counts per
           class within the quota, counts + shortfall = quota, shortfall >= 0;
* evaluate metrics finite, accuracy in [0, 1].

:class:`FailureLog` collects (phase, round, node, partition, reason) rows and writes
``failures.csv`` and a section of ``results.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.logger import log

from common.records import KEY_ARRAYS, KEY_CLIENT, KEY_METRICS
from common.dataset_meta import get_meta
from common.partition import partition_indices
from server.store.run_folder import write_dict_csv, write_text

__all__ = ["ReplyRejected", "FailureLog", "ShardPlan", "shard_plan", "weight_signature", "check_train_reply",
           "check_safe_images", "check_eval_reply", "check_record_names", "check_metric_keys", "check_client_record",
           "check_training_metrics"]

_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64,
                np.dtype(np.int32): torch.int32, np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}


class ReplyRejected(ValueError):
    """A client's reply failed a server-side check; the message says which."""


# What each reply may hold, exactly: anything more would reach Flower's consistency check
# (which ends the ServerApp) or the pipeline, so an unexpected key rejects the reply.
TRAIN_METRICS = frozenset({"num-examples", "train-loss", "train-acc"})
EVAL_METRICS = frozenset({"num-examples", "eval-loss", "eval-acc"})
QUERY_METRICS = frozenset({"num-examples", "shortfall", "capped"})
DSV_METRICS = frozenset({"num-examples", "train-loss", "train-acc", "dsv-seconds"})
CLIENT_KEYS = frozenset({"partition-id", "shard-size", "shard-bytes"})
_NPY_HEADER = 4096  # slack for the .npy header Flower serializes with every array


@dataclass(frozen=True)
class ShardPlan:
    """What the server knows of every client's shard before asking it anything.

    Partitions are a pure function of the scenario and the training labels (common.partition),
    so the server can bound each reply: ``num-examples`` of a train reply <= the shard's
    training part, of an evaluate reply <= its held-out part, images sent per class <= what the
    shard holds of that class.
    """

    num_train: tuple[int, ...]
    num_holdout: tuple[int, ...]
    class_counts: tuple[tuple[int, ...], ...]  # per partition, per class, the whole shard
    image_bytes: int | None = None  # bytes of one uint8 image: a shard's size in bytes follows from its count

    @property
    def num_partitions(self) -> int:
        return len(self.num_train)


def shard_plan(scenario: object, train_y: torch.Tensor, num_partitions: int, num_classes: int) -> ShardPlan:
    """The shard sizes ``edge_client.data`` builds for ``num_partitions`` clients (same formula)."""
    f = scenario.federation  # type: ignore[attr-defined]
    parts = partition_indices(train_y, num_partitions, scheme=f.partition, seed=scenario.seed,  # type: ignore[attr-defined]
                              alpha=f.dirichlet_alpha, shards_per_client=f.shards_per_client)
    labels = np.asarray(train_y)
    n_train, n_hold, counts = [], [], []
    for own in parts:
        own = np.asarray(own, dtype=np.int64)
        # edge_client.data._build_shard: floor(fraction * size), at least one training image
        hold = max(0, min(int(np.floor(f.holdout_fraction * own.size)), own.size - 1))
        n_train.append(int(own.size - hold))
        n_hold.append(hold)
        counts.append(tuple(int(c) for c in np.bincount(labels[own], minlength=num_classes)))
    try:
        shape = get_meta(scenario.data.dataset).image_shape  # type: ignore[attr-defined]
        image_bytes: int | None = int(np.prod(shape))
    except Exception:  # noqa: BLE001 - a plan without the byte check is still a plan
        image_bytes = None
    return ShardPlan(tuple(n_train), tuple(n_hold), tuple(counts), image_bytes)


def weight_signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, numpy dtype name) of the global model: what every train reply must match."""
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype) if v.dtype != torch.bfloat16 else "bfloat16")
            for k, v in state.items()}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _count(value: object, what: str, low: int, high: int | None) -> int:
    """An integer count in [low, high]: no bool, NaN, inf or fraction (1e308 is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"{what} must be an integer, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise ReplyRejected(f"{what} must be an integer, got {value!r}")
    n = int(value)
    if n < low or (high is not None and n > high):
        raise ReplyRejected(f"{what} must lie in [{low}, {'inf' if high is None else high}], got {n}")
    return n


def check_record_names(content: RecordDict, arrays: set[str], metrics: set[str], configs: set[str]) -> None:
    """The reply's records are exactly the expected ones (names and kinds)."""
    got = (set(content.array_records), set(content.metric_records), set(content.config_records))
    if got != (arrays, metrics, configs):
        raise ReplyRejected(f"records must be ArrayRecords {sorted(arrays)}, MetricRecords {sorted(metrics)}, "
                            f"ConfigRecords {sorted(configs)}; got {sorted(got[0])}, {sorted(got[1])}, {sorted(got[2])}")


def check_metric_keys(content: RecordDict, expected: frozenset[str], optional: frozenset[str] = frozenset()) -> dict:
    """The MetricRecord's keys are exactly ``expected`` (plus any of ``optional``); numbers finite."""
    metrics = content.metric_records.get(KEY_METRICS)
    if metrics is None:
        raise ReplyRejected(f"no MetricRecord {KEY_METRICS!r}")
    keys = set(metrics.keys())
    if not expected - optional <= keys <= expected | optional:
        raise ReplyRejected(f"metric keys must be {sorted(expected - optional)} (optionally {sorted(optional)}), "
                            f"got {sorted(keys)}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not _finite_number(v) for v in values):
            raise ReplyRejected(f"metric {key!r} is not a finite number: {str(value)[:80]}")
    return dict(metrics)


def check_client_record(content: RecordDict, plan: ShardPlan | None, expected_pid: int | None = None,
                        claimed: Mapping[int, int] | None = None, node: int | None = None) -> int:
    """The ``client`` ConfigRecord: exact keys, a partition id the plan knows and nobody else claimed."""
    rec = content.config_records.get(KEY_CLIENT)
    if rec is None:
        raise ReplyRejected(f"no ConfigRecord {KEY_CLIENT!r}")
    if set(rec.keys()) != CLIENT_KEYS:
        raise ReplyRejected(f"{KEY_CLIENT!r} keys must be {sorted(CLIENT_KEYS)}, got {sorted(rec.keys())}")
    high = None if plan is None else plan.num_partitions - 1
    pid = _count(rec["partition-id"], "'partition-id'", 0, high)
    if expected_pid is not None and expected_pid >= 0 and pid != expected_pid:
        raise ReplyRejected(f"'partition-id' {pid} differs from the {expected_pid} this node reported before")
    for other, p in (claimed or {}).items():
        if p == pid and other != node:
            raise ReplyRejected(f"'partition-id' {pid} is already held by node {other}")
    size = _count(rec["shard-size"], "'shard-size'", 0, None)
    nbytes = _count(rec["shard-bytes"], "'shard-bytes'", 0, None)
    if plan is not None:
        # the server dealt the shards: a different size means a different partition (a SuperNode started
        # with another num-partitions trains on data the plan does not know) or a lie in the report
        want = plan.num_train[pid] + plan.num_holdout[pid]
        if size != want:
            raise ReplyRejected(f"'shard-size' {size} differs from the {want} images the plan deals partition {pid} "
                                "(a SuperNode with another num-partitions?)")
        if plan.image_bytes is not None and nbytes != size * plan.image_bytes:
            raise ReplyRejected(f"'shard-bytes' {nbytes} differs from {size} images x {plan.image_bytes} bytes")
    return pid


def claimed_partition(content: RecordDict) -> int | None:
    """The partition id a reply claims, for the failure report only (never trusted for anything else)."""
    try:
        value = content.config_records[KEY_CLIENT]["partition-id"]
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else None
    except (KeyError, TypeError, ValueError):
        return None


def _check_declared(arr: object, key: str, shape: tuple[int, ...], dtype: str) -> None:
    """Declared shape/dtype and the serialized size, before a single byte is decoded."""
    declared = (tuple(getattr(arr, "shape", ())), str(getattr(arr, "dtype", "")))
    if declared != (shape, dtype):
        raise ReplyRejected(f"array {key!r} is declared {declared[1]} {declared[0]}, expected {dtype} {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize if dtype != "bfloat16" else 0
    size = len(getattr(arr, "data", b""))
    if size > nbytes + _NPY_HEADER:
        raise ReplyRejected(f"array {key!r} carries {size} bytes, {dtype} {shape} needs {nbytes}")


def _decoded(arr: object, key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Decode and compare what actually arrived with what was declared (a header can lie)."""
    try:
        value = arr.numpy()  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - any decoding failure is the client's
        raise ReplyRejected(f"array {key!r} cannot be decoded: {type(err).__name__}: {err}") from err
    if tuple(value.shape) != shape or str(value.dtype) != dtype:
        raise ReplyRejected(f"array {key!r} decodes to {value.dtype} {tuple(value.shape)}, expected {dtype} {shape}")
    return value


def check_train_reply(content: RecordDict, signature: Mapping[str, tuple[tuple[int, ...], str]],
                      plan: ShardPlan | None = None, expected_pid: int | None = None,
                      claimed: Mapping[int, int] | None = None, node: int | None = None) -> int:
    """Raise :class:`ReplyRejected` unless ``content`` holds weights fitting the global model.

    Returns the sender's partition id (-1 when it is not checked: no client record and no plan).
    """
    if KEY_ARRAYS not in content.array_records:
        raise ReplyRejected(f"no ArrayRecord {KEY_ARRAYS!r} with weights")
    check_record_names(content, {KEY_ARRAYS}, {KEY_METRICS}, {KEY_CLIENT} if plan is not None else
                       ({KEY_CLIENT} if KEY_CLIENT in content.config_records else set()))
    arrays: ArrayRecord = content.array_records[KEY_ARRAYS]
    keys = list(arrays.keys())
    if set(keys) != set(signature):
        missing, extra = sorted(set(signature) - set(keys)), sorted(set(keys) - set(signature))
        raise ReplyRejected(f"weight keys differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key in keys:  # sizes first: nothing is decoded while any array is oversized
        _check_declared(arrays[key], key, *signature[key])
    for key in keys:
        value = _decoded(arrays[key], key, *signature[key])
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ReplyRejected(f"weight {key!r} holds NaN or Inf")
    metrics = check_metric_keys(content, TRAIN_METRICS)
    pid = -1
    if KEY_CLIENT in content.config_records or plan is not None:
        pid = check_client_record(content, plan, expected_pid, claimed, node)
    high = plan.num_train[pid] if plan is not None else None
    n = metrics.get("num-examples")
    if not _finite_number(n) or float(n) <= 0:  # type: ignore[arg-type]
        raise ReplyRejected(f"'num-examples' must be a positive number, got {n!r}")
    _count(n, "'num-examples' (FedAvg weight; the shard's training part)", 1, high)
    check_training_metrics(metrics)
    return pid


def check_training_metrics(metrics: Mapping[str, object]) -> None:
    """A reported loss is >= 0, an accuracy in [0, 1], a duration >= 0 (they reach rounds.csv and the report)."""
    for key, value in metrics.items():
        v = float(value)  # type: ignore[arg-type]  # check_metric_keys: finite numbers
        if key.endswith("-loss") and v < 0:
            raise ReplyRejected(f"{key!r} must be >= 0, got {value!r}")
        if key.endswith("-acc") and not 0.0 <= v <= 1.0:
            raise ReplyRejected(f"{key!r} must lie in [0, 1], got {value!r}")
        if key.endswith("-seconds") and v < 0:
            raise ReplyRejected(f"{key!r} must be >= 0, got {value!r}")


def check_safe_images(x: torch.Tensor, y: torch.Tensor, shortfall: np.ndarray, quota: Sequence[int],
                      num_classes: int, image_shape: Sequence[int] | None,
                      available: Sequence[int] | None = None) -> np.ndarray:
    """Check one safe-subset reply against its request; returns the images per class.

    ``available``: per class, images the client can still send (shard count - offset), from the plan.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ReplyRejected(f"images must be uint8 N x C x H x W, got {x.dtype} {tuple(x.shape)}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ReplyRejected(f"images are {tuple(x.shape[1:])}, the dataset has {tuple(image_shape)}")
    if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
        raise ReplyRejected(f"labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ReplyRejected(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if shortfall.shape != (num_classes,) or (shortfall < 0).any():
        raise ReplyRejected(f"shortfall must list {num_classes} non-negative counts, got {shortfall.tolist()}")
    counts = np.bincount(y.numpy(), minlength=num_classes)
    want = np.asarray(quota, dtype=np.int64)
    if (counts > want).any():
        raise ReplyRejected(f"sent {counts.tolist()} images per class, more than the quota {want.tolist()}")
    if not np.array_equal(counts + shortfall, want):
        raise ReplyRejected(f"images {counts.tolist()} + shortfall {shortfall.tolist()} do not add up to the quota {want.tolist()}")
    if available is not None and (counts > np.asarray(available)).any():
        raise ReplyRejected(f"sent {counts.tolist()} images per class, but its shard has only "
                            f"{np.maximum(np.asarray(available), 0).tolist()} left to send")
    return counts


def check_eval_reply(content: RecordDict, plan: ShardPlan | None = None, expected_pid: int | None = None,
                     claimed: Mapping[int, int] | None = None, node: int | None = None) -> int:
    """Raise :class:`ReplyRejected` unless ``content`` is a sane evaluate reply; returns the partition id."""
    metrics = content.metric_records.get(KEY_METRICS)
    if metrics is None:
        raise ReplyRejected(f"no MetricRecord {KEY_METRICS!r}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not _finite_number(value):
            raise ReplyRejected(f"metric {key!r} is {value!r}")
    if plan is not None or KEY_CLIENT in content.config_records:
        check_record_names(content, set(), {KEY_METRICS}, {KEY_CLIENT})
    m = check_metric_keys(content, EVAL_METRICS)
    pid = -1
    if KEY_CLIENT in content.config_records or plan is not None:
        pid = check_client_record(content, plan, expected_pid, claimed, node)
    # FedAvg weights the metrics by num-examples: a zero sum divides by zero, a negative one flips signs
    _count(m["num-examples"], "'num-examples' (the shard's held-out part)", 1,
           plan.num_holdout[pid] if plan is not None else None)
    acc = m.get("eval-acc")
    if not 0.0 <= float(acc) <= 1.0:  # type: ignore[arg-type]
        raise ReplyRejected(f"'eval-acc' must lie in [0, 1], got {acc!r}")
    if float(m["eval-loss"]) < 0:
        raise ReplyRejected(f"'eval-loss' must be >= 0, got {m['eval-loss']!r}")
    return pid


_EXC = re.compile(r"\b([A-Z]\w*(?:Error|Exception|Fault|Timeout)): (.+?)(?=\\n|\n|'>|\"|$)")


def _condense(reason: str) -> str:
    """One line: a remote traceback (Ray / Flower error reply) shrinks to its last exception line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    hits = [m for m in _EXC.finditer(text) if m.group(1) != "ClientAppException"]
    if hits:
        prefix = text.split(":", 1)[0] if ":" in text[:40] else ""
        text = f"{prefix}: {hits[-1].group(1)}: {hits[-1].group(2)}" if prefix else f"{hits[-1].group(1)}: {hits[-1].group(2)}"
    return " ".join(text.split())[:300]


@dataclass
class FailureLog:
    """Which client failed in which phase, and why (written to failures.csv / results.md)."""

    rows: list[dict] = field(default_factory=list)

    def add(self, phase: str, node_id: int, reason: str, round_: int | None = None,
            partition_id: int | None = None) -> None:
        row = {"phase": phase, "round": "" if round_ is None else round_, "node_id": int(node_id),
               "partition_id": "" if partition_id is None or partition_id < 0 else int(partition_id),
               "reason": _condense(str(reason))}
        self.rows.append(row)
        log(WARNING, "client failure: %s round %s node %s (partition %s): %s", phase, row["round"], node_id,
            "?" if row["partition_id"] == "" else row["partition_id"], row["reason"])

    def fill_partitions(self, partition_of: Mapping[int, int]) -> None:
        """Name the partition of nodes that failed before their partition was known."""
        known = {r["node_id"]: r["partition_id"] for r in self.rows if r["partition_id"] != ""}
        known.update({int(n): int(p) for n, p in partition_of.items() if p is not None and p >= 0})
        for row in self.rows:
            if row["partition_id"] == "" and row["node_id"] in known:
                row["partition_id"] = known[row["node_id"]]

    def write(self, run_dir: Path) -> Path | None:
        """failures.csv (always, header only when nothing failed) + a section appended to results.md."""
        path = write_dict_csv(run_dir / "failures.csv", ["phase", "round", "node_id", "partition_id", "reason"],
                              self.rows)
        md = run_dir / "results.md"
        if self.rows and md.is_file() and not md.is_symlink():
            text = md.read_text()
            marker = "\n## Client failures\n"
            text = text.split(marker)[0].rstrip("\n") + "\n" + marker + "\n" + self.markdown()
            write_text(md, text)
        return path

    def markdown(self) -> str:
        lines = ["| phase | round | node | partition | reason |", "|---|---|---|---|---|"]
        for r in self.rows:
            reason = r["reason"].replace("|", "/")
            lines.append(f"| {r['phase']} | {r['round']} | {r['node_id']} | {'?' if r['partition_id'] == '' else r['partition_id']} | {reason} |")
        clients = sorted({(r["node_id"], r["partition_id"]) for r in self.rows}, key=str)
        lines += ["", f"{len(clients)} client(s) failed at least once; the run went on with the clients "
                      "that answered (a failed reply was never averaged or pooled; a clipped update was "
                      "averaged at the norm bound)."]
        return "\n".join(lines) + "\n"
