"""Report figures (PNG, dpi 150): accuracy vs pipc, federated learning curve, FFT spectra, image grids.

Figures are built with the object-oriented API on an explicit Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) instead of pyplot: no global
backend switch, no GUI, no figure leaks, and safe inside Flower/Ray workers.
Saved without ``bbox_inches="tight"`` so a PNG is exactly ``figsize * dpi`` pixels;
``layout="constrained"`` does the tight-layout job (and handles colorbars and legends).

Accuracies given as fractions (all values <= 1) are shown in percent.
No Flower imports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

from common.datasets import DatasetMeta, denormalize

__all__ = [
    "DPI",
    "plot_accuracy_vs_pipc",
    "plot_federated_curve",
    "plot_spectra",
    "class_grid",
    "save_image_grid",
]

DPI = 150
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def _percent_scale(values: Sequence[float]) -> float:
    # Fractions in [0, 1] are shown as %, values already in % are left alone.
    finite = [v for v in values if math.isfinite(v)]
    return 100.0 if finite and max(finite) <= 1.0 else 1.0


# ---------------------------------------------------------------------------
# Accuracy vs pipc
# ---------------------------------------------------------------------------


def _pipc_key(value: Any) -> tuple[int, float, str]:
    # Numeric pipc ascending, then non-numeric ones such as "all".
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, math.inf, str(value))


def _pipc_label(value: Any) -> str:
    kind, num, text = _pipc_key(value)
    if kind == 1:
        return text
    return str(int(num)) if num.is_integer() else str(num)


def plot_accuracy_vs_pipc(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "Test accuracy vs. private images per class (pipc)",
    figsize: tuple[float, float] | None = None,
) -> Path:
    """One subplot per ipc; in each, one line (mean, std error bars) per method over pipc.

    ``rows``: dicts with keys method, ipc, pipc, mean, std (e.g. read back from the results
    CSV; numeric strings are accepted, a missing/empty std counts as 0). pipc values are placed
    as evenly spaced categories (ascending, non-numeric such as "all" last).
    """
    if not rows:
        raise ValueError("plot_accuracy_vs_pipc: no rows to plot")
    missing = [k for k in ("method", "ipc", "pipc", "mean") if k not in rows[0]]
    if missing:
        raise ValueError(f"plot_accuracy_vs_pipc: rows lack keys {missing} (have {sorted(rows[0])})")

    def _std(r: Mapping[str, Any]) -> float:
        v = r.get("std")
        return 0.0 if v in (None, "") else float(v)

    methods = list(dict.fromkeys(str(r["method"]) for r in rows))  # first-appearance order
    ipcs = sorted({int(r["ipc"]) for r in rows})
    pipcs = sorted({_pipc_label(r["pipc"]) for r in rows}, key=_pipc_key)
    xpos = {p: i for i, p in enumerate(pipcs)}
    scale = _percent_scale([float(r["mean"]) for r in rows])

    fig = _new_figure(figsize or (3.6 * len(ipcs) + 1.6, 3.6))
    axes = fig.subplots(1, len(ipcs), sharey=True, squeeze=False)[0]
    palette = [f"C{i % 10}" for i in range(len(methods))]
    for ax, ipc in zip(axes, ipcs):
        for m_i, method in enumerate(methods):
            pts = sorted(
                ((xpos[_pipc_label(r["pipc"])], float(r["mean"]) * scale, _std(r) * scale)
                 for r in rows if str(r["method"]) == method and int(r["ipc"]) == ipc),
                key=lambda t: t[0],
            )
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, label=method, color=palette[m_i],
                        marker=_MARKERS[m_i % len(_MARKERS)], capsize=3, linewidth=1.5, markersize=5)
        ax.set_title(f"ipc = {ipc}")
        ax.set_xticks(range(len(pipcs)), pipcs)
        ax.set_xlim(-0.5, len(pipcs) - 0.5)
        ax.set_xlabel("private images per class available (pipc)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)" if scale == 100.0 else "test accuracy")
    handles, labels = [], []
    for ax in axes:  # union of the legend entries of all panels, in method order
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda i: methods.index(labels[i]))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right upper",
               title="method", fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# Federated learning curve
# ---------------------------------------------------------------------------


def plot_federated_curve(
    rounds: Sequence[int],
    accuracies: Sequence[float],
    path: str | Path,
    title: str = "Federated training (FedAvg): centralized test accuracy",
    label: str = "global model",
    figsize: tuple[float, float] = (6.4, 4.0),
) -> Path:
    """Centralized test accuracy of the global model after each FedAvg round."""
    if len(rounds) != len(accuracies):
        raise ValueError(f"plot_federated_curve: {len(rounds)} rounds but {len(accuracies)} accuracies")
    if not rounds:
        raise ValueError("plot_federated_curve: nothing to plot (no rounds)")
    accs = [float(a) for a in accuracies]
    scale = _percent_scale(accs)
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    ax.plot(list(rounds), [a * scale for a in accs], marker="o", markersize=4, linewidth=1.5, label=label)
    ax.set_xlabel("FedAvg round")
    ax.set_ylabel("test accuracy (%)" if scale == 100.0 else "test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return _save(fig, path)


# ---------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------


def _freq_extent(n: int) -> tuple[float, float]:
    # Edges of the fftshift-ed bins in cycles/pixel: centres run from fftfreq's min to max.
    f = torch.fft.fftshift(torch.fft.fftfreq(n))
    half = 0.5 / n
    return float(f[0]) - half, float(f[-1]) + half


def plot_spectra(
    spectra: Mapping[str, Tensor],
    path: str | Path,
    title: str = "Mean log amplitude spectrum, log(1+|FFT|)",
    figsize: tuple[float, float] | None = None,
) -> Path:
    """Side-by-side heatmaps (DC at the centre) of H x W mean log spectra with one shared colorbar.

    Typically ``{name: frequency.mean_log_spectrum(x)}`` for each synthetic set.
    """
    if not spectra:
        raise ValueError("plot_spectra: no spectra to plot")
    arrays = {}
    for name, s in spectra.items():
        if not isinstance(s, Tensor) or s.dim() != 2:
            raise ValueError(f"plot_spectra: spectrum {name!r} must be an H x W tensor, got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        arrays[name] = s.detach().float().cpu().numpy()
    vmin = min(float(a.min()) for a in arrays.values())
    vmax = max(float(a.max()) for a in arrays.values())

    n = len(arrays)
    fig = _new_figure(figsize or (3.0 * n + 1.2, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (name, arr) in zip(axes, arrays.items()):
        x0, x1 = _freq_extent(arr.shape[1])
        y0, y1 = _freq_extent(arr.shape[0])
        image = ax.imshow(arr, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                          extent=(x0, x1, y0, y1), interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("$f_x$ (cycles/pixel)")
    axes[0].set_ylabel("$f_y$ (cycles/pixel)")
    fig.colorbar(image, ax=list(axes), label="mean log(1 + |F|)", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------


def _to_unit(x: Tensor, meta: DatasetMeta) -> Tensor:
    # uint8 pixels (e.g. uploaded safe images) are just rescaled; floats are de-normalized.
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return denormalize(x.float(), meta)


def class_grid(
    x01: Tensor, y: Tensor, nrow: int | None = None, padding: int = 2
) -> tuple[Tensor, list[int]]:
    """Tile images in [0, 1] into a (3 x H' x W') grid with one column per class present in ``y``.

    Column j holds the images of the j-th smallest class label in their original order,
    at most ``nrow`` of them (None: all); classes with fewer images get white tiles.
    Returns the grid and the class label of each column.
    """
    if x01.dim() != 4 or y.dim() != 1 or x01.shape[0] != y.shape[0]:
        raise ValueError(f"class_grid: expected x N x C x H x W and y (N,), got {tuple(x01.shape)} and {tuple(y.shape)}")
    if x01.shape[0] == 0:
        raise ValueError("class_grid: no images")
    if nrow is not None and nrow < 1:
        raise ValueError(f"class_grid: nrow must be >= 1 or None, got {nrow}")
    y = y.detach().cpu().long()
    classes = sorted(int(c) for c in torch.unique(y))
    per_class = [torch.nonzero(y == c).flatten()[:nrow] for c in classes]
    rows = max(len(idx) for idx in per_class)
    blank = torch.ones_like(x01[0])
    tiles = [x01[per_class[j][r]] if r < len(per_class[j]) else blank
             for r in range(rows) for j in range(len(classes))]  # row-major: row r = r-th image of every class
    grid = make_grid(torch.stack(tiles), nrow=len(classes), padding=padding, pad_value=1.0)
    return grid, classes


def save_image_grid(
    x: Tensor,
    y: Tensor,
    meta: DatasetMeta,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    nrow: int | None = None,
    title: str | None = None,
) -> list[int]:
    """Save images as a class-sorted grid: one column per class, class names as column titles.

    ``x``: normalized float images (de-normalized with ``meta.mean``/``meta.std``) or uint8
    pixels. ``nrow``: at most this many images per class (grid rows); None shows all.
    ``class_names`` defaults to ``meta.class_names``. 1-channel images are drawn in grayscale.
    Returns the class label of each column (left to right).
    """
    if x.dim() != 4 or x.shape[1] != meta.channels:
        raise ValueError(f"save_image_grid: expected N x {meta.channels} x H x W images for {meta.name}, got {tuple(x.shape)}")
    names = list(class_names) if class_names is not None else list(meta.class_names)
    padding = 2
    grid, classes = class_grid(_to_unit(x, meta), y, nrow=nrow, padding=padding)
    if any(c < 0 or c >= len(names) for c in classes):
        raise ValueError(f"save_image_grid: labels {classes} out of range for {len(names)} class names")
    n_cols = len(classes)
    n_rows = (grid.shape[1] - padding) // (x.shape[2] + padding)

    labels = [names[c] for c in classes]
    # ~0.8 inch per tile, capped so very wide grids (100 classes) stay printable.
    tile_in = min(0.8, 30.0 / n_cols)
    fontsize = 8 if n_cols <= 20 else 6
    rotate = n_cols > 12 or max(len(s) for s in labels) * fontsize * 0.6 / 72 > tile_in
    # Room for the column titles: vertical text needs its length, horizontal one line.
    label_in = (max(len(s) for s in labels) if rotate else 1.5) * fontsize * 0.6 / 72
    height = n_rows * tile_in + label_in + 0.2 + (0.35 if title is not None else 0.0)
    fig = _new_figure((n_cols * tile_in + 0.3, height))
    ax = fig.add_subplot()
    if meta.channels == 1:
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    step = x.shape[3] + padding
    centers = [padding + j * step + (x.shape[3] - 1) / 2 for j in range(n_cols)]
    ax.set_xticks(centers, labels, rotation=90 if rotate else 0, fontsize=fontsize)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        fig.suptitle(title)
    _save(fig, path)
    return classes
