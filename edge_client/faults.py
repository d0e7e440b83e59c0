"""Injected client faults for reliability tests (scenario section ``faults``).

The listed partitions misbehave in the listed phases:

* ``raise``            the handler raises :class:`InjectedFault` (Flower turns it into an error reply);
* ``timeout``          the handler sleeps past ``federation.reply_timeout_s``, then raises (so
                       even a late reply is an error);
* ``drop_after_train`` train is answered normally, every later phase (evaluate, query) raises;
* ``malformed``        a normal reply is built and then corrupted (wrong dtype, wrong shape,
                       NaN weights, out-of-range labels, over-quota counts). Which corruption is
                       picked from (faults.seed, partition id, phase, request), so runs repeat.

Nothing here runs unless ``faults.clients`` lists the client's partition.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from common.records import KEY_ARRAYS, KEY_METRICS, KEY_SAFE
from common.scenario import Scenario

__all__ = ["InjectedFault", "TRAIN_CORRUPTIONS", "QUERY_CORRUPTIONS", "is_faulty", "before_handler",
           "corrupt_reply"]

TRAIN_CORRUPTIONS = ("dtype", "shape", "nan", "missing_key")
QUERY_CORRUPTIONS = ("dtype", "shape", "label_range", "over_quota", "shortfall_shape")


class InjectedFault(RuntimeError):
    """A fault the scenario asked this client to simulate."""


def is_faulty(scenario: Scenario, partition_id: int, phase: str) -> bool:
    """Does this client misbehave in ``phase``? (drop_after_train: every phase but train)."""
    f = scenario.faults
    if not f.clients or partition_id not in f.clients:
        return False
    if f.mode == "drop_after_train":
        return phase != "train"
    return phase in f.phases


def before_handler(scenario: Scenario, partition_id: int, phase: str) -> None:
    """Called first in each handler: raise / time out when the scenario says so."""
    if not is_faulty(scenario, partition_id, phase):
        return
    mode = scenario.faults.mode
    if mode == "timeout":
        # sleep just past the server's deadline: the server must not wait for this reply
        time.sleep(scenario.federation.reply_timeout_s + 1.0)
        raise InjectedFault(f"client {partition_id}: injected timeout in {phase}")
    if mode in ("raise", "drop_after_train"):
        raise InjectedFault(f"client {partition_id}: injected {mode} fault in {phase}")


def _kind(scenario: Scenario, partition_id: int, phase: str, salt: int, kinds: tuple[str, ...]) -> str:
    rng = np.random.default_rng([scenario.faults.seed, partition_id, len(phase), salt, 0xFA17])
    return kinds[int(rng.integers(len(kinds)))]


def corrupt_reply(scenario: Scenario, partition_id: int, phase: str, content: RecordDict,
                  salt: int = 0, kind: str | None = None) -> tuple[RecordDict, str]:
    """Malformed mode: corrupt a finished reply in place; returns it and the corruption's name."""
    if scenario.faults.mode != "malformed" or not is_faulty(scenario, partition_id, phase):
        return content, ""
    if phase == "train":
        kind = kind or _kind(scenario, partition_id, phase, salt, TRAIN_CORRUPTIONS)
        arrays: ArrayRecord = content[KEY_ARRAYS]
        key = next(iter(arrays.keys()))
        value = arrays[key].numpy()
        if kind == "dtype":
            arrays[key] = Array(value.astype(np.float64))
        elif kind == "shape":
            arrays[key] = Array(np.concatenate([value.reshape(-1), np.zeros(1, value.dtype)]))
        elif kind == "nan":
            bad = value.copy()
            bad.reshape(-1)[0] = np.nan
            arrays[key] = Array(bad)
        else:  # missing_key
            del arrays[key]
        return content, kind
    if phase == "query":
        kind = kind or _kind(scenario, partition_id, phase, salt, QUERY_CORRUPTIONS)
        safe: ArrayRecord = content[KEY_SAFE]
        x, y = safe["x"].numpy(), safe["y"].numpy()
        if kind == "dtype":
            safe["x"] = Array(x.astype(np.float32))
        elif kind == "shape":
            safe["x"] = Array(np.ascontiguousarray(x[:, :, 1:, 1:]))
        elif kind == "label_range":
            safe["y"] = Array(np.full_like(y, 10_000))
        elif kind == "over_quota":
            # twice the images it was asked for (duplicates)
            safe["x"] = Array(np.concatenate([x, x]) if len(x) else np.zeros((2, *x.shape[1:]), np.uint8))
            safe["y"] = Array(np.concatenate([y, y]) if len(y) else np.zeros(2, np.int64))
            if "indices" in safe:
                idx = safe["indices"].numpy()
                safe["indices"] = Array(np.concatenate([idx, idx]) if len(idx) else np.zeros(2, np.int64))
        else:  # shortfall_shape
            metrics: MetricRecord = content[KEY_METRICS]
            metrics["shortfall"] = [0]
        return content, kind
    # evaluate: a metric out of range
    metrics = content[KEY_METRICS]
    metrics["eval-acc"] = float("nan")
    return content, "nan_metric"
