"""Server-side checks of client replies, and the log of failed clients.

A client can crash, time out, or answer with garbage (a bug, a flipped bit, an attacker).
Every reply is checked before it touches the global model or the safe pool; a reply that
fails a check is rejected and its client counted as failed for that phase, exactly like a
client that raised. Checks:

* train    weights: same keys, shapes and dtypes as the global model, all finite;
           ``num-examples`` a positive finite number (FedAvg's weight);
* query    images uint8 C x H x W of the dataset, labels int64 in [0, classes), counts per
           class within the quota, counts + shortfall = quota, shortfall >= 0;
* evaluate metrics finite, accuracy in [0, 1].

:class:`FailureLog` collects (phase, round, node, partition, reason) rows and writes
``failures.csv`` and a section of ``results.md``.
"""

from __future__ import annotations

import csv
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

from common.records import KEY_ARRAYS, KEY_METRICS

__all__ = ["ReplyRejected", "FailureLog", "weight_signature", "check_train_reply", "check_safe_images",
           "check_eval_reply"]

_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64,
                np.dtype(np.int32): torch.int32, np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}


class ReplyRejected(ValueError):
    """A client's reply failed a server-side check; the message says which."""


def weight_signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, numpy dtype name) of the global model: what every train reply must match."""
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype) if v.dtype != torch.bfloat16 else "bfloat16")
            for k, v in state.items()}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def check_train_reply(content: RecordDict, signature: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise :class:`ReplyRejected` unless ``content`` holds weights fitting the global model."""
    if KEY_ARRAYS not in content.array_records:
        raise ReplyRejected(f"no ArrayRecord {KEY_ARRAYS!r} with weights")
    arrays: ArrayRecord = content.array_records[KEY_ARRAYS]
    keys = list(arrays.keys())
    if set(keys) != set(signature):
        missing, extra = sorted(set(signature) - set(keys)), sorted(set(keys) - set(signature))
        raise ReplyRejected(f"weight keys differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key in keys:
        arr = arrays[key]
        shape, dtype = signature[key]
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            raise ReplyRejected(f"weight {key!r} is {arr.dtype} {tuple(arr.shape)}, the global model has {dtype} {shape}")
        value = arr.numpy()
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ReplyRejected(f"weight {key!r} holds NaN or Inf")
    metrics = content.metric_records.get(KEY_METRICS)
    n = None if metrics is None else metrics.get("num-examples")
    if not _finite_number(n) or float(n) <= 0:  # type: ignore[arg-type]
        raise ReplyRejected(f"'num-examples' must be a positive number, got {n!r}")


def check_safe_images(x: torch.Tensor, y: torch.Tensor, shortfall: np.ndarray, quota: Sequence[int],
                      num_classes: int, image_shape: Sequence[int] | None) -> np.ndarray:
    """Check one safe-subset reply against its request; returns the images per class."""
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
    return counts


def check_eval_reply(content: RecordDict) -> None:
    metrics = content.metric_records.get(KEY_METRICS)
    if metrics is None:
        raise ReplyRejected(f"no MetricRecord {KEY_METRICS!r}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not _finite_number(value):
            raise ReplyRejected(f"metric {key!r} is {value!r}")
    acc = metrics.get("eval-acc")
    if acc is not None and not 0.0 <= float(acc) <= 1.0:  # type: ignore[arg-type]
        raise ReplyRejected(f"'eval-acc' must lie in [0, 1], got {acc!r}")


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
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "failures.csv"
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["phase", "round", "node_id", "partition_id", "reason"])
            w.writeheader()
            w.writerows(self.rows)
        md = run_dir / "results.md"
        if self.rows and md.is_file():
            text = md.read_text()
            marker = "\n## Client failures\n"
            text = text.split(marker)[0].rstrip("\n") + "\n" + marker + "\n" + self.markdown()
            md.write_text(text)
        return path

    def markdown(self) -> str:
        lines = ["| phase | round | node | partition | reason |", "|---|---|---|---|---|"]
        for r in self.rows:
            reason = r["reason"].replace("|", "/")
            lines.append(f"| {r['phase']} | {r['round']} | {r['node_id']} | {'?' if r['partition_id'] == '' else r['partition_id']} | {reason} |")
        clients = sorted({(r["node_id"], r["partition_id"]) for r in self.rows}, key=str)
        lines += ["", f"{len(clients)} client(s) failed at least once; the run went on with the clients "
                      "that answered (their replies were never averaged or pooled)."]
        return "\n".join(lines) + "\n"
