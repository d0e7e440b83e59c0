"""ArrayRecord round trips: model state dicts and uint8 image sets come back bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.records import (
    images_to_record,
    record_bytes,
    record_to_images,
    record_to_state_dict,
    state_dict_to_record,
)


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),  # 0-dim
        "half": torch.randn(4, generator=g).half(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
    }


def test_state_dict_round_trip_exact() -> None:
    sd = _mixed_state_dict()
    back = record_to_state_dict(state_dict_to_record(sd))
    assert list(back) == list(sd)  # key order preserved
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype, key
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


def test_model_state_dict_loads_back() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(2, 1, 8, 8))  # materialize the lazy layer
    record = state_dict_to_record(model.state_dict())
    clone = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    clone.load_state_dict(record_to_state_dict(record))
    for (k, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), k


def test_state_dict_rejects_bfloat16() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        state_dict_to_record({"w": torch.zeros(2, dtype=torch.bfloat16)})


@pytest.mark.parametrize("with_indices", [False, True])
def test_image_set_round_trip_exact(with_indices: bool) -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(13, 3, 32, 32), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, size=13)).long()
    idx = torch.arange(100, 113, dtype=torch.int64) if with_indices else None
    images = record_to_images(images_to_record(x, y, idx))
    assert images.x.dtype == torch.uint8 and images.y.dtype == torch.int64
    assert torch.equal(images.x, x) and torch.equal(images.y, y)
    assert len(images) == 13
    if with_indices:
        assert images.indices is not None and images.indices.dtype == torch.int64
        assert torch.equal(images.indices, idx)
    else:
        assert images.indices is None


def test_image_set_accepts_numpy_and_empty() -> None:
    x = np.zeros((0, 1, 28, 28), dtype=np.uint8)
    y = np.zeros((0,), dtype=np.int64)
    images = record_to_images(images_to_record(x, y, y.copy()))
    assert images.x.shape == (0, 1, 28, 28) and len(images) == 0


@pytest.mark.parametrize(
    "x, y",
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)),  # float images
        (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)),  # 3-D
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32)),  # int32 labels
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)),  # length mismatch
    ],
)
def test_image_set_rejects_bad_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        images_to_record(x, y)


def test_record_to_images_rejects_foreign_record() -> None:
    record = state_dict_to_record({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="not an image-set record"):
        record_to_images(record)


def test_record_bytes_counts_payload() -> None:
    x = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.int64)
    images = images_to_record(x, y)
    n = record_bytes(images)
    # the buffers themselves plus small numpy headers and the keys
    assert 10 * 784 + 10 * 8 <= n < 10 * 784 + 10 * 8 + 1024
    content = RecordDict({"safe": images, "meta": ConfigRecord({"partition-id": 1}), "m": MetricRecord({"n": 10})})
    assert record_bytes(content) > n
    with pytest.raises(TypeError):
        record_bytes({"x": 1})  # type: ignore[arg-type]


def test_empty_record_round_trip() -> None:
    assert record_to_state_dict(ArrayRecord()) == {}
