"""Dataset registry, offline-first loading, decoded-array cache and normalization.

Every dataset comes back in one shape whatever its source: ``uint8`` image
tensors ``N×C×H×W`` and ``int64`` labels, for a train and a test split, plus
its :class:`DatasetMeta` (class names, image shape, normalization statistics).

Where the files are looked for, in order (the first complete set wins):

1. the explicit folder ``root`` (the scenario's ``data.root``), in the layouts
   the original archives and torchvision use:

   - CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` or the same
     files directly in ``root`` (python pickle batches);
   - CIFAR-100: ``cifar-100-python/{train,test}`` or directly in ``root``;
   - MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte``
     etc., raw or ``.gz``) directly in ``root``, in ``root/<name>/raw`` or in
     torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``;
   - SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (read with scipy);

2. Fashion-MNIST only: the Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``);
3. without ``root``: the download folder ``<cache>/data`` (what an earlier
   ``download=True`` left there);
4. only when ``download=True``: a torchvision download into ``root`` (or
   ``<cache>/data``), then parsed like case 1.

CIFAR pickles and IDX files are parsed here with numpy (no torchvision needed
for local files). The pickles go through an unpickler that only admits the
numpy globals an array needs, so a stray pickle cannot run code. Decoded
arrays are cached as an ``.npz`` under ``<cache>/datasets`` (``<cache>`` =
``cache_dir`` argument, else ``$FEDPDD_CACHE``, else ``~/.cache/fedpdd``),
keyed by the dataset name, the source folder and the size and mtime of every
source file, and written atomically (temporary file + ``os.replace``), so
concurrent client processes may race on the first load safely.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from common.dataset_meta import DATASETS, DatasetError, DatasetMeta, get_meta

if TYPE_CHECKING:  # common.scenario imports nothing from here; the annotation only
    from common.scenario import Scenario

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DatasetError",
    "DatasetMeta",
    "DatasetSplits",
    "balanced_subset_indices",
    "cache_root",
    "denormalize",
    "federation_train_set",
    "get_meta",
    "load_dataset",
    "normalize",
    "to_uint8",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_CACHE_VERSION = 1


@dataclass
class DatasetSplits:
    """Both splits of a dataset as uint8 ``N×C×H×W`` images and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    meta: DatasetMeta
    source: str = field(default="", compare=False)  # folder the files came from
    # training images held out from every client (data.validation_size): they score hyperparameter choices
    val_x: Tensor | None = None
    val_y: Tensor | None = None

    def limit(self, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0,
              validation_size: int = 0) -> "DatasetSplits":
        """A class-balanced, seeded subset of each split (``None`` or 0 keeps a split whole).

        ``validation_size`` > 0 first takes that many class-balanced training images out as the
        validation split; ``train_limit`` then draws from the rest, so no client ever holds one."""
        train_x, train_y, val_x, val_y = self.train_x, self.train_y, None, None
        if validation_size:
            if validation_size >= len(train_y):
                raise ValueError(f"data.validation_size: {validation_size} leaves no training images "
                                 f"(the training split has {len(train_y)})")
            va = balanced_subset_indices(train_y, validation_size, seed + 1, what="data.validation_size")
            rest = torch.ones(len(train_y), dtype=torch.bool)
            rest[va] = False
            val_x, val_y = train_x[va], train_y[va]
            train_x, train_y = train_x[rest], train_y[rest]
        tr = balanced_subset_indices(train_y, train_limit, seed, what="data.train_limit")
        te = balanced_subset_indices(self.test_y, test_limit, seed, what="data.test_limit")
        return DatasetSplits(
            train_x=train_x[tr], train_y=train_y[tr],
            test_x=self.test_x[te], test_y=self.test_y[te],
            meta=self.meta, source=self.source, val_x=val_x, val_y=val_y,
        )

    def scoring_split(self, split: str) -> tuple[Tensor, Tensor]:
        """(images, labels) that score synthetic sets: ``test`` or ``validation`` (evaluation.split)."""
        if split == "test":
            return self.test_x, self.test_y
        if split == "validation" and self.val_x is not None and self.val_y is not None:
            return self.val_x, self.val_y
        raise ValueError(f"evaluation.split {split!r}: this dataset view has no such split "
                         "(data.validation_size is 0?)")


def balanced_subset_indices(labels: np.ndarray | Tensor, n: int | None, seed: int = 0,
                            what: str = "n") -> Tensor:
    """Sorted indices of ``n`` samples, spread over the classes as evenly as possible.

    Within each class the samples are chosen at random (seeded); ``None``, 0 or
    ``n >= len(labels)`` selects everything. ``what`` names the setting in errors.
    """
    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    total = len(y)
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0):
        raise ValueError(f"{what}: expected a non-negative integer or None, got {n!r}")
    if n is None or n == 0 or n >= total:
        return torch.arange(total)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(total)
    shuffled = y[perm]
    order = np.argsort(shuffled, kind="stable")
    sorted_y = shuffled[order]
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total) - np.searchsorted(sorted_y, sorted_y, side="left")
    # round-robin over classes: all rank-0 samples first, then rank 1, ...
    chosen = perm[np.lexsort((np.arange(total), rank))[:n]]
    return torch.from_numpy(np.sort(chosen))


# --------------------------------------------------------------------------- normalization


def _stats(meta: DatasetMeta, like: Tensor) -> tuple[Tensor, Tensor]:
    if like.dim() < 3 or like.shape[-3] != meta.channels:
        raise ValueError(
            f"{meta.name}: expected images shaped (..., {meta.channels}, H, W), got {tuple(like.shape)}"
        )
    dtype = like.dtype if like.is_floating_point() else torch.float32
    mean = torch.tensor(meta.mean, dtype=dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(meta.std, dtype=dtype, device=like.device).view(-1, 1, 1)
    return mean, std


def normalize(x_uint8: Tensor, meta: DatasetMeta) -> Tensor:
    """uint8 images (``C×H×W`` or ``N×C×H×W``) -> float32 ``(x/255 - mean) / std`` per channel."""
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize: expected uint8 images in [0, 255], got dtype {x_uint8.dtype}")
    mean, std = _stats(meta, x_uint8)
    return (x_uint8.to(torch.float32) / 255.0 - mean) / std


def denormalize(x: Tensor, meta: DatasetMeta) -> Tensor:
    """Normalized images -> floats in [0, 1] (clamped), e.g. for image grids."""
    mean, std = _stats(meta, x)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return (x * std + mean).clamp_(0.0, 1.0)


def to_uint8(x: Tensor, meta: DatasetMeta) -> Tensor:
    """Normalized images -> uint8 in [0, 255] (inverse of :func:`normalize`, up to rounding)."""
    return (denormalize(x, meta) * 255.0).round_().to(torch.uint8)


# --------------------------------------------------------------------------- file parsers

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read file: {exc}") from exc


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format) holding unsigned bytes.

    The header is read first and the size it declares is bounded (:data:`MAX_ARRAY_BYTES`) before the
    data is read, so a small gzipped file cannot inflate into gigabytes before it is refused."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DatasetError(f"{path}: not an IDX file (bad magic number)")
            if head[2] != 0x08:
                raise DatasetError(f"{path}: IDX element type 0x{head[2]:02x} is not supported (expected 0x08, "
                                   "unsigned byte)")
            ndim = head[3]
            raw_dims = fh.read(4 * ndim)
            if ndim < 1 or len(raw_dims) < 4 * ndim:
                raise DatasetError(f"{path}: truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">i4", count=ndim))
            expected = 1
            for d in dims:
                expected *= d
            if any(d < 0 for d in dims) or expected > MAX_ARRAY_BYTES:
                raise DatasetError(f"{path}: IDX header declares {dims} = {expected} bytes, over the "
                                   f"{MAX_ARRAY_BYTES}-byte limit of one dataset array; refused before reading it")
            buf = fh.read(expected + 1)  # one byte more: a file longer than its header says is refused
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read file: {exc}") from exc
    if len(buf) != expected:
        raise DatasetError(
            f"{path}: IDX header promises {dims} = {expected} bytes of data, file holds "
            f"{len(buf) if len(buf) <= expected else 'more'}"
        )
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


MAX_ARRAY_BYTES = 1 << 30  # one array of a dataset file (CIFAR-100 train is 150 MB); larger is refused unallocated


def _check_alloc(shape: object, dtype: object, where: str = "array") -> None:
    """Refuse an array whose declared size is absurd *before* numpy allocates it."""
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    try:
        n = 1
        for d in dims:
            d = int(d)
            if d < 0:
                raise ValueError(f"negative dimension {d}")
            n *= d
        size = n * np.dtype(dtype).itemsize
    except (TypeError, ValueError, OverflowError) as exc:
        raise pickle.UnpicklingError(f"{where}: unusable declared shape {shape!r} / dtype {dtype!r}: {exc}") from exc
    if size > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"{where}: declared shape {tuple(dims)} of {dtype} is {size / 2**30:.1f} GiB, "
                                     f"more than the {MAX_ARRAY_BYTES / 2**30:.0f} GiB a dataset array may hold")


class _CheckedNdarray(np.ndarray):
    """Stands in for ``numpy.ndarray`` while unpickling: a constructor call with a huge shape fails
    before allocating (the pickle may call ``ndarray(shape)`` or ``_reconstruct(ndarray, shape, ...)``)."""

    def __new__(cls, shape, dtype=float, *args, **kwargs):  # noqa: ANN001, ANN204 - numpy's signature
        _check_alloc(shape, dtype)
        return super().__new__(cls, shape, dtype, *args, **kwargs)


def _checked_reconstruct(subtype, shape, dtype):  # noqa: ANN001, ANN202 - numpy's private signature
    from numpy._core.multiarray import _reconstruct

    _check_alloc(shape, dtype)
    return _reconstruct(subtype, shape, dtype)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays (size-checked)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> object:
        allowed = (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType"))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are expected)")
        if name == "ndarray":
            return _CheckedNdarray
        if name == "_reconstruct":
            return _checked_reconstruct
        if module.startswith("numpy.core."):  # numpy 1.x pickles under numpy 2.x
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path, label_key: str, meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, MemoryError, OverflowError) as exc:
        raise DatasetError(f"{path}: cannot read CIFAR pickle batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict in the CIFAR pickle batch, got {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetError(f"{path}: CIFAR pickle batch has no {key!r} entry (keys: {sorted(batch)})")
    data = batch["data"]
    c, h, w = meta.image_shape
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != c * h * w:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' should be a uint8 array of shape (N, {c * h * w}), got {got}")
    data = np.asarray(data).view(np.ndarray)
    raw = batch[label_key]
    if not isinstance(raw, (list, np.ndarray)) or len(raw) != data.shape[0]:
        raise DatasetError(f"{path}: {label_key!r} should list {data.shape[0]} labels (one per image), "
                           f"got {type(raw).__name__} of length {len(raw) if hasattr(raw, '__len__') else '?'}")
    if isinstance(raw, list) and any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < meta.num_classes
                                     for v in raw):
        bad = next(v for v in raw if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < meta.num_classes)
        raise DatasetError(f"{path}: {label_key!r} holds {str(bad)[:40]!r}; labels must be integers in "
                           f"[0, {meta.num_classes})")
    try:
        labels = np.asarray(raw, dtype=np.int64).reshape(-1)
    except (OverflowError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integer labels: {exc}") from exc
    if labels.size and (labels.min() < 0 or labels.max() >= meta.num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {meta.num_classes}), got [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, c, h, w), labels


def _parse_cifar10(files: dict[str, Path], meta: DatasetMeta) -> Arrays:
    train = [_read_cifar_pickle(files[f"data_batch_{i}"], "labels", meta) for i in range(1, 6)]
    test_x, test_y = _read_cifar_pickle(files["test_batch"], "labels", meta)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y)


def _parse_cifar100(files: dict[str, Path], meta: DatasetMeta) -> Arrays:
    train_x, train_y = _read_cifar_pickle(files["train"], "fine_labels", meta)
    test_x, test_y = _read_cifar_pickle(files["test"], "fine_labels", meta)
    return train_x, train_y, test_x, test_y


def _parse_idx_pair(images: Path, labels: Path, meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images)
    y = _read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (meta.height, meta.width):
        raise DatasetError(f"{images}: expected images of shape (N, {meta.height}, {meta.width}), got {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{labels}: expected a 1-D label file, got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x.reshape(len(x), 1, meta.height, meta.width), y.astype(np.int64)


def _parse_idx(files: dict[str, Path], meta: DatasetMeta) -> Arrays:
    return (*_parse_idx_pair(files["train_images"], files["train_labels"], meta),
            *_parse_idx_pair(files["test_images"], files["test_labels"], meta))


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        from scipy.io import loadmat  # optional dependency, only SVHN needs it
    except ImportError as exc:
        raise DatasetError(
            f"{path}: reading SVHN .mat files needs scipy, which is not installed (pip install scipy)"
        ) from exc
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises a variety of types for corrupt files
        raise DatasetError(f"{path}: cannot read .mat file: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: SVHN .mat file should hold 'X' and 'y'")
    x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)  # H, W, C, N -> N, C, H, W
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # digit 0 is stored as label 10
    return x, y


def _parse_svhn(files: dict[str, Path], meta: DatasetMeta) -> Arrays:
    return (*_read_svhn_mat(files["train"]), *_read_svhn_mat(files["test"]))


# --------------------------------------------------------------------------- file layouts


def _idx_names(stem: str) -> tuple[str, ...]:
    return (stem, stem + ".gz")


_IDX_FILES = {
    "train_images": _idx_names("train-images-idx3-ubyte"),
    "train_labels": _idx_names("train-labels-idx1-ubyte"),
    "test_images": _idx_names("t10k-images-idx3-ubyte"),
    "test_labels": _idx_names("t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class _Layout:
    files: dict[str, tuple[str, ...]]  # logical key -> accepted file names, preferred first
    subdirs: tuple[str, ...]  # where under a root to look ("" = the root itself)
    parse: Callable[[dict[str, Path], DatasetMeta], Arrays]
    torchvision: str  # class name in torchvision.datasets


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        files={k: (k,) for k in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]},
        subdirs=("cifar-10-batches-py", ""), parse=_parse_cifar10, torchvision="CIFAR10",
    ),
    "cifar100": _Layout(
        files={"train": ("train",), "test": ("test",)},
        subdirs=("cifar-100-python", ""), parse=_parse_cifar100, torchvision="CIFAR100",
    ),
    "mnist": _Layout(
        files=_IDX_FILES, subdirs=("", "mnist/raw", "MNIST/raw", "mnist"), parse=_parse_idx, torchvision="MNIST",
    ),
    "fashion-mnist": _Layout(
        files=_IDX_FILES, subdirs=("", "fashion-mnist/raw", "FashionMNIST/raw", "fashion-mnist"),
        parse=_parse_idx, torchvision="FashionMNIST",
    ),
    "svhn": _Layout(
        files={"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        subdirs=("", "svhn", "SVHN"), parse=_parse_svhn, torchvision="SVHN",
    ),
}


def _locate(layout: _Layout, folder: Path) -> tuple[dict[str, Path] | None, str]:
    """The layout's files in ``folder``, or ``None`` and why not."""
    if not folder.is_dir():
        return None, "no such folder"
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, names in layout.files.items():
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            missing.append(names[0] + ("[.gz]" if len(names) > 1 else ""))
        else:
            found[key] = path
    if missing:
        return None, "missing " + ", ".join(missing)
    return found, ""


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FEDPDD_CACHE``, else ``~/.cache/fedpdd``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDPDD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedpdd"


def _cache_key(name: str, folder: Path, files: dict[str, Path]) -> str:
    entries = []
    for key in sorted(files):
        st = files[key].stat()
        entries.append([key, str(files[key].resolve()), st.st_size, st.st_mtime_ns])
    return json.dumps({"v": _CACHE_VERSION, "name": name, "folder": str(folder.resolve()), "files": entries})


def _cache_path(root: Path, name: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return root / "datasets" / f"{name}-{digest}.npz"


_ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


def _read_cache(path: Path, key: str, meta: DatasetMeta) -> Arrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            arrays = tuple(npz[n] for n in _ARRAY_NAMES)
        _check_arrays(arrays, meta, str(path))
        return arrays  # type: ignore[return-value]
    except Exception as exc:  # a corrupt or foreign cache file must never block loading
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(path: Path, key: str, arrays: Arrays) -> None:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, key=np.array(key), **dict(zip(_ARRAY_NAMES, arrays)))
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _check_arrays(arrays: Arrays, meta: DatasetMeta, where: str) -> None:
    for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != meta.image_shape:
            raise DatasetError(f"{where}: {split} images should be uint8 N×{'×'.join(map(str, meta.image_shape))}, "
                               f"got {x.dtype} {x.shape}")
        if y.shape != (len(x),):
            raise DatasetError(f"{where}: {split} has {len(x)} images but labels of shape {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= meta.num_classes):
            raise DatasetError(f"{where}: {split} labels must lie in [0, {meta.num_classes}), "
                               f"found range [{y.min()}, {y.max()}]")


# --------------------------------------------------------------------------- loading


def _to_tensor(a: np.ndarray, dtype: np.dtype) -> Tensor:
    return torch.from_numpy(np.require(a, dtype=dtype, requirements=["C", "W"]))


def _load_from(meta: DatasetMeta, layout: _Layout, folder: Path, files: dict[str, Path],
               cache_dir: Path, use_cache: bool) -> DatasetSplits:
    arrays: Arrays | None = None
    key = _cache_key(meta.name, folder, files)
    path = _cache_path(cache_dir, meta.name, key)
    if use_cache:
        arrays = _read_cache(path, key, meta)
    if arrays is None:
        arrays = layout.parse(files, meta)
        _check_arrays(arrays, meta, str(folder))
        if use_cache:
            _write_cache(path, key, arrays)
    tx, ty, vx, vy = arrays
    return DatasetSplits(
        train_x=_to_tensor(tx, np.uint8), train_y=_to_tensor(ty, np.int64),
        test_x=_to_tensor(vx, np.uint8), test_y=_to_tensor(vy, np.int64),
        meta=meta, source=str(folder),
    )


def _download(layout: _Layout, target: Path) -> str | None:
    """Fetch with torchvision into ``target``; return an error text or ``None``."""
    try:
        import torchvision.datasets as tvd

        target.mkdir(parents=True, exist_ok=True)
        cls = getattr(tvd, layout.torchvision)
        if layout.torchvision == "SVHN":
            for split in ("train", "test"):
                cls(root=str(target), split=split, download=True)
        else:
            cls(root=str(target), train=True, download=True)
            cls(root=str(target), train=False, download=True)
    except Exception as exc:  # network, checksum, missing scipy for SVHN, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def load_dataset(name: str, root: str | Path | None = None, download: bool = False,
                 cache_dir: Path | None = None, *, cache: bool = True) -> DatasetSplits:
    """Load both splits of dataset ``name`` (see the module docstring for the search order).

    ``root``: folder holding the dataset files (``data.root``; ``None`` or ``""``
    for none); ``download``: allow a torchvision download into ``root`` (or
    ``<cache>/data``) when nothing is found locally; ``cache_dir``: cache root (default
    ``$FEDPDD_CACHE`` or ``~/.cache/fedpdd``); ``cache=False`` skips the
    decoded-array cache. Raises :class:`DatasetError` naming every place tried.
    """
    meta = get_meta(name)
    layout = _LAYOUTS[meta.name]
    cdir = cache_root(cache_dir)
    if root is not None and not str(root).strip():
        root = None  # "" means "not set" (TOML run configs have no null)
    places: list[tuple[Path, str]] = []
    if root is not None:
        root = Path(root).expanduser()
        places += [(root / sub if sub else root, "data.root") for sub in layout.subdirs]
    if meta.name == "fashion-mnist":
        places.append((DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"))
    target = root if root is not None else cdir / "data"
    if root is None:
        places += [(target / sub if sub else target, "download folder") for sub in layout.subdirs]

    tried: list[str] = []
    for folder, why in places:
        files, problem = _locate(layout, folder)
        if files is not None:
            return _load_from(meta, layout, folder, files, cdir, cache)
        tried.append(f"{folder} ({why}): {problem}")

    if download:
        error = _download(layout, target)
        for sub in layout.subdirs:
            folder = target / sub if sub else target
            files, _ = _locate(layout, folder)
            if files is not None:
                return _load_from(meta, layout, folder, files, cdir, cache)
        tried.append(f"torchvision download into {target}: "
                     + (error or "finished, but the expected files were not found afterwards"))
    else:
        tried.append(f"torchvision download into {target}: not attempted (download is false)")

    fixes = ["pass data.root (load_dataset(root=...)) pointing at a folder holding the files"]
    if meta.name == "fashion-mnist":
        fixes.append("install the Debian package dataset-fashion-mnist")
    fixes.append("set data.download: true (load_dataset(download=True)) to fetch it with torchvision")
    raise DatasetError(
        f"dataset {meta.name!r} not found. Places tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\nFix: " + "; or ".join(fixes) + "."
    )


def federation_train_set(scenario: "Scenario") -> DatasetSplits:
    """The dataset of ``scenario`` with ``data.train_limit`` / ``test_limit`` applied (seeded by
    ``scenario.seed``). The server and every client call this, so they see the same training
    view (a client's shard indexes into it) and the server the same test split."""
    d = scenario.data
    splits = load_dataset(d.dataset, root=d.root, download=d.download)
    return splits.limit(d.train_limit, d.test_limit, seed=scenario.seed, validation_size=d.validation_size)
