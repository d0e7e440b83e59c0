"""Report figures (PNG, dpi 150): the shared canvas and the FFT spectra (the paper figures: server/reports/paper_figures.py;
image grids: server/reports/images.py).

Figures are built with the object-oriented API on an explicit Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) instead of pyplot: no global
backend switch, no GUI, no figure leaks, and safe inside Flower/Ray workers.
Saved without ``bbox_inches="tight"`` so a PNG is exactly ``figsize * dpi`` pixels;
``layout="constrained"`` does the tight-layout job (and handles colorbars and legends).

No Flower imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from server.store.run_folder import save_figure as save_confined


__all__ = ["DPI", "MARKERS", "new_figure", "save_figure", "plot_spectra"]

DPI = 150
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """The PNG of ``fig`` at ``path``: an atomic write confined to the run folder that holds it."""
    return save_confined(fig, path, dpi=DPI, format="png", facecolor="white")


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
    fig = new_figure(figsize or (3.0 * n + 1.2, 3.4))
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
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------
