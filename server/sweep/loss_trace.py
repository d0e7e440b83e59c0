"""The per-iteration trace of one distillation: every loss term, the stationarity ratio
L_stat / D(target, 0), lambda's statistics and each term's share of the image gradient,
as a CSV and a two-panel figure (what the "is the stationarity term doing anything?"
question is answered with).

Input is ``SyntheticSet.info["loss_history"]`` (rows logged every ``log_every``
iterations by ``common.distill.synthesize``). Gradient share of a term =
||d term / d S|| / sum over terms of ||d term / d S||, each term with its weight in
Eq. 5 (alpha L_stat, gamma L_DM).

Beside it, ``<cell>_stationarity.md``: the cell's stationarity diagnostic
(``SyntheticSet.info["stationarity"]``, common/distill/stationarity.py), cos(target, -sum lambda_i
grad L_i) for safe images and the synthetic set at points of the path theta_0 -> theta*.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from common.distill.stationarity import markdown_table
from server.store.run_folder import save_figure, write_csv, write_text

__all__ = ["TRACE_COLUMNS", "write_trace_csv", "plot_trace", "summarize_trace", "has_dkkt_trace", "write_cell_trace",
           "write_stationarity"]

TRACE_COLUMNS = (
    "iteration", "elapsed_s", "total", "primal", "stat", "stat_zero", "stat_ratio", "dm",
    "lambda_min", "lambda_mean", "lambda_max", "lambda_zero",
    "gradnorm_primal", "gradnorm_stat", "gradnorm_dm", "gradshare_primal", "gradshare_stat", "gradshare_dm",
)


def write_trace_csv(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """One row per logged iteration; columns a method does not have stay empty."""
    return write_csv(path, [TRACE_COLUMNS, *(["" if row.get(k) is None else row[k] for k in TRACE_COLUMNS]
                                             for row in history)])


def summarize_trace(history: Sequence[dict[str, Any]], skip_fraction: float = 0.1) -> dict[str, float]:
    """Numbers for a table: the final stationarity ratio and the mean gradient share of each
    term over the logged iterations after the first ``skip_fraction`` of the run."""
    if not history:
        return {}
    last_it = history[-1]["iteration"]
    late = [r for r in history if r["iteration"] > skip_fraction * last_it] or list(history)
    out: dict[str, float] = {}
    if "stat_ratio" in history[-1]:
        out["final_stat_ratio"] = float(history[-1]["stat_ratio"])
        out["min_stat_ratio"] = min(float(r["stat_ratio"]) for r in history)
    for term in ("primal", "stat", "dm"):
        vals = [float(r[f"gradshare_{term}"]) for r in late if f"gradshare_{term}" in r]
        if vals:
            out[f"gradshare_{term}"] = sum(vals) / len(vals)
    return out


def plot_trace(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: the loss terms (primal, L_stat / D(target, 0), L_DM, log scale) vs iteration; right, when the
    loss has several weighted parts: each part's share of the image gradient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in history]
    shares = [(term, label) for term, label in (("primal", "primal"), ("stat", "alpha * L_stat"),
                                               ("dm", "gamma * L_DM")) if any(f"gradshare_{term}" in r for r in history)]
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 5.6, 4), constrained_layout=True,
                             squeeze=False)
    ax_l = axes[0][0]
    series = [("primal", "L_primal (cross-entropy)"), ("stat_ratio", "L_stat / D(target, 0)"), ("dm", "L_DM")]
    for key, label in series:
        vals = [r.get(key) for r in history]
        if any(v is not None and math.isfinite(v) and v > 0 for v in vals):
            ax_l.plot(its, [v if v is not None and v > 0 else float("nan") for v in vals], label=label)
    if any("stat_ratio" in r for r in history):
        ax_l.axhline(1.0, color="grey", ls="--", lw=0.8, label="D(target, 0): inert stationarity")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("loss term (log scale)")
    ax_l.set_title("loss terms")
    ax_l.legend(fontsize=8)
    if shares:
        ax_r = axes[0][1]
        for term, label in shares:
            vals = [r.get(f"gradshare_{term}") for r in history]
            ax_r.plot(its, [float("nan") if v is None else v for v in vals], label=label)
        ax_r.axhline(0.10, color="grey", ls=":", lw=0.8, label="10 %")
        ax_r.set_ylim(0, 1)
        ax_r.set_xlabel("iteration")
        ax_r.set_ylabel("share of the image-gradient norm")
        ax_r.set_title("share of the image gradient (norm)")
        ax_r.legend(fontsize=8)
    fig.suptitle(title)
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def has_dkkt_trace(history: Sequence[dict[str, Any]]) -> bool:
    """True when the history is a DKKT method's (it has stationarity rows to draw)."""
    return any("gradshare_stat" in row or "stat_ratio" in row for row in history)


def write_stationarity(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """The stationarity diagnostic of one cell as a markdown table (t = 0: theta_0, t = 1: theta*)."""
    text = "\n".join([f"# Stationarity diagnostic: {title}", "",
                      "cos(target, -sum_i lambda_i grad L_i) with the gradients at theta_0 + t (theta* - theta_0); "
                      "lambda: uniform (all 1), the learned multipliers, or the best non-negative (NNLS).", "",
                      *markdown_table(rows), ""])
    return write_text(path, text)


def write_cell_trace(history: Sequence[dict[str, Any]], traces_dir: Path, name: str, method: str, ipc: int,
                     pipc_text: str, seed: int, stationarity: Sequence[dict[str, Any]] | None = None) -> Path:
    """``traces_dir/<name>.csv`` + ``.png`` (+ ``<name>_stationarity.md`` when the cell has a diagnostic) of one
    sweep cell (the sweep after the cell, the report's rebuild from its record: one writer, so both give the
    same files)."""
    write_trace_csv(history, traces_dir / f"{name}.csv")
    if stationarity:
        write_stationarity(stationarity, traces_dir / f"{name}_stationarity.md",
                           f"{method}  ipc {ipc}  pipc {pipc_text}  seed {seed}")
    return plot_trace(history, traces_dir / f"{name}.png", f"{method}  ipc {ipc}  pipc {pipc_text}  seed {seed}")
