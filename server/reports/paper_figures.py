"""The figures a federated-learning paper needs, each readable at column width (3.4 in wide or two columns):

- ``figures/partition.png``: the partition, label counts per client as stacked bars (from the scenario's
  shard plan, the same formula every client uses; needs the training labels on this machine, never downloads);
- ``figures/accuracy_vs_pipc.png``: accuracy against pipc, mean and 95 % t-interval over the distillation
  seeds (a dot per method when the grid has one pipc);
- ``figures/forest.png``: every paired difference results.md reports, with its 95 % interval;
- ``rounds.png``: the FedAvg curve, accuracy and loss, centralized and client-side;
- ``figures/methods_ipc<k>_pipc<p>.png``: one row per method, one column per class (the first seed's set),
  each row captioned with the set's accuracy.

Everything is drawn from the run folder's records; no Flower imports.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from logging import INFO
from typing import Any

from flwr.common.logger import log  # the project's one logger (a plain Python logger)
from torch import Tensor

from common.datasets import DatasetError, federation_train_set
from common.grid import pipc_label
from server.federation.validate import shard_plan
from server.reports.privacy_report import run_client_count
from server.reports.images import denormalize_images
from server.reports.plots import MARKERS, new_figure, save_figure
from server.reports.stats import paired_rows, t_quantile_975
from server.sweep.result import CellResult

__all__ = ["MethodPoint", "method_points", "plot_partition", "plot_accuracy_ci", "forest_rows", "plot_forest",
           "plot_rounds", "plot_methods_by_class", "write_paper_figures", "COLUMN_WIDTH"]

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper


@dataclass(frozen=True)
class MethodPoint:
    method: str
    ipc: int
    pipc: int
    mean: float  # % over seeds (each seed: the mean of its evaluation models)
    half_width: float  # 95 % t-interval over the seeds; nan with one seed
    seeds: int


def method_points(cells: Sequence[CellResult]) -> list[MethodPoint]:
    """Per (method, ipc, pipc): the mean over seeds of each seed's mean accuracy, with its 95 % t-interval."""
    by: dict[tuple[str, int, int], list[float]] = {}
    for c in cells:
        if not c.skipped and c.accuracies:
            by.setdefault((c.method, c.ipc, c.pipc), []).append(100 * sum(c.accuracies) / len(c.accuracies))
    out = []
    for (method, ipc, pipc), means in by.items():
        n = len(means)
        mean = sum(means) / n
        half = float("nan")
        if n >= 2:
            sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
            half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out.append(MethodPoint(method, ipc, pipc, mean, half, n))
    return out


def plot_partition(class_counts: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                   title: str) -> Path:
    """Stacked bars: one bar per client, one colour per class, height = images of that class in its shard."""
    n_clients, n_classes = len(class_counts), len(class_names)
    fig = new_figure((max(COLUMN_WIDTH, 0.32 * n_clients + 2.4), 2.8))
    ax = fig.add_subplot()
    bottom = [0] * n_clients
    cmap = [f"C{i % 10}" for i in range(n_classes)]
    for c in range(n_classes):
        heights = [int(class_counts[k][c]) for k in range(n_clients)]
        ax.bar(range(n_clients), heights, bottom=bottom, color=cmap[c], width=0.8, label=class_names[c],
               hatch="//" if c >= 10 else None)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("images in the shard")
    ax.set_xticks(range(n_clients), [str(k) for k in range(n_clients)] if n_clients <= 32 else None)
    ax.set_title(title, fontsize="medium")
    if n_classes <= 20:
        ax.legend(fontsize="x-small", ncols=2 if n_classes > 5 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_ci(points: Sequence[MethodPoint], path: Path, split: str, title: str) -> Path:
    """Accuracy against pipc (the safe images per class clients share), one panel per ipc, mean ± 95 % CI over
    seeds; with a single pipc, one dot per method instead of lines."""
    if not points:
        raise ValueError("plot_accuracy_ci: nothing to plot")
    methods = list(dict.fromkeys(p.method for p in points))
    ipcs = sorted({p.ipc for p in points})
    pipcs = sorted({p.pipc for p in points}, key=lambda v: math.inf if v < 0 else v)
    one_pipc = len(pipcs) == 1
    width = COLUMN_WIDTH if len(ipcs) == 1 else 2 * COLUMN_WIDTH + 0.4
    fig = new_figure((width + (0 if one_pipc else 1.2), 2.9))
    axes = fig.subplots(1, len(ipcs), sharey=True, squeeze=False)[0]
    for ax, ipc in zip(axes, ipcs):
        for i, method in enumerate(methods):
            pts = sorted((p for p in points if p.method == method and p.ipc == ipc),
                         key=lambda p: pipcs.index(p.pipc))
            if not pts:
                continue
            xs = [i] if one_pipc else [pipcs.index(p.pipc) for p in pts]
            err = [0.0 if math.isnan(p.half_width) else p.half_width for p in pts]
            ax.errorbar(xs, [p.mean for p in pts], yerr=err, label=method, color=f"C{i % 10}",
                        marker=MARKERS[i % len(MARKERS)], capsize=3, linestyle="none" if one_pipc else "-",
                        linewidth=1.4, elinewidth=1.4, markersize=5)
        if one_pipc:
            ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize="small")
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.set_title(f"ipc {ipc}, pipc {pipc_label(pipcs[0])}", fontsize="medium")
        else:
            ax.set_xticks(range(len(pipcs)), [pipc_label(p) for p in pipcs])
            ax.set_xlabel("safe images per class shared (pipc)")
            ax.set_title(f"ipc {ipc}", fontsize="medium")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{split} accuracy (%)")
    if not one_pipc:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    seeds = sorted({p.seeds for p in points})
    fig.suptitle(f"{title}\nmean and 95 % CI over {'/'.join(map(str, seeds))} seeds", fontsize="medium")
    return save_figure(fig, path)


def forest_rows(cells: Sequence[CellResult]) -> list[tuple[str, float, float, float, int]]:
    """(label, mean, low, high, seeds) in points of accuracy for every paired difference results.md lists."""
    return [(f"{a} − {b}  (ipc {ipc}, pipc {pipc_label(pipc)})", 100 * d.mean, 100 * d.low, 100 * d.high,
             len(d.per_seed)) for ipc, pipc, a, b, d in paired_rows(cells)]


def plot_forest(rows: Sequence[tuple[str, float, float, float, int]], path: Path, title: str) -> Path:
    """One line per paired difference: the mean (dot) and its 95 % interval (bar); zero marked."""
    if not rows:
        raise ValueError("plot_forest: no paired differences")
    fig = new_figure((2 * COLUMN_WIDTH, 0.32 * len(rows) + 1.2))
    ax = fig.add_subplot()
    for i, (label, mean, low, high, _) in enumerate(rows):
        colour = "C2" if low > 0 else ("C3" if high < 0 else "0.35")
        ax.plot([low, high], [i, i], color=colour, linewidth=2)
        ax.plot([mean], [i], "o", color=colour, markersize=5)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("paired difference A − B (points of accuracy), 95 % CI over seeds")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title, fontsize="medium")
    return save_figure(fig, path)


def _column(rows: Sequence[Mapping[str, str]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["round"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_rounds(rounds_csv: Path, path: Path, title: str) -> Path | None:
    """Left: accuracy per FedAvg round (centralized test, validation, client-side held-out); right: loss
    (centralized test, the clients' mean training loss). None when rounds.csv holds no accuracy."""
    with rounds_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    series_acc = [("test_acc", "centralized test"), ("val_acc", "validation split"),
                  ("client_eval_acc", "clients' held-out (mean)")]
    series_loss = [("test_loss", "centralized test"), ("train_loss", "clients' training (mean)")]
    if not _column(rows, "test_acc")[0]:
        return None
    fig = new_figure((2 * COLUMN_WIDTH + 0.4, 2.8))
    ax_a, ax_l = fig.subplots(1, 2)
    for i, (key, label) in enumerate(series_acc):
        xs, ys = _column(rows, key)
        if xs:
            ax_a.plot(xs, [100 * y for y in ys], marker=MARKERS[i], markersize=3, linewidth=1.3, label=label)
    for i, (key, label) in enumerate(series_loss):
        xs, ys = _column(rows, key)
        if xs:
            ax_l.plot(xs, ys, marker=MARKERS[i], markersize=3, linewidth=1.3, label=label, color=f"C{i + 3}")
    ax_a.set_ylabel("accuracy (%)")
    ax_l.set_ylabel("cross-entropy loss")
    for ax in (ax_a, ax_l):
        ax.set_xlabel("FedAvg round")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)


def plot_methods_by_class(sets: Mapping[str, tuple[Tensor, Tensor, float]], meta: Any, path: Path,
                          title: str) -> Path:
    """Rows: methods (``name -> (x, y, accuracy %)``), columns: classes (the first image of each class)."""
    names = list(sets)
    n_classes = len(meta.class_names)
    fig = new_figure((max(COLUMN_WIDTH, 0.62 * n_classes + 1.6), 0.75 * len(names) + 0.9))
    axes = fig.subplots(len(names), n_classes, squeeze=False)
    for r, name in enumerate(names):
        x, y, acc = sets[name]
        imgs = denormalize_images(x, meta.mean, meta.std)
        for c in range(n_classes):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            idx = (y == c).nonzero().flatten()
            if idx.numel():
                img = imgs[int(idx[0])].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                          vmin=0, vmax=1)
            if r == 0:
                ax.set_title(meta.class_names[c], fontsize=6)
        axes[r][0].set_ylabel(f"{name}\n{acc:.1f} %", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)


def _partition_counts(scenario: Any, run_dir: Path) -> list[tuple[int, ...]] | None:
    """Per client, per class: the images of its shard (the shard plan every client builds), or None when the
    number of clients is unknown or the training labels are not on this machine (the report never downloads)."""
    n = scenario.federation.num_clients or run_client_count(run_dir)
    if not n:
        return None
    local = dataclasses.replace(scenario, data=dataclasses.replace(scenario.data, download=False))
    try:
        train_y = federation_train_set(local).train_y
    except (DatasetError, OSError) as err:
        log(INFO, "report: no partition figure (%s)", str(err).splitlines()[0])
        return None
    plan = shard_plan(scenario, train_y, n, int(train_y.max()) + 1)
    return [tuple(c) for c in plan.class_counts]


def write_paper_figures(run_dir: Path, scenario: Any, meta: Any, cells: Sequence[CellResult],
                        sets: Mapping[str, tuple[Tensor, Tensor, CellResult]]) -> dict[str, Path]:
    """Every figure of the module docstring that the run's records allow; returns kind -> path."""
    written: dict[str, Path] = {}
    figs = run_dir / "figures"
    split = scenario.evaluation.split
    counts = _partition_counts(scenario, run_dir)
    if counts:
        f = scenario.federation
        how = f"Dirichlet alpha {f.dirichlet_alpha:g}" if f.partition == "dirichlet" else f.partition
        written["partition"] = plot_partition(counts, meta.class_names, figs / "partition.png",
                                              f"{scenario.name}: {len(counts)} clients, {how} partition")
    points = method_points(cells)
    if points:
        written["accuracy_vs_pipc"] = plot_accuracy_ci(points, figs / "accuracy_vs_pipc.png", split,
                                                       f"{scenario.name} ({meta.name})")
    rows = forest_rows(cells)
    if rows:
        written["forest"] = plot_forest(rows, figs / "forest.png",
                                        f"{scenario.name}: paired differences (green: A better, red: B better)")
    if (run_dir / "rounds.csv").is_file():
        out = plot_rounds(run_dir / "rounds.csv", run_dir / "rounds.png", f"{scenario.name}: FedAvg")
        if out is not None:
            written["rounds"] = out
    first_seed = (scenario.distill.seeds or [scenario.seed])[0]
    groups: dict[tuple[int, int], dict[str, tuple[Tensor, Tensor, float]]] = {}
    for x, y, c in sets.values():
        if c.seed == first_seed:
            groups.setdefault((c.ipc, c.pipc), {})[c.method] = (x, y, 100 * c.mean)
    for (ipc, pipc), group in sorted(groups.items()):
        order = [m for m in scenario.distill.methods if m in group]
        name = f"methods_ipc{ipc}_pipc{pipc_label(pipc)}"
        written[name] = plot_methods_by_class({m: group[m] for m in order}, meta, figs / f"{name}.png",
                                              f"ipc {ipc}, pipc {pipc_label(pipc)}, seed {first_seed}: "
                                              f"{split} accuracy of each set")
    return written
