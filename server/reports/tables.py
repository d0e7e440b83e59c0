"""Phase 5: write the run's tables and print a summary.

Files (in the run folder):
- ``results.md`` / ``results.csv``: rows ipc x pipc, columns methods, "mean ± std" accuracy in %;
- ``results_long.csv``: one numeric row per (method, ipc, pipc) with every model's accuracy;
- ``rounds.csv``: centralized test accuracy of the global model per FedAvg round (0 = initial);
- ``uploads.csv`` / ``uploads.json``: bytes uploaded per client by kind (weights per round,
  safe images), next to the size of the client's private shard;
- ``timings.json``: seconds per phase.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.grid import PIPC_ALL, pipc_label
from server.reports.stats import paired_markdown
from server.store.run_folder import write_csv, write_dict_csv, write_text
from server.sweep.result import CellResult

__all__ = [
    "format_cell",
    "results_markdown",
    "write_results",
    "write_rounds",
    "write_uploads",
    "upload_summary",
    "write_timings",
    "print_summary",
    "aggregate_seeds",
]


def format_cell(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _pipc_sort(pipc: int) -> float:
    return float("inf") if pipc == PIPC_ALL else float(pipc)  # 'all' is the last column of Table 1


def aggregate_seeds(cells: Sequence[CellResult]) -> list[CellResult]:
    """One cell per (method, ipc, pipc): the accuracies of every seed pooled (mean, population std).

    A single seed is passed through unchanged; a key whose every seed was skipped stays skipped.
    """
    groups: dict[tuple[str, int, int], list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.method, c.ipc, c.pipc), []).append(c)
    out = []
    for (method, ipc, pipc), group in groups.items():
        ran = [c for c in group if not c.skipped]
        if len(group) == 1 or not ran:
            out.append(group[0] if len(group) == 1 else ran[0] if ran else group[0])
            continue
        accs = [a for c in ran for a in c.accuracies]
        out.append(CellResult(method=method, ipc=ipc, pipc=pipc, accuracies=accs, mean=float(np.mean(accs)),
                              std=float(np.std(accs)), distill_s=sum(c.distill_s for c in ran),
                              eval_s=sum(c.eval_s for c in ran), seed=ran[0].seed))
    return out


def _grid(cells: Sequence[CellResult]) -> tuple[list[tuple[int, int]], list[str], dict[tuple[str, int, int], CellResult]]:
    cells = aggregate_seeds(cells)
    rows = sorted({(c.ipc, c.pipc) for c in cells}, key=lambda r: (r[0], _pipc_sort(r[1])))
    methods = list(dict.fromkeys(c.method for c in cells))  # first-seen order = scenario order
    return rows, methods, {(c.method, c.ipc, c.pipc): c for c in cells}


def _cell_text(by_key: dict[tuple[str, int, int], CellResult], key: tuple[str, int, int]) -> str:
    c = by_key.get(key)
    if c is None:
        return ""  # not run (yet): an interrupted sweep
    return "n/a" if c.skipped else format_cell(c.mean, c.std)


def results_markdown(cells: Sequence[CellResult], title: str | None = None, scope: str | None = None) -> str:
    """The results table; ``scope`` says what the spread over seeds covers (which split, what seeds vary)."""
    rows, methods, by_key = _grid(cells)
    lines = [f"# {title}", ""] if title else []
    lines += ["| ipc | pipc | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ipc, pipc in rows:
        vals = [_cell_text(by_key, (m, ipc, pipc)) for m in methods]
        lines.append(f"| {ipc} | {pipc_label(pipc)} | " + " | ".join(vals) + " |")
    seeds = sorted({c.seed for c in cells if not c.skipped})
    over = "the evaluation models" + (f" of {len(seeds)} distillation seeds ({', '.join(map(str, seeds))})"
                                      if len(seeds) > 1 else "")
    note = " pipc 'all': every client uploaded all its images." if any(p == PIPC_ALL for _, p in rows) else ""
    lines += ["", f"Accuracy in %, mean ± std over {over}.{note}" + (f" {scope}" if scope else "")]
    lines += paired_markdown(cells, pipc_label)
    reasons = sorted({f"{c.method} ipc={c.ipc} pipc={pipc_label(c.pipc)}: {c.skipped}" for c in cells if c.skipped})
    if reasons:
        lines += ["", "n/a (cell skipped):", *(f"- {r}" for r in reasons)]
    return "\n".join(lines) + "\n"


def write_results(cells: Sequence[CellResult], run_dir: Path, title: str | None = None,
                  scope: str | None = None) -> dict[str, Path]:
    paths = {"md": run_dir / "results.md", "csv": run_dir / "results.csv", "long": run_dir / "results_long.csv"}
    write_text(paths["md"], results_markdown(cells, title, scope))
    rows, methods, by_key = _grid(cells)
    write_csv(paths["csv"], [["ipc", "pipc", *methods],
                             *([ipc, pipc_label(pipc), *(_cell_text(by_key, (m, ipc, pipc)) for m in methods)]
                               for ipc, pipc in rows)])
    write_csv(paths["long"], [["method", "ipc", "pipc", "seed", "mean", "std", "num_models", "accuracies", "distill_s",
                               "eval_s", "skipped"],
                              *([c.method, c.ipc, pipc_label(c.pipc), c.seed, "" if c.skipped else f"{c.mean:.6f}",
                                 "" if c.skipped else f"{c.std:.6f}", len(c.accuracies),
                                 " ".join(f"{a:.6f}" for a in c.accuracies), f"{c.distill_s:.2f}", f"{c.eval_s:.2f}",
                                 c.skipped] for c in cells)])
    return paths


def write_rounds(rounds: Sequence[dict], path: Path) -> Path:
    """Per-round global-model accuracy (round 0 = the initial model)."""
    keys = ["round", "test_acc", "test_loss", "train_loss", "client_eval_acc"]
    if any("val_acc" in row for row in rounds):  # data.validation_size: the split that judges the plateau
        keys.insert(3, "val_acc")
    return write_dict_csv(path, keys, ({k: ("" if row.get(k) is None else row.get(k)) for k in keys} for row in rounds),
                          extrasaction="ignore")


def upload_summary(weight_uploads: Sequence[dict], safe_uploads: Sequence[dict],
                   dsv_uploads: Sequence[dict] = ()) -> list[dict]:
    """Totals per client: weight bytes (all rounds), safe-image bytes, DSV bytes (no-model-access mode),
    private shard bytes."""
    per: dict[int, dict] = {}

    def entry(u: dict) -> dict:
        pid = int(u["partition_id"])
        return per.setdefault(pid, {"partition_id": pid, "node_id": u["node_id"], "weights_bytes": 0, "weight_rounds": 0,
                                    "safe_images": 0, "safe_bytes": 0, "dsv_images": 0, "dsv_bytes": 0,
                                    "shard_bytes": u.get("shard_bytes")})

    for u in weight_uploads:
        e = entry(u)
        e["weights_bytes"] += int(u["bytes"])
        e["weight_rounds"] += 1
    for u in safe_uploads:
        e = entry(u)
        e["safe_images"] += int(u["images"])
        e["safe_bytes"] += int(u["bytes"])
        e["shard_bytes"] = e["shard_bytes"] or u.get("shard_bytes")
    for u in dsv_uploads:
        e = entry(u)
        e["dsv_images"] += int(u["images"])
        e["dsv_bytes"] += int(u["bytes"])
        e["shard_bytes"] = e["shard_bytes"] or u.get("shard_bytes")
    for e in per.values():
        e["total_bytes"] = e["weights_bytes"] + e["safe_bytes"] + e["dsv_bytes"]
    return [per[k] for k in sorted(per)]


def write_uploads(weight_uploads: Sequence[dict], safe_uploads: Sequence[dict], run_dir: Path,
                  dsv_uploads: Sequence[dict] = ()) -> dict[str, Path]:
    """``uploads.csv``: one row per upload; ``uploads.json``: the rows plus per-client totals."""
    paths = {"csv": run_dir / "uploads.csv", "json": run_dir / "uploads.json"}
    rows = [{"partition_id": u["partition_id"], "node_id": u["node_id"], "kind": "weights", "round": u["round"],
             "images": "", "bytes": u["bytes"]} for u in weight_uploads]
    rows += [{"partition_id": u["partition_id"], "node_id": u["node_id"], "kind": "safe_images",
              "round": f"query {u['request']}", "images": u["images"], "bytes": u["bytes"]} for u in safe_uploads]
    rows += [{"partition_id": u["partition_id"], "node_id": u["node_id"], "kind": "dsv", "round": "query.dsv",
              "images": u["images"], "bytes": u["bytes"]} for u in dsv_uploads]
    write_dict_csv(paths["csv"], ["partition_id", "node_id", "kind", "round", "images", "bytes"],
                   sorted(rows, key=lambda r: (r["partition_id"], r["kind"] != "weights", str(r["round"]))))
    write_text(paths["json"], json.dumps({"per_client": upload_summary(weight_uploads, safe_uploads, dsv_uploads),
                                         "uploads": rows}, indent=2))
    return paths


def write_timings(timings: dict[str, float], path: Path) -> Path:
    return write_text(path, json.dumps({k: round(v, 3) for k, v in timings.items()}, indent=2))


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.2f}"


def print_summary(
    cells: Sequence[CellResult],
    rounds: Sequence[dict],
    uploads: Sequence[dict],
    timings: dict[str, float],
    run_dir: Path,
    console: Console | None = None,
) -> None:
    """Results table, global-model accuracy, bytes per client and phase times, with rich."""
    console = console or Console()
    rows, methods, by_key = _grid(cells)
    table = Table(title="Synthetic-set accuracy (%, mean ± std)")
    table.add_column("ipc", justify="right")
    table.add_column("pipc", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    for ipc, pipc in rows:
        table.add_row(str(ipc), pipc_label(pipc), *(_cell_text(by_key, (m, ipc, pipc)) for m in methods))
    console.print(table)
    if rounds:
        last = rounds[-1]
        console.print(f"Global model: test accuracy {100 * last['test_acc']:.2f}% after round {last['round']}")
    if uploads:
        up = Table(title="Bytes uploaded per client (MiB)")
        for col in ("client", "weights", "safe images", "safe MiB", "private shard"):
            up.add_column(col, justify="right")
        for e in uploads:
            up.add_row(str(e["partition_id"]), _mib(e["weights_bytes"]), str(e["safe_images"]), _mib(e["safe_bytes"]),
                       _mib(e.get("shard_bytes")))
        console.print(up)
    console.print("Phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    console.print(f"Run folder: {run_dir}")
