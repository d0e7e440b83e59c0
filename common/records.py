"""Model weights and image sets <-> Flower ``ArrayRecord``, and byte counting of records.

Both sides of the federation use these helpers so that what the server sends and what a
client answers are encoded the same way:

* a torch ``state_dict`` travels as an ``ArrayRecord`` with one ``Array`` per tensor
  (key = parameter name, dtype and shape preserved exactly);
* an image set travels as an ``ArrayRecord`` with keys ``x`` (uint8, N x C x H x W) and
  ``y`` (int64, N). The encoder still accepts ``indices`` for local use, but the ClientApp
  never sends them and the server refuses a safe reply that carries them: uploaded images are
  identified by :func:`image_keys` (a digest of their pixels), which reveals nothing the server
  does not already hold.

Images travel as uint8 on purpose: it is the format the device stores, 4x smaller than
float32, and it keeps the byte accounting honest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app import Array

__all__ = [
    "ImageSet",
    "state_dict_to_record",
    "record_to_state_dict",
    "images_to_record",
    "record_to_images",
    "record_bytes",
    "image_keys",
    "KEY_DSV",
    "DSV_ACTION",
    "MAX_ABS_PIXEL",
    "check_dsvs",
    "dsvs_to_record",
    "record_to_dsvs",
]

_IMAGE_KEYS = ("x", "y", "indices")


@dataclass
class ImageSet:
    """uint8 images with int64 labels (and, optionally, their training-set indices)."""

    x: torch.Tensor  # uint8, N x C x H x W
    y: torch.Tensor  # int64, N
    indices: torch.Tensor | None = None  # int64, N

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _to_numpy(value: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            # numpy has no bfloat16: refusing beats a silent lossy cast
            raise TypeError(f"{name}: bfloat16 tensors cannot travel in an ArrayRecord; cast them first")
        return value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _to_tensor(array: Array) -> torch.Tensor:
    # np.load may hand back a read-only buffer; torch warns on those, so copy once
    return torch.from_numpy(np.array(array.numpy(), copy=True))


def state_dict_to_record(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode a model ``state_dict`` (any dtypes numpy supports, on any device)."""
    record = ArrayRecord()
    for key, tensor in state_dict.items():
        record[key] = Array(_to_numpy(tensor, f"state_dict[{key!r}]"))
    return record


def record_to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` into a CPU ``state_dict`` (same key order, exact values)."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    return OrderedDict((key, _to_tensor(array)) for key, array in record.items())


def images_to_record(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray | None = None,
) -> ArrayRecord:
    """Encode an image set; ``x`` must be uint8 N x C x H x W, ``y`` and ``indices`` int64 N."""
    x_np = _to_numpy(x, "x")
    y_np = _to_numpy(y, "y")
    if x_np.dtype != np.uint8 or x_np.ndim != 4:
        raise ValueError(f"x must be uint8 with shape N x C x H x W, got {x_np.dtype} {x_np.shape}")
    if y_np.dtype != np.int64 or y_np.ndim != 1 or y_np.shape[0] != x_np.shape[0]:
        raise ValueError(f"y must be int64 with shape ({x_np.shape[0]},), got {y_np.dtype} {y_np.shape}")
    record = ArrayRecord()
    record["x"] = Array(x_np)
    record["y"] = Array(y_np)
    if indices is not None:
        i_np = _to_numpy(indices, "indices")
        if i_np.dtype != np.int64 or i_np.shape != y_np.shape:
            raise ValueError(f"indices must be int64 with shape {y_np.shape}, got {i_np.dtype} {i_np.shape}")
        record["indices"] = Array(i_np)
    return record


def record_to_images(record: ArrayRecord) -> ImageSet:
    """Decode an image set written by :func:`images_to_record`, checking what arrived."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    missing = [k for k in ("x", "y") if k not in record]
    unknown = sorted(set(record.keys()) - set(_IMAGE_KEYS))
    if missing or unknown:
        raise ValueError(f"not an image-set record: missing keys {missing}, unexpected keys {unknown}")
    images = ImageSet(
        x=_to_tensor(record["x"]),
        y=_to_tensor(record["y"]),
        indices=_to_tensor(record["indices"]) if "indices" in record else None,
    )
    # A peer could send anything: check before the server trusts it
    if images.x.dtype != torch.uint8 or images.x.ndim != 4:
        raise ValueError(f"image-set x must be uint8 N x C x H x W, got {images.x.dtype} {tuple(images.x.shape)}")
    n = images.x.shape[0]
    for name, value in (("y", images.y), ("indices", images.indices)):
        if value is not None and (value.dtype != torch.int64 or tuple(value.shape) != (n,)):
            raise ValueError(f"image-set {name} must be int64 with shape ({n},), got {value.dtype} {tuple(value.shape)}")
    return images


def image_keys(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """int64 content key of each uint8 image: the first 8 bytes of its BLAKE2b digest.

    How uploaded images are identified (pool order, the privacy audit's "never uploaded" bank):
    the server already holds the pixels, so a key derived from them tells it nothing new, unlike
    a training-set index, which would reveal where the image sits in the client's data. Byte-
    identical images share a key; the audit treats a private duplicate of an uploaded image as
    uploaded, which is the conservative reading.
    """
    arr = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
    if arr.dtype != np.uint8 or arr.ndim < 1:
        raise ValueError(f"image_keys expects uint8 images, got {arr.dtype} {arr.shape}")
    flat = arr.reshape(arr.shape[0], -1)
    keys = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
            for row in flat]
    return torch.tensor(keys, dtype=torch.int64)


def record_bytes(record: ArrayRecord | ConfigRecord | MetricRecord | RecordDict) -> int:
    """Payload bytes of a record as Flower counts them (array buffers, keys, scalar values).

    For a ``RecordDict`` this is the sum over its records plus their keys. Message
    framing/protobuf overhead is not included: this measures what the app chose to send.
    """
    if isinstance(record, RecordDict):
        return sum(len(key) + record_bytes(value) for key, value in record.items())
    if isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)):
        return int(record.count_bytes())
    raise TypeError(f"cannot count bytes of {type(record).__name__}")


# Keys of message contents, shared by the ServerApp and the ClientApp.
KEY_ARRAYS = "arrays"  # ArrayRecord: model weights (FedAvg's default arrayrecord_key)
KEY_CONFIG = "config"  # ConfigRecord: instructions (FedAvg's default configrecord_key)
KEY_METRICS = "metrics"  # MetricRecord: a reply's numbers ("num-examples" is FedAvg's weight)
KEY_SAFE = "safe"  # ArrayRecord: a safe subset (x, y, indices)
KEY_CLIENT = "client"  # ConfigRecord: who answered (partition-id, shard-size)
CFG_SCENARIO = "scenario-json"  # the resolved scenario as JSON, in every ConfigRecord the server sends


# ---------------------------------------------------------------- DSV uploads (privacy.mode no_model_access)

KEY_DSV = "dsv"  # ArrayRecord in the reply: x (float32 N x C x H x W, normalized), y (int64 N)
DSV_ACTION = "dsv"  # message_type "query.dsv" routes to the ClientApp's @app.query("dsv") handler
# A normalized pixel beyond this is not an image any more (Fashion-MNIST spans about -0.8..2.0):
# a diverged extraction or a malicious peer, either way the server refuses it.
MAX_ABS_PIXEL = 50.0


def check_dsvs(x: torch.Tensor, y: torch.Tensor, num_classes: int, ipc: int,
                image_shape: tuple[int, int, int], where: str) -> None:
    want = (num_classes * ipc, *image_shape)
    if not x.is_floating_point() or tuple(x.shape) != want:
        raise ValueError(f"{where}: x must be float normalized images of shape {want} ({ipc} per class), "
                         f"got {x.dtype} {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: x holds NaN/Inf pixels")
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak > MAX_ABS_PIXEL:
        raise ValueError(f"{where}: |pixel| reaches {peak:.3g} > {MAX_ABS_PIXEL}: not normalized images")
    if y.dtype != torch.int64 or tuple(y.shape) != (want[0],):
        raise ValueError(f"{where}: y must be int64 of shape ({want[0]},), got {y.dtype} {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts != ipc).any()):
        raise ValueError(f"{where}: expected {ipc} DSVs of every class, got counts {counts.tolist()}")


def dsvs_to_record(x: torch.Tensor, y: torch.Tensor) -> ArrayRecord:
    """float32 normalized images + int64 labels -> ArrayRecord (keys x, y)."""
    record = ArrayRecord()
    record["x"] = Array(x.detach().to("cpu", torch.float32).contiguous().numpy())
    record["y"] = Array(y.detach().to("cpu", torch.int64).contiguous().numpy())
    return record


def record_to_dsvs(record: ArrayRecord, num_classes: int, ipc: int,
                   image_shape: tuple[int, int, int], where: str = "DSV reply") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and validate a DSV upload: float, finite, plausibly normalized, ipc of every class."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{where}: expected an ArrayRecord, got {type(record).__name__}")
    if set(record.keys()) != {"x", "y"}:
        raise ValueError(f"{where}: a DSV record holds exactly the keys x and y, got {sorted(record.keys())}")
    x = torch.from_numpy(np.array(record["x"].numpy(), copy=True))
    y = torch.from_numpy(np.array(record["y"].numpy(), copy=True))
    if x.dtype != torch.float32:
        raise ValueError(f"{where}: x must be float32 normalized images, got {x.dtype}")
    check_dsvs(x, y, num_classes, ipc, tuple(image_shape), where)
    return x, y
