"""PNG grids of image sets: a class x image table (one column per class, names on top).

Images are de-normalized with the dataset's mean/std (synthetic images live in
normalized space) and clamped to [0, 1]. The grid itself is
``torchvision.utils.make_grid``; with class names it is drawn with matplotlib (Agg
backend, no display needed) so the rows carry labels, otherwise written directly with
``torchvision.utils.save_image``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from server.store.run_folder import save_figure, write_file

__all__ = ["denormalize_images", "class_rows", "save_image_grid", "MAX_CLASS_COLUMNS"]


def denormalize_images(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Normalized float N×C×H×W -> [0, 1]. Without mean/std: per-set min-max scaling."""
    x = x.detach().to("cpu", torch.float32)
    if mean is None or std is None:
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(1e-12)
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {x.shape[1]} channels")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def class_rows(x: Tensor, y: Tensor, max_per_class: int | None = None) -> tuple[Tensor, list[int], int]:
    """Arrange images class by class, padding short rows with blanks.

    Returns (images N'×C×H×W, classes in row order, images per row).
    """
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels shape {tuple(y.shape)} does not match {x.shape[0]} images")
    classes = sorted(int(c) for c in torch.unique(y))
    rows = [x[y == c] for c in classes]
    per_row = max((r.shape[0] for r in rows), default=0)
    if max_per_class is not None:
        per_row = min(per_row, max_per_class)
    blank = torch.ones_like(x[:1])  # white padding
    tiles = []
    for r in rows:
        r = r[:per_row]
        if r.shape[0] < per_row:
            r = torch.cat([r, blank.expand(per_row - r.shape[0], *x.shape[1:])])
        tiles.append(r)
    return torch.cat(tiles) if tiles else x[:0], classes, max(per_row, 1)


# Up to this many classes the grid is a class x image table with one column per class (names on
# top), so an ipc-1 set is one row rather than a tall single column; more classes (CIFAR-100):
# one row per class, names on the left.
MAX_CLASS_COLUMNS = 20


def save_image_grid(
    x: Tensor,
    y: Tensor,
    path: str | os.PathLike[str],
    meta: Any | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    max_per_class: int | None = 10,
    title: str | None = None,
    padding: int = 2,
) -> Path:
    """Write a PNG of normalized images ``x`` with labels ``y`` as a class x image table.

    Columns are classes (names on top) and rows the 1st, 2nd, ... image of each class, for up
    to ``MAX_CLASS_COLUMNS`` classes; beyond that, rows are classes (names on the left).
    ``meta`` (e.g. ``common.datasets.DatasetMeta``) supplies mean, std and class names;
    explicit ``mean`` / ``std`` / ``class_names`` win. Returns the written path.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"save_image_grid needs a non-empty N×C×H×W tensor, got {tuple(x.shape)}")
    mean = mean if mean is not None else getattr(meta, "mean", None)
    std = std if std is not None else getattr(meta, "std", None)
    class_names = class_names if class_names is not None else getattr(meta, "class_names", None)
    imgs = denormalize_images(x, mean, std)
    tiles, classes, per_row = class_rows(imgs, y.detach().cpu(), max_per_class)
    by_column = len(classes) <= MAX_CLASS_COLUMNS
    if by_column:  # transpose the class-major tiles: tile (class c, image j) -> row j, column c
        tiles = tiles.view(len(classes), per_row, *tiles.shape[1:]).transpose(0, 1).reshape(-1, *tiles.shape[1:])
    grid = make_grid(tiles, nrow=len(classes) if by_column else per_row, padding=padding, pad_value=1.0)
    path = Path(path)
    if class_names is None and title is None:
        return write_file(path, lambda fh: save_image(grid, fh, format="png"))

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    h, w = grid.shape[1], grid.shape[2]
    scale = 1.0 / 28  # inches per pixel: a 28-32 px tile is about 1 in, labels stay readable
    names = [class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in classes]
    fig, ax = plt.subplots(figsize=(max(w * scale + (0.9 if by_column else 1.8), 4.0),
                                    max(h * scale + (1.1 if by_column else 0.6), 1.8)), dpi=100)
    img = grid.permute(1, 2, 0).numpy()
    ax.imshow(img if img.shape[2] == 3 else img[:, :, 0], cmap=None if img.shape[2] == 3 else "gray",
              vmin=0.0, vmax=1.0, interpolation="nearest")
    tile_h, tile_w = x.shape[2] + padding, x.shape[3] + padding
    if by_column:
        ax.xaxis.tick_top()
        ax.set_xticks([padding + tile_w * i + x.shape[3] / 2 for i in range(len(classes))])
        ax.set_xticklabels(names, fontsize=8, rotation=30 if max(map(len, names)) > 6 else 0, ha="left"
                           if max(map(len, names)) > 6 else "center")
        ax.set_yticks([padding + tile_h * j + x.shape[2] / 2 for j in range(per_row)])
        ax.set_yticklabels([str(j + 1) for j in range(per_row)], fontsize=7)
        ax.set_ylabel("image per class", fontsize=8)
    else:
        ax.set_yticks([padding + tile_h * i + x.shape[2] / 2 for i in range(len(classes))])
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if title:
        if by_column:
            ax.set_xlabel(title, fontsize=9)  # below the grid: the class names take the top edge
        else:
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
