"""Tests for common/partition.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.partition import (
    class_histogram,
    format_histogram,
    label_skew,
    partition_indices,
)

CONFIGS = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet", {"alpha": 10.0}),
    ("shards", {"shards_per_client": 2}),
    ("shards", {"shards_per_client": 3}),
]


def ds_labels(n: int = 2000, num_classes: int = 10, seed: int = 123) -> np.ndarray:
    """Mildly imbalanced labels so that class sizes differ."""
    rng = np.random.default_rng(seed)
    p = np.linspace(1.0, 2.0, num_classes)
    return rng.choice(num_classes, size=n, p=p / p.sum())


@pytest.mark.parametrize("scheme,kw", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 17])
def test_invariants(scheme: str, kw: dict, seed: int) -> None:
    y = ds_labels()
    parts = partition_indices(y, 7, scheme, seed=seed, **kw)
    assert len(parts) == 7
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and len(p) > 0
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates inside a part
    joined = np.concatenate(parts)
    assert len(joined) == len(y)  # disjoint ...
    assert np.array_equal(np.sort(joined), np.arange(len(y)))  # ... and covering
    again = partition_indices(y, 7, scheme, seed=seed, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # deterministic
    other = partition_indices(y, 7, scheme, seed=seed + 1000, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))  # seed matters


def test_tensor_and_numpy_labels_agree() -> None:
    y = ds_labels(300)
    for scheme, kw in CONFIGS:
        a = partition_indices(y, 4, scheme, seed=5, **kw)
        b = partition_indices(torch.from_numpy(y), 4, scheme, seed=5, **kw)
        assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_iid_sizes_balanced_and_labels_mixed() -> None:
    y = ds_labels(2003)
    parts = partition_indices(y, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(class_histogram(y, parts, 10)) < 0.1


def test_shards_limit_classes_per_client() -> None:
    y = np.repeat(np.arange(10), 100)
    for k in (1, 2, 5):  # shard sizes 100, 50, 20 divide the class size: at most k classes each
        parts = partition_indices(y, 10, "shards", seed=4, shards_per_client=k)
        hist = class_histogram(y, parts, 10)
        assert ((hist > 0).sum(axis=1) <= k).all()
        assert {len(p) for p in parts} == {100}
    # shards of 33/34 samples straddle class borders: each shard still spans at most 2 classes
    hist = class_histogram(y, partition_indices(y, 10, "shards", seed=4, shards_per_client=3), 10)
    assert ((hist > 0).sum(axis=1) <= 6).all() and hist.sum() == len(y)
    # one shard per client of a sorted, equal-class set: every client holds exactly one class
    hist = class_histogram(y, partition_indices(y, 10, "shards", seed=0, shards_per_client=1), 10)
    assert sorted(hist.argmax(axis=1).tolist()) == list(range(10)) and label_skew(hist) == pytest.approx(0.9)


def test_dirichlet_skew_decreases_with_alpha() -> None:
    y = ds_labels(5000)
    skew = {}
    for alpha in (0.1, 0.5, 10.0):
        skew[alpha] = np.mean([
            label_skew(class_histogram(y, partition_indices(y, 10, "dirichlet", seed=s, alpha=alpha), 10))
            for s in range(5)
        ])
    assert skew[0.1] > skew[0.5] + 0.1
    assert skew[0.5] > skew[10.0] + 0.1
    assert skew[10.0] < 0.15
    # small alpha: most of a client's data comes from few classes
    hist = class_histogram(y, partition_indices(y, 10, "dirichlet", seed=0, alpha=0.1), 10)
    top2 = np.sort(hist, axis=1)[:, -2:].sum(axis=1) / hist.sum(axis=1)
    assert np.median(top2) > 0.7


def test_dirichlet_impossible_raises_clear_error() -> None:
    with pytest.raises(ValueError, match="alpha.*without samples"):
        partition_indices(np.zeros(5, dtype=np.int64), 5, "dirichlet", alpha=0.001)


@pytest.mark.parametrize("kwargs,param", [
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 2.5}, "num_clients"),
    ({"num_clients": 101}, "num_clients"),
    ({"num_clients": 3, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
    ({"num_clients": 3, "scheme": "dirichlet", "alpha": -1.0}, "alpha"),
    ({"num_clients": 3, "scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
    ({"num_clients": 3, "scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
    ({"num_clients": 3, "scheme": "shards", "shards_per_client": 11}, "shards_per_client"),
    ({"num_clients": 60, "scheme": "shards", "shards_per_client": 2}, "shards_per_client"),
    ({"num_clients": 3, "scheme": "label-flip"}, "scheme"),
    ({"num_clients": 3, "seed": "x"}, "seed"),
])
def test_bad_parameters_name_the_parameter(kwargs: dict, param: str) -> None:
    y = np.repeat(np.arange(10), 10)  # 100 samples, 10 classes
    with pytest.raises(ValueError, match=param) as info:
        partition_indices(y, **kwargs)
    value = next(v for k, v in kwargs.items() if k == param)
    assert str(value) in str(info.value)


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        partition_indices(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="labels"):
        partition_indices(np.array([0, -1, 2]), 2)
    with pytest.raises(ValueError, match="labels"):
        partition_indices(np.array([0.5, 1.0]), 2)


def test_class_histogram_counts() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    hist = class_histogram(y, parts, 4)
    assert hist.dtype == np.int64
    assert hist.tolist() == [[1, 0, 1, 0], [0, 2, 2, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        class_histogram(y, parts, 2)
    assert label_skew(np.array([[5, 0], [0, 5]])) == pytest.approx(0.5)
    assert label_skew(np.array([[3, 3], [2, 2]])) == pytest.approx(0.0)


def test_format_histogram_markdown() -> None:
    hist = np.array([[1, 0, 2], [3, 4, 0]])
    text = format_histogram(hist, ["cat", "dog", "a|b"])
    lines = text.splitlines()
    assert lines[0] == "| client | cat | dog | a\\|b | total |"
    assert lines[1] == "|---:|---:|---:|---:|---:|"
    assert lines[2] == "| 0 | 1 | 0 | 2 | 3 |"
    assert lines[3] == "| 1 | 3 | 4 | 0 | 7 |"
    assert lines[4] == "| all | 4 | 4 | 2 | 10 |"
    assert format_histogram(hist).splitlines()[0] == "| client | 0 | 1 | 2 | total |"
    with pytest.raises(ValueError, match="class_names"):
        format_histogram(hist, ["cat"])
