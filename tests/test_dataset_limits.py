"""Dataset files check declared sizes before allocating (issue #13, item 5)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from common.datasets import DatasetError, load_dataset
from tests.test_datasets import ds_write_cifar10


class _Huge:
    """Pickles as ``numpy.ndarray((n,), uint8)``: an allocation of n bytes when unpickled naively."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):  # noqa: ANN204
        return (np.ndarray, ((self.n,), np.dtype(np.uint8)))


class _HugeReconstruct(_Huge):
    def __reduce__(self):  # noqa: ANN204
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (self.n,), b"B"))


def _plant(folder: Path, batch: dict) -> None:
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


@pytest.mark.parametrize("kind", [_Huge, _HugeReconstruct])
def test_a_huge_declared_array_is_refused_unallocated(tmp_path: Path, kind: type) -> None:
    folder = tmp_path / "root" / "cifar-10-batches-py"
    ds_write_cifar10(folder)
    _plant(folder, {"data": kind(1_000_000_000_000), "labels": [0]})  # 931 GiB declared
    # refused from the declared shape: no MemoryError, a message naming the file and the size
    with pytest.raises(DatasetError, match=r"data_batch_3: cannot read CIFAR pickle batch: .*931\.3 GiB"):
        load_dataset("cifar10", root=tmp_path / "root", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("labels, match", [
    ([2**70, 0, 0, 0], r"'labels' holds '1180591620717411303424'.*integers in \[0, 10\)"),
    ([0, 1, 99, 0], r"'labels' holds '99'"),
    ([0, 1], r"'labels' should list 4 labels"),
    ("nope", r"'labels' should list 4 labels"),
])
def test_bad_labels_name_the_file(tmp_path: Path, labels: object, match: str) -> None:
    folder = tmp_path / "root" / "cifar-10-batches-py"
    ds_write_cifar10(folder)
    _plant(folder, {"data": np.zeros((4, 3072), np.uint8), "labels": labels})
    with pytest.raises(DatasetError, match=rf"data_batch_3: {match}"):
        load_dataset("cifar10", root=tmp_path / "root", cache_dir=tmp_path / "cache")
