"""Cached artifacts of a run, as plain ``torch.save`` files (no Flower objects inside):

- model artifact  ``{"state_dict": ..., "arch": {...}, "dataset": name, "extra": {...}}``
  (the trained global model theta*);
- safe artifact   ``{"x": uint8 N×C×H×W, "y": int64 N, "dataset": name, "extra": {...}}``
  (the pooled safe set T');
- synthetic artifact ``{"x": float N×C×H×W (normalized), "y": int64 N, "method", "ipc",
  "pipc", "dataset", "info"}`` (a distilled set S).

Every write is atomic and confined to its run folder (``common.atomic``: temporary file in the
same folder + ``os.replace``, no write through a link), so a crash never leaves a half-written
file behind. Every load validates the contents and names the file in its error: the file is a
regular file (no link) under :data:`MAX_TORCH_FILE_BYTES`; every tensor in it has at most
:data:`MAX_TENSOR_DIMS` dimensions, each at most :data:`MAX_TENSOR_DIM`, no stride 0 and no more
elements than its storage holds (a few bytes of storage cannot pose as a huge tensor); images,
labels and weights are contiguous with storage equal to their size; a model's ``arch`` stays
within the scenario's model limits before anything is built. ``ArtifactError`` is a ``ValueError``.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from common.atomic import atomic_torch_save
from common.datasets import get_meta
from common.models import build_model
from common.scenario import ModelConfig

__all__ = [
    "ArtifactError",
    "MAX_TORCH_FILE_BYTES",
    "MAX_TENSOR_DIMS",
    "MAX_TENSOR_DIM",
    "check_tensor",
    "load_torch_file",
    "ModelArtifact",
    "SafeArtifact",
    "SyntheticArtifact",
    "save_model_artifact",
    "load_model_artifact",
    "build_model_from_artifact",
    "save_safe_artifact",
    "load_safe_artifact",
    "save_synthetic_artifact",
    "load_synthetic_artifact",
]


MAX_TORCH_FILE_BYTES = 4 << 30  # the largest artifact: every CIFAR training image as a uint8 pool is 150 MB
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = 1 << 31


class ArtifactError(ValueError):
    """An artifact file is missing, unreadable or holds the wrong contents."""


def check_tensor(t: Tensor, where: str, contiguous: bool = False) -> None:
    """Refuse a tensor whose shape is out of bounds, that repeats its storage (stride 0, overlap) or that
    claims more elements than its storage holds; ``contiguous``: its storage must be exactly its size."""
    shape = tuple(t.shape)
    if t.dim() > MAX_TENSOR_DIMS or any(d > MAX_TENSOR_DIM for d in shape):
        raise ArtifactError(f"{where}: tensor shape {shape} is out of bounds (at most {MAX_TENSOR_DIMS} dimensions "
                            f"of at most {MAX_TENSOR_DIM})")
    if t.numel() == 0:
        return
    if any(st == 0 and d > 1 for st, d in zip(t.stride(), shape)):
        raise ArtifactError(f"{where}: tensor of shape {shape} has stride {tuple(t.stride())}: a stride of 0 repeats "
                            "one stored element; artifact tensors are stored densely")
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        raise ArtifactError(f"{where}: tensor of shape {shape} needs {need} bytes but its storage holds {have}")
    if contiguous and (not t.is_contiguous() or have != need or t.storage_offset() != 0):
        raise ArtifactError(f"{where}: tensor of shape {shape} must be stored contiguously on its own "
                            f"(storage {have} bytes for {need})")


def _dense(t: Tensor) -> Tensor:
    """``t`` on the CPU, contiguous, with a storage of exactly its size (a view of a larger tensor is copied),
    as :func:`check_tensor` with ``contiguous`` expects it back."""
    t = t.detach().cpu().contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _check_tensors(obj: Any, where: str, depth: int = 0) -> None:
    if depth > 32:
        raise ArtifactError(f"{where}: nested more than 32 levels deep")
    if isinstance(obj, Tensor):
        check_tensor(obj, where)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _check_tensors(v, where, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_tensors(v, where, depth + 1)


def load_torch_file(path: str | os.PathLike[str], what: str = "artifact") -> Any:
    """The project's only ``torch.load``: CPU, ``weights_only=True`` (tensors and plain containers;
    a planted pickle cannot run code), every failure an :class:`ArtifactError` naming the file.

    tests/test_run_folder_integrity.py fails if any other module calls torch.load / pickle."""
    path = Path(path)
    if path.is_symlink():
        raise ArtifactError(f"{what} file {path} is a symbolic link; artifacts are read only from their own files")
    if not path.is_file():
        raise ArtifactError(f"{what} file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_TORCH_FILE_BYTES:
        raise ArtifactError(f"{what} file {path} is {size} bytes, over the {MAX_TORCH_FILE_BYTES}-byte limit")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign files
        raise ArtifactError(f"{what} file {path} cannot be read as a torch.save file (weights only): {exc}") from exc
    _check_tensors(obj, f"{what} file {path}")
    return obj


def _load_dict(path: str | os.PathLike[str], what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    obj = load_torch_file(path, what)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} file {path} must hold a dict, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ArtifactError(f"{what} file {path} lacks key(s) {missing}; it has {sorted(obj)}")
    return obj


def _check_dataset(obj: Mapping[str, Any], path: Path, what: str, dataset: str | None) -> str:
    name = obj["dataset"]
    if not isinstance(name, str):
        raise ArtifactError(f"{what} file {path}: 'dataset' must be a string, got {name!r}")
    if dataset is not None and _canon(name) != _canon(dataset):
        raise ArtifactError(f"{what} file {path} is for dataset {name!r}, but {dataset!r} was asked for")
    return name


def _canon(name: str) -> str:
    try:
        return get_meta(name).name
    except Exception:  # unknown names compare verbatim
        return name.strip().lower()


# --------------------------------------------------------------------------- model


@dataclass
class ModelArtifact:
    state_dict: dict[str, Tensor]
    arch: dict[str, Any]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_model_artifact(
    path: str | os.PathLike[str],
    model: nn.Module | Mapping[str, Tensor],
    arch: Mapping[str, Any] | None,
    dataset: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write theta* (a module or its state_dict) with its architecture and dataset name."""
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    sd = {k: _dense(v.clone()) for k, v in sd.items()}
    payload = {"state_dict": sd, "arch": dict(arch or {}), "dataset": dataset, "extra": dict(extra or {})}
    return atomic_torch_save(payload, path)


def load_model_artifact(path: str | os.PathLike[str], dataset: str | None = None) -> ModelArtifact:
    """Read and check a model artifact (``dataset``: the name it must be for, if given)."""
    path = Path(path)
    obj = _load_dict(path, "model", ("state_dict", "arch", "dataset"))
    sd, arch = obj["state_dict"], obj["arch"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ArtifactError(f"model file {path}: 'state_dict' must be a non-empty dict of tensors")
    if arch is None:
        arch = {}
    if not isinstance(arch, dict):
        raise ArtifactError(f"model file {path}: 'arch' must be a dict, got {type(arch).__name__}")
    _check_arch(arch, f"model file {path}")
    for k, v in sd.items():
        check_tensor(v, f"model file {path}: state_dict[{k!r}]", contiguous=True)
    name = _check_dataset(obj, path, "model", dataset)
    extra = obj.get("extra") or {}
    return ModelArtifact(state_dict=sd, arch=arch, dataset=name, extra=dict(extra), path=path)


def _check_arch(arch: Mapping[str, Any], where: str) -> None:
    """The arch's width and depth within the scenario's model limits (common.scenario.ModelConfig)."""
    for f in dataclasses.fields(ModelConfig):
        value, limit = arch.get(f.name), f.metadata.get("limit")
        if limit is None or value is None:
            continue
        if type(value) is not int or not 0 < value <= limit:
            raise ArtifactError(f"{where}: arch {f.name}={value!r} is out of bounds (an int in 1..{limit})")


def build_model_from_artifact(artifact: ModelArtifact, meta: Any) -> nn.Module:
    """``build_model(meta, artifact.arch)`` with the stored weights loaded strictly.

    Shape / key mismatches (wrong architecture or dataset) raise ``ArtifactError``
    naming the file.
    """
    where = artifact.path if artifact.path is not None else "<in-memory model artifact>"
    _check_arch(artifact.arch, f"model file {where}")
    try:
        model = build_model(meta, artifact.arch)
    except ValueError as exc:
        raise ArtifactError(f"model file {where}: bad 'arch' {artifact.arch}: {exc}") from exc
    try:
        model.load_state_dict(artifact.state_dict, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"model file {where}: weights do not fit arch {artifact.arch} on dataset "
            f"{getattr(meta, 'name', meta)!r}: {exc}"
        ) from exc
    return model


# --------------------------------------------------------------------------- safe set


@dataclass
class SafeArtifact:
    x: Tensor  # uint8 N×C×H×W
    y: Tensor  # int64 N
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _check_images(x: Any, y: Any, where: Any, meta: Any | None, x_dtype: torch.dtype | None,
                  stored: bool = True) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ArtifactError(f"{where}: 'x' and 'y' must be tensors")
    if x_dtype is not None and x.dtype != x_dtype:
        raise ArtifactError(f"{where}: 'x' must have dtype {x_dtype}, got {x.dtype}")
    if x_dtype is None and not x.is_floating_point():
        raise ArtifactError(f"{where}: 'x' must be a float tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ArtifactError(f"{where}: 'x' must be N×C×H×W, got shape {tuple(x.shape)}")
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ArtifactError(
            f"{where}: 'y' must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
        )
    if meta is not None:
        want = (int(meta.channels), int(meta.height), int(meta.width))
        if tuple(x.shape[1:]) != want:
            raise ArtifactError(
                f"{where}: images are {tuple(x.shape[1:])} but dataset {meta.name!r} has {want}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= int(meta.num_classes)):
            raise ArtifactError(
                f"{where}: labels must lie in [0, {meta.num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )
    if stored:  # read back from a file: each tensor dense and on its own storage
        check_tensor(x, f"{where}: 'x'", contiguous=True)
        check_tensor(y, f"{where}: 'y'", contiguous=True)


def save_safe_artifact(
    path: str | os.PathLike[str],
    x: Tensor,
    y: Tensor,
    dataset: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the pooled safe set T' (uint8 images, int64 labels)."""
    _check_images(x, y, f"safe set for {path}", None, torch.uint8, stored=False)
    payload = {"x": _dense(x), "y": _dense(y),
               "dataset": dataset, "extra": dict(extra or {})}
    return atomic_torch_save(payload, path)


def load_safe_artifact(
    path: str | os.PathLike[str], dataset: str | None = None, meta: Any | None = None
) -> SafeArtifact:
    """Read and check a safe-set artifact (against ``meta``'s image shape and classes if given)."""
    path = Path(path)
    obj = _load_dict(path, "safe", ("x", "y", "dataset"))
    name = _check_dataset(obj, path, "safe", dataset if dataset is not None else getattr(meta, "name", None))
    _check_images(obj["x"], obj["y"], f"safe file {path}", meta, torch.uint8)
    return SafeArtifact(x=obj["x"], y=obj["y"], dataset=name, extra=dict(obj.get("extra") or {}), path=path)


# --------------------------------------------------------------------------- synthetic set


@dataclass
class SyntheticArtifact:
    x: Tensor  # normalized float N×C×H×W
    y: Tensor  # int64 N
    method: str
    ipc: int
    pipc: int
    dataset: str
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_synthetic_artifact(
    path: str | os.PathLike[str],
    syn: Any,
    dataset: str,
    pipc: int,
) -> Path:
    """Write a ``SyntheticSet`` (x, y, method, ipc, info) with its dataset and pipc."""
    payload = {
        "x": _dense(syn.x.detach().to(torch.float32)),
        "y": _dense(syn.y.detach().to(torch.int64)),
        "method": syn.method,
        "ipc": int(syn.ipc),
        "pipc": int(pipc),
        "dataset": dataset,
        "info": _plain(syn.info),
    }
    return atomic_torch_save(payload, path)


def load_synthetic_artifact(
    path: str | os.PathLike[str], dataset: str | None = None, meta: Any | None = None,
    cell: tuple[str, int] | None = None,
) -> SyntheticArtifact:
    """Read and check a synthetic-set artifact (``cell``: the (method, pipc) of the cell it must belong to)."""
    path = Path(path)
    obj = _load_dict(path, "synthetic", ("x", "y", "method", "ipc", "dataset"))
    name = _check_dataset(obj, path, "synthetic", dataset if dataset is not None else getattr(meta, "name", None))
    _check_images(obj["x"], obj["y"], f"synthetic file {path}", meta, None)
    if cell is not None and (obj["method"], obj.get("pipc")) != tuple(cell):
        raise ArtifactError(f"synthetic file {path} holds a set of method {obj['method']!r} pipc {obj.get('pipc')}, "
                            f"not of its cell (method {cell[0]!r} pipc {cell[1]}): another cell's set; delete it to "
                            "recompute the cell")
    return SyntheticArtifact(
        x=obj["x"], y=obj["y"], method=str(obj["method"]), ipc=int(obj["ipc"]),
        pipc=int(obj.get("pipc", -1)), dataset=name, info=dict(obj.get("info") or {}), path=path,
    )


def _plain(value: Any) -> Any:
    """Make ``info`` loadable with ``weights_only=True`` (plain containers, numbers, strings, tensors)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)
