"""Put several run folders side by side: ``python -m server.compare RUN_DIR... --out DIR``.

For each run: its name (the folder name), the scenario keys that differ between the runs
(dotted, from each ``scenario.resolved.yaml``; where the runs ran from is ignored), and the
accuracy of every (method, ipc, pipc) cell, pooled over seeds (server.reports.tables.aggregate_seeds).
Writes ``compare.md`` (one row per run), ``compare.csv`` (same, numbers), and, when exactly one
numeric key differs (a Dirichlet-alpha or client-count sweep), ``compare.png``: accuracy
against that key, one line per method/ipc/pipc; for a DP noise sweep, against the epsilon
each run's noise buys. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import sys
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.grid import pipc_label
from server.reports.figures import load_run_scenario
from server.reports.privacy_report import run_dp_summary
from server.reports.tables import aggregate_seeds, format_cell
from server.sweep.result import CellResult
from server.sweep.cells import read_cells
from server.reports.plots import new_figure, save_figure
from server.store.run_folder import RunFolder, RunFolderError, one_line, write_csv, write_text

__all__ = ["differing_keys", "compare_runs", "main"]

_IGNORED = {"output_dir", "reuse_artifacts", "device", "name"}  # where/how a run ran, not what it studied


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _resolved(run_dir: Path) -> dict[str, Any]:
    values = RunFolder(run_dir).read_yaml("scenario.resolved.yaml") or {}  # no aliases, size-limited, no link
    if not isinstance(values, dict):
        raise RunFolderError(f"{run_dir / 'scenario.resolved.yaml'}: the top level must be a mapping of keys")
    return {k: v for k, v in _flatten(values).items() if k not in _IGNORED}


def differing_keys(flat: Sequence[dict[str, Any]]) -> list[str]:
    """Dotted keys whose value is not the same in every run (in first-seen order)."""
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]


def _cell_key(c: CellResult) -> str:
    return f"{c.method} ipc={c.ipc} pipc={pipc_label(c.pipc)}"


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write compare.md / compare.csv (and compare.png for a one-key numeric sweep) into ``out``."""
    runs = [Path(d).resolve() for d in run_dirs]
    for r in runs:  # a folder that no run wrote: say so before reading anything
        if not (r / "scenario.resolved.yaml").is_file():
            raise FileNotFoundError(2, "not a run folder", str(r / "scenario.resolved.yaml"))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same folder name in different places: use the paths
        names = [str(r) for r in runs]
    flat = [_resolved(r) for r in runs]
    keys = differing_keys(flat)
    cells = [{_cell_key(c): c for c in aggregate_seeds(read_cells(r, load_run_scenario(r)))} for r in runs]
    columns = list(dict.fromkeys(k for per in cells for k in per))
    out = Path(out)

    def text(per: dict[str, CellResult], col: str) -> str:
        c = per.get(col)
        return "" if c is None else "n/a" if c.skipped else format_cell(c.mean, c.std)

    lines = ["# Runs compared", "", f"Runs: {', '.join(names)}. Keys that differ: "
             + (", ".join(f"`{k}`" for k in keys) or "none") + ".", "",
             "| run | " + " | ".join([*keys, *columns]) + " |", "|---|" + "---|" * (len(keys) + len(columns))]
    for name, f, per in zip(names, flat, cells):
        lines.append(f"| {name} | " + " | ".join([*(str(f.get(k, "")) for k in keys),
                                                   *(text(per, c) for c in columns)]) + " |")
    lines += ["", "Test accuracy in %, mean ± std over the evaluation models (and seeds) of each run."]
    paths = {"md": out / "compare.md", "csv": out / "compare.csv"}
    write_text(paths["md"], "\n".join(lines) + "\n")
    table = [["run", "path", *keys, *(f"{c} {s}" for c in columns for s in ("mean", "std"))]]
    for name, run, f, per in zip(names, runs, flat, cells):
        nums = []
        for c in columns:
            cell = per.get(c)
            ok = cell is not None and not cell.skipped
            nums += [f"{cell.mean:.6f}" if ok else "", f"{cell.std:.6f}" if ok else ""]  # type: ignore[union-attr]
        table.append([name, str(run), *(f.get(k, "") for k in keys), *nums])
    write_csv(paths["csv"], table)

    numeric = len(keys) == 1 and all(isinstance(f.get(keys[0]), (int, float)) and not isinstance(f.get(keys[0]), bool)
                                     for f in flat)
    if numeric and len(runs) > 1:
        key, xs = keys[0], [float(f[keys[0]]) for f in flat]
        if key == "privacy.dp.noise_multiplier":  # a DP sweep: accuracy against the privacy budget it buys
            budgets = [run_dp_summary(load_run_scenario(r), r) for r in runs]
            if all(b and b.get("epsilon") is not None and math.isfinite(b["epsilon"]) for b in budgets):
                key, xs = f"epsilon at delta = {budgets[0]['delta']:g} (Flower's RDP accountant)", \
                    [float(b["epsilon"]) for b in budgets]
        paths["png"] = _plot_sweep(key, xs, cells, columns, out / "compare.png")
    return paths


def _plot_sweep(key: str, xs: list[float], cells: list[dict[str, CellResult]], columns: list[str], path: Path) -> Path:
    fig = new_figure((6.4, 4.0))
    ax = fig.add_subplot()
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    for j, col in enumerate(columns):
        pts = [(xs[i], 100 * cells[i][col].mean, 100 * cells[i][col].std) for i in order
               if col in cells[i] and not cells[i][col].skipped and math.isfinite(cells[i][col].mean)]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="os^Dv"[j % 5], capsize=3, label=col)
    if min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")  # Dirichlet alpha spans decades
    ax.set_xlabel(key)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Synthetic-set accuracy vs {key}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare run folders side by side (tables keyed by run and "
                                                 "the scenario keys that differ).")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with scenario.resolved.yaml, cells/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for compare.md / compare.csv / compare.png")
    args = parser.parse_args(argv)
    try:
        written = compare_runs(args.runs, args.out)
    except (ValueError, OSError) as err:  # a run folder's file is refused (alias, link, tensor, manifest): exit 2
        text = one_line(err)
        if isinstance(err, FileNotFoundError) and err.filename:
            text = (f"{err.filename} is missing: pass run folders that a finished run wrote (each holds "
                    "scenario.resolved.yaml and cells/)")
        print(f"server.compare: {text}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
