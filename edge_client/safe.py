"""Which of its images a client may share: the "safe subset".

Each client fixes, once, an order of its shard's images within every class (the device's own
``safe-policy``, edge_client/policy.py): ``random`` is a permutation seeded by the device's
``safe-seed`` and its partition id, ``first`` is the order the device stores them in (ascending
training-set index). A request names, per class, how many images the server already has from this client
(``offset``) and how many more it wants (``quota``); the client answers with positions
``offset .. offset + quota`` of that order. Being stateless keeps the protocol simple: a
follow-up request never re-sends an image and a repeated request gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SafeSelection", "class_orders", "select_safe", "POLICIES"]

POLICIES: tuple[str, ...] = ("random", "first")


@dataclass
class SafeSelection:
    positions: np.ndarray  # int64 positions into the shard, grouped by class
    shortfall: np.ndarray  # int64 per class: asked for but not available


def safe_seed(device_seed: int, partition_id: int) -> int:
    """Seed of a client's safe order: the device's own seed x its partition id (never the server's)."""
    return int(np.random.SeedSequence([int(device_seed), int(partition_id), 0x5AFE]).generate_state(1)[0])


def class_orders(
    labels: np.ndarray, global_indices: np.ndarray, num_classes: int, policy: str, seed: int
) -> list[np.ndarray]:
    """Per class, the shard positions in the order the client offers them."""
    if policy not in POLICIES:
        raise ValueError(f"safe.policy must be one of {list(POLICIES)}, got {policy!r}")
    labels = np.asarray(labels)
    global_indices = np.asarray(global_indices)
    rng = np.random.default_rng(seed)
    orders = []
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)
        if policy == "first":
            pos = pos[np.argsort(global_indices[pos], kind="stable")]
        else:
            pos = rng.permutation(pos)
        orders.append(pos.astype(np.int64))
    return orders


def select_safe(orders: list[np.ndarray], quota: list[int] | np.ndarray, offset: list[int] | np.ndarray) -> SafeSelection:
    """Take ``quota[c]`` images of class c after the first ``offset[c]`` (what was sent before)."""
    num_classes = len(orders)
    quota_a = np.asarray(quota, dtype=np.int64)
    offset_a = np.asarray(offset, dtype=np.int64)
    if quota_a.shape != (num_classes,) or offset_a.shape != (num_classes,):
        raise ValueError(
            f"safe request needs one quota and one offset per class ({num_classes}), "
            f"got {quota_a.shape[0] if quota_a.ndim else 'scalar'} and {offset_a.shape[0] if offset_a.ndim else 'scalar'}"
        )
    if (quota_a < 0).any() or (offset_a < 0).any():
        raise ValueError(f"safe request: quota and offset must be >= 0, got quota={quota_a.tolist()} offset={offset_a.tolist()}")
    chosen, shortfall = [], np.zeros(num_classes, dtype=np.int64)
    for c, order in enumerate(orders):
        take = order[offset_a[c] : offset_a[c] + quota_a[c]]
        shortfall[c] = quota_a[c] - take.shape[0]
        chosen.append(take)
    positions = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return SafeSelection(positions=positions.astype(np.int64), shortfall=shortfall)
