"""Report figures (PNG, dpi 150): accuracy vs pipc, federated learning curve, FFT spectra (image grids: server/reports/images.py).

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

from server.store.run_folder import save_figure


__all__ = [
    "DPI",
    "plot_accuracy_vs_pipc",
    "plot_federated_curve",
    "plot_spectra",
]

DPI = 150
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=DPI, format="png", facecolor="white")


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
