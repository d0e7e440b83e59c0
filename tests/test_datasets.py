"""Tests for common/datasets.py and common/device.py (small synthetic files in tmp_path)."""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common import datasets
from common.datasets import (
    DATASETS,
    DatasetError,
    balanced_subset_indices,
    denormalize,
    get_meta,
    load_dataset,
    normalize,
    to_uint8,
)
from common.device import pick_device

# --------------------------------------------------------------------------- file writers


def ds_write_idx(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def ds_write_mnist_family(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    tx = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ty = rng.integers(0, 10, n_train).astype(np.uint8)
    vx = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    vy = rng.integers(0, 10, n_test).astype(np.uint8)
    ext = ".gz" if gz else ""
    ds_write_idx(folder / f"train-images-idx3-ubyte{ext}", tx)
    ds_write_idx(folder / f"train-labels-idx1-ubyte{ext}", ty)
    ds_write_idx(folder / f"t10k-images-idx3-ubyte{ext}", vx)
    ds_write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", vy)
    return tx, ty, vx, vy


def ds_write_cifar10(folder: Path, n: int = 4, bytes_keys: bool = False, seed: int = 0) -> tuple:
    """Five train batches and a test batch of ``n`` images each, CIFAR python format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    xs, ys = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {key("batch_label"): key(name), key("labels"): labels, key("data"): data,
                 key("filenames"): [key(f"img{i}.png") for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        xs.append(data.reshape(n, 3, 32, 32))
        ys.append(np.array(labels))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_normalization_constants() -> None:
    assert set(DATASETS) == {"cifar10", "fashion-mnist", "mnist", "cifar100", "svhn"}
    c10 = get_meta("cifar10")
    assert (c10.channels, c10.height, c10.width, c10.num_classes) == (3, 32, 32, 10)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
    fm = get_meta("fashion-mnist")
    assert fm.image_shape == (1, 28, 28) and fm.mean == (0.2861,) and fm.std == (0.3530,)
    assert fm.class_names[0] == "T-shirt/top" and fm.class_names[9] == "Ankle boot"
    assert get_meta("mnist").mean == (0.1307,) and get_meta("mnist").std == (0.3081,)
    c100 = get_meta("cifar100")
    assert c100.num_classes == 100 and len(set(c100.class_names)) == 100
    assert c100.std == (0.2673, 0.2564, 0.2762)
    assert get_meta("svhn").mean == (0.4377, 0.4438, 0.4728)
    for meta in DATASETS.values():
        assert len(meta.mean) == len(meta.std) == meta.channels


def test_get_meta_aliases_and_unknown_name() -> None:
    assert get_meta("Fashion_MNIST").name == "fashion-mnist"
    assert get_meta("CIFAR-10").name == "cifar10"
    with pytest.raises(DatasetError, match="imagenet") as info:
        get_meta("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError):  # DatasetError is a ValueError
        load_dataset("nope")


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_batches_folder(tmp_path: Path, bytes_keys: bool) -> None:
    tx, ty, vx, vy = ds_write_cifar10(tmp_path / "root" / "cifar-10-batches-py", bytes_keys=bytes_keys)
    s = load_dataset("cifar10", root=tmp_path / "root", cache_dir=tmp_path / "cache")
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert tuple(s.train_x.shape) == (20, 3, 32, 32) and tuple(s.test_x.shape) == (4, 3, 32, 32)
    assert np.array_equal(s.train_x.numpy(), tx) and np.array_equal(s.train_y.numpy(), ty)
    assert np.array_equal(s.test_x.numpy(), vx) and np.array_equal(s.test_y.numpy(), vy)
    assert s.meta is get_meta("cifar10")
    assert s.source == str(tmp_path / "root" / "cifar-10-batches-py")


def test_cifar10_files_directly_in_root(tmp_path: Path) -> None:
    tx, ty, _, _ = ds_write_cifar10(tmp_path, n=3, seed=5)
    s = load_dataset("cifar10", root=str(tmp_path), cache_dir=tmp_path / "cache")
    assert np.array_equal(s.train_x.numpy(), tx) and np.array_equal(s.train_y.numpy(), ty)
    # pixel layout: row-major 3072 = 3 planes of 32×32
    assert s.train_x[0, 1, 0, 0] == tx.reshape(-1, 3072)[0, 1024]


def test_cifar100_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for split, n in (("train", 6), ("test", 2)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / split, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [0] * n}, fh)
        expected[split] = (data.reshape(n, 3, 32, 32), np.array(fine))
    s = load_dataset("cifar100", root=tmp_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(s.train_x.numpy(), expected["train"][0])
    assert np.array_equal(s.train_y.numpy(), expected["train"][1])
    assert np.array_equal(s.test_y.numpy(), expected["test"][1])


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,subdir", [
    ("fashion-mnist", ""), ("fashion-mnist", "FashionMNIST/raw"), ("fashion-mnist", "fashion-mnist/raw"),
    ("mnist", ""), ("mnist", "MNIST/raw"), ("mnist", "mnist/raw"),
])
def test_idx_files(tmp_path: Path, name: str, subdir: str, gz: bool) -> None:
    root = tmp_path / "root"
    tx, ty, vx, vy = ds_write_mnist_family(root / subdir, gz=gz)
    s = load_dataset(name, root=root, cache_dir=tmp_path / "cache")
    assert s.train_x.dtype == torch.uint8 and s.test_y.dtype == torch.int64
    assert tuple(s.train_x.shape) == (12, 1, 28, 28) and tuple(s.test_x.shape) == (5, 1, 28, 28)
    assert np.array_equal(s.train_x.numpy()[:, 0], tx) and np.array_equal(s.train_y.numpy(), ty)
    assert np.array_equal(s.test_x.numpy()[:, 0], vx) and np.array_equal(s.test_y.numpy(), vy)
    assert s.train_x.is_contiguous() and s.train_x.numpy().flags.writeable


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    ds_write_mnist_family(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "cache")


def test_labels_out_of_range_rejected(tmp_path: Path) -> None:
    ds_write_mnist_family(tmp_path, gz=False)
    ds_write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 10, np.uint8))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 10\)"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "cache")


def test_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    ds_write_cifar10(tmp_path, n=2)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "evil": print}, fh)
    with pytest.raises(DatasetError, match="refusing to load global builtins.print"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")


def test_numpy1_pickle_globals_are_accepted(tmp_path: Path) -> None:
    """The published CIFAR batches name numpy.core.multiarray._reconstruct (numpy 1.x)."""
    tx, ty, _, _ = ds_write_cifar10(tmp_path, n=2, seed=9)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = (tmp_path / name).read_bytes()
        assert b"numpy._core.multiarray\n_reconstruct" in raw
        (tmp_path / name).write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation warning either
        s = load_dataset("cifar10", root=tmp_path, cache=False)
    assert np.array_equal(s.train_x.numpy(), tx) and np.array_equal(s.train_y.numpy(), ty)


@pytest.mark.skipif(not datasets.DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian(tmp_path: Path) -> None:
    s = load_dataset("fashion-mnist", cache_dir=tmp_path)
    assert tuple(s.train_x.shape) == (60000, 1, 28, 28) and tuple(s.test_x.shape) == (10000, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert torch.bincount(s.train_y).tolist() == [6000] * 10
    assert torch.bincount(s.test_y).tolist() == [1000] * 10
    assert s.source == str(datasets.DEBIAN_FASHION_MNIST)


# --------------------------------------------------------------------------- not found / download


def test_not_found_lists_every_place_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing_debian = tmp_path / "no-debian"
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", missing_debian)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", root=root, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    for place in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist" / "raw", missing_debian):
        assert str(place) in msg
    assert "missing train-images-idx3-ubyte[.gz]" in msg
    assert "not attempted" in msg
    assert "data.root" in msg and "dataset-fashion-mnist" in msg and "data.download: true" in msg


def test_not_found_without_root_mentions_download_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPDD_CACHE", str(tmp_path / "envcache"))
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", root="")  # "" = not set
    msg = str(info.value)
    assert str(tmp_path / "envcache" / "data" / "cifar-10-batches-py") in msg
    assert "dataset-fashion-mnist" not in msg  # that fix is for fashion-mnist only


def test_download_path_uses_target_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    calls: list[Path] = []

    def fake_download(layout: object, target: Path) -> None:
        calls.append(target)
        ds_write_mnist_family(target / "FashionMNIST" / "raw", gz=True)  # torchvision's layout
        return None

    monkeypatch.setattr(datasets, "_download", fake_download)
    s = load_dataset("fashion-mnist", download=True, cache_dir=tmp_path / "c")
    assert calls == [tmp_path / "c" / "data"]
    assert tuple(s.train_x.shape) == (12, 1, 28, 28)
    # the files are now found without downloading again
    s2 = load_dataset("fashion-mnist", download=False, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and torch.equal(s.train_x, s2.train_x)


def test_failed_download_reports_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_download", lambda layout, target: "URLError: no network")
    with pytest.raises(DatasetError, match="URLError: no network"):
        load_dataset("svhn", root=tmp_path, download=True, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_reparse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds_write_mnist_family(tmp_path / "root", gz=True, n_train=50)
    first = load_dataset("mnist", root=tmp_path / "root", cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "datasets").glob("mnist-*.npz"))
    assert len(cached) == 1
    assert not list((tmp_path / "cache" / "datasets").glob("*.tmp"))

    def boom(path: Path) -> np.ndarray:
        raise AssertionError(f"parser called for {path}")

    monkeypatch.setattr(datasets, "_read_idx", boom)
    second = load_dataset("mnist", root=tmp_path / "root", cache_dir=tmp_path / "cache")
    for a, b in ((first.train_x, second.train_x), (first.train_y, second.train_y),
                 (first.test_x, second.test_x), (first.test_y, second.test_y)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # cache=False ignores the cache and so parses again
    with pytest.raises(AssertionError, match="parser called"):
        load_dataset("mnist", root=tmp_path / "root", cache_dir=tmp_path / "cache", cache=False)


def test_cache_invalidated_when_source_changes(tmp_path: Path) -> None:
    ds_write_cifar10(tmp_path, n=2, seed=1)
    a = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    _, _, vx, _ = ds_write_cifar10(tmp_path, n=2, seed=2)  # same sizes, new content
    st = (tmp_path / "test_batch").stat()
    os.utime(tmp_path / "test_batch", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(b.test_x.numpy(), vx) and not torch.equal(a.test_x, b.test_x)


def test_env_cache_dir_and_corrupt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPDD_CACHE", str(tmp_path / "envcache"))
    ds_write_mnist_family(tmp_path / "root", gz=False)
    a = load_dataset("mnist", root=tmp_path / "root")
    (cache_file,) = (tmp_path / "envcache" / "datasets").glob("mnist-*.npz")
    cache_file.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        b = load_dataset("mnist", root=tmp_path / "root")
    assert torch.equal(a.train_x, b.train_x)
    assert np.load(cache_file)["train_x"].shape == (12, 1, 28, 28)  # rewritten


# --------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("name", ["cifar10", "fashion-mnist"])
def test_normalize_denormalize_round_trip(name: str) -> None:
    meta = get_meta(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, *meta.image_shape), dtype=torch.uint8, generator=g)
    xn = normalize(x, meta)
    assert xn.dtype == torch.float32 and xn.shape == x.shape
    mean = torch.tensor(meta.mean).view(-1, 1, 1)
    std = torch.tensor(meta.std).view(-1, 1, 1)
    assert torch.allclose(xn, (x.float() / 255 - mean) / std)
    assert torch.allclose(denormalize(xn, meta), x.float() / 255, atol=1e-6)
    assert torch.equal(to_uint8(xn, meta), x)
    assert torch.equal(to_uint8(normalize(x[0], meta), meta), x[0])  # single C×H×W image
    far = denormalize(xn * 100, meta)
    assert far.min() >= 0 and far.max() <= 1


def test_normalize_rejects_bad_input() -> None:
    meta = get_meta("cifar10")
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(2, 3, 32, 32), meta)
    with pytest.raises(ValueError, match="cifar10"):
        normalize(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), meta)


def test_limit_is_class_balanced_and_seeded(tmp_path: Path) -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    idx = balanced_subset_indices(labels, 12, seed=3)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [4, 4, 4]
    assert torch.equal(idx, balanced_subset_indices(labels, 12, seed=3))
    counts = torch.bincount(labels[balanced_subset_indices(labels, 20, seed=0)]).tolist()
    assert counts[2] == 5 and sorted(counts[:2]) == [7, 8]  # the small class is exhausted
    assert len(balanced_subset_indices(labels, None)) == 85
    with pytest.raises(ValueError, match="data.train_limit"):
        balanced_subset_indices(labels, -1, what="data.train_limit")
    ds_write_mnist_family(tmp_path, gz=False, n_train=40, n_test=10)
    s = load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c").limit(train_limit=10, test_limit=None)
    assert len(s.train_x) == len(s.train_y) == 10 and len(s.test_x) == 10


# --------------------------------------------------------------------------- device


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device() == pick_device("auto")
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                pick_device(spec)
    else:
        assert pick_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_one_registry_of_dataset_names() -> None:
    """common/dataset_meta.py names the datasets; the scenario's choices and the file layouts follow it."""
    from common.dataset_meta import DATASETS as REGISTRY
    from common.datasets import _LAYOUTS
    from common.scenario import DATASETS, DataConfig
    import dataclasses

    assert tuple(REGISTRY) == DATASETS
    assert set(_LAYOUTS) == set(REGISTRY)
    field = {f.name: f for f in dataclasses.fields(DataConfig)}["dataset"]
    assert field.metadata["choices"] == DATASETS and field.metadata["help"] == " | ".join(DATASETS)
