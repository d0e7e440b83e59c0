"""Splitting a labelled training set over federated clients.

Schemes (all deterministic for a seed, parts disjoint and covering every index):

- ``iid``: a seeded random permutation cut into ``num_clients`` near-equal parts.
- ``dirichlet``: label skew. For every class, the proportions of its samples
  that go to each client are drawn from Dir(α·1); small α concentrates a class
  on few clients, large α approaches IID. Draws that leave a client with no
  sample are redrawn (same seeded generator) up to ``MAX_DIRICHLET_DRAWS``
  times, then a ``ValueError`` says which settings to change.
- ``shards``: the pathological split of McMahan et al. (2017). Indices are
  sorted by label (random order within a class), cut into
  ``num_clients * shards_per_client`` contiguous shards, and each client gets
  ``shards_per_client`` shards chosen at random: at most that many classes
  when the shard size divides every class size (60000 / 200 = 300 for the
  classic 100-client MNIST split), otherwise a shard may straddle two classes.

Also ``class_histogram`` (clients × classes counts), ``format_histogram`` (a
markdown table for reports) and ``label_skew`` (one number for the skew).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

__all__ = [
    "MAX_DIRICHLET_DRAWS",
    "SCHEMES",
    "class_histogram",
    "format_histogram",
    "label_skew",
    "partition_indices",
]

SCHEMES = ("iid", "dirichlet", "shards")
MAX_DIRICHLET_DRAWS = 1000


def _as_labels(labels: np.ndarray | Tensor | Sequence[int]) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array of class ids, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels: expected integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError(f"labels: class ids must be >= 0, found {y.min()}")
    return y


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def partition_indices(
    labels: np.ndarray | Tensor,
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` over ``num_clients`` clients.

    Returns one sorted int64 index array per client; the arrays are disjoint,
    together cover every index, are never empty, and depend only on the
    arguments. ``alpha`` is used by ``dirichlet``, ``shards_per_client`` by
    ``shards``. Invalid arguments raise ``ValueError`` naming the parameter.
    """
    y = _as_labels(labels)
    n = len(y)
    num_clients = _check_int("num_clients", num_clients, 1)
    if num_clients > n:
        raise ValueError(f"num_clients: {num_clients} clients but only {n} samples; every client needs at least one")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    key = scheme.strip().lower() if isinstance(scheme, str) else scheme
    rng = np.random.default_rng(int(seed))
    if key == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif key == "dirichlet":
        parts = _dirichlet(y, num_clients, alpha, rng)
    elif key == "shards":
        parts = _shards(y, num_clients, shards_per_client, rng)
    else:
        raise ValueError(f"scheme: unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    is_number = isinstance(alpha, (int, float, np.number)) and not isinstance(alpha, bool)
    if not is_number or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: the Dirichlet concentration must be a finite number > 0, got {alpha!r}")
    classes = np.unique(y)
    class_idx = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    sizes = np.array([len(i) for i in class_idx], dtype=np.int64)
    for _ in range(MAX_DIRICHLET_DRAWS):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))  # classes × clients
        cuts = np.floor(np.cumsum(props, axis=1)[:, :-1] * sizes[:, None]).astype(np.int64)
        cuts = np.minimum(cuts, sizes[:, None])
        bounds = np.hstack([np.zeros((len(classes), 1), np.int64), cuts, sizes[:, None]])
        if np.diff(bounds, axis=1).sum(axis=0).min() >= 1:
            break
    else:
        raise ValueError(
            f"alpha: Dirichlet partition with alpha={alpha} left some of the {num_clients} clients without "
            f"samples in {MAX_DIRICHLET_DRAWS} draws ({len(y)} samples, {len(classes)} classes); "
            "use a larger alpha, fewer clients or more samples"
        )
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx, cut in zip(class_idx, cuts):
        for client, piece in enumerate(np.split(idx, cut)):
            chunks[client].append(piece)
    return [np.concatenate(c) for c in chunks]


def _shards(y: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    per_client = _check_int("shards_per_client", per_client, 1)
    num_classes = len(np.unique(y))
    if per_client > num_classes:
        raise ValueError(f"shards_per_client: {per_client} exceeds the {num_classes} classes in the labels")
    num_shards = num_clients * per_client
    if num_shards > len(y):
        raise ValueError(
            f"shards_per_client: {num_clients} clients × {per_client} shards = {num_shards} shards "
            f"exceed the {len(y)} samples"
        )
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]  # by label, random within a class
    shards = np.array_split(order, num_shards)
    owners = rng.permutation(num_shards).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in owners]


def class_histogram(labels: np.ndarray | Tensor, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts per client and class: int64 array ``len(parts) × num_classes``."""
    y = _as_labels(labels)
    num_classes = _check_int("num_classes", num_classes, 1)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"num_classes: labels go up to {y.max()}, so num_classes={num_classes} is too small")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        hist[i] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist


def label_skew(hist: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one.

    0 for identical label mixes; approaches 1 when clients hold disjoint classes.
    Clients without samples are ignored.
    """
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"hist: expected a clients × classes array, got shape {h.shape}")
    sizes = h.sum(axis=1)
    h = h[sizes > 0]
    if len(h) == 0:
        return 0.0
    pooled = h.sum(axis=0) / h.sum()
    local = h / h.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(local - pooled).sum(axis=1).mean())


def format_histogram(hist: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """Markdown table: one row per client, one column per class, totals row and column."""
    h = np.asarray(hist)
    if h.ndim != 2:
        raise ValueError(f"hist: expected a clients × classes array, got shape {h.shape}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(h.shape[1])]
    if len(names) != h.shape[1]:
        raise ValueError(f"class_names: {len(names)} names for a histogram with {h.shape[1]} classes")

    def row(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(["client", *names, "total"]), "|" + "---:|" * (len(names) + 2)]
    lines += [row([i, *r.tolist(), int(r.sum())]) for i, r in enumerate(h)]
    lines.append(row(["all", *h.sum(axis=0).tolist(), int(h.sum())]))
    return "\n".join(lines)
