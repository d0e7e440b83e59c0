"""Score a run's saved synthetic sets under another evaluation protocol, without re-distilling.

    python -m server.reevaluate RUN_DIR --out DIR [--set evaluation.optimizer=sam --set evaluation.epochs=300]
        [--cells 'method=dm,dkkt_dm; ipc=1'] [--device auto]

Every finished cell of ``RUN_DIR`` (records and sets checked against its manifest, as ``server.report``
reads them) is evaluated again with the run's ``evaluation`` section changed by the ``--set`` overrides
(only ``evaluation.*`` keys: the sets stay what they are), on the split the overrides name (default: the
run's). The seeds are the cell's own, so two methods of one distillation seed stay paired. The run folder
is only read; ``DIR`` receives ``reevaluation.md`` (the protocol, the table old vs new, the paired
differences under the new protocol) and ``reevaluation.csv`` (one row per cell). Nothing is downloaded.
Exit status 2 with one line for a bad folder, key or value.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.datasets import federation_train_set, normalize
from common.device import pick_device
from common.evaluate import evaluate_synthetic
from common.grid import parse_cell_filter, pipc_label
from common.models import build_model
from common.scenario import Scenario, ScenarioError, overrides_from_run_config, scenario_from_dict
from common.threads import setup_process
from server.reports.figures import load_run_scenario
from server.reports.stats import paired_markdown, pooled
from server.reports.tables import format_cell
from server.store.artifacts import load_synthetic_artifact
from server.store.manifest import ManifestError
from server.store.run_folder import RunFolderError, one_line, write_csv, write_text
from server.sweep.cells import read_cells
from server.sweep.result import CellResult

__all__ = ["protocol_scenario", "reevaluate", "main"]


def protocol_scenario(run: Scenario, sets: Sequence[str]) -> Scenario:
    """``run`` with its evaluation section changed by ``KEY=VALUE`` items (``evaluation.*`` only), validated."""
    overrides: dict = {}
    for item in sets:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected KEY=VALUE, e.g. --set evaluation.optimizer=sam")
        parsed = overrides_from_run_config({"overrides": item})
        bad = [k for k in parsed if not k.startswith("evaluation.")]
        if bad:
            raise ScenarioError(f"--set {item!r}: only evaluation.* keys change here (the sets are already "
                                f"distilled); {bad[0]!r} is not one")
        overrides.update(parsed)
    values = run.to_dict()
    values["data"] = {**values["data"], "download": False}  # never fetch data to re-score a folder
    return scenario_from_dict(values, source=f"{run.source} + --set", overrides=overrides)


def _selected(cells: Sequence[CellResult], text: str | None) -> list[CellResult]:
    ok = [c for c in cells if not c.skipped and c.files.get("synthetic")]
    if not text:
        return ok
    wanted = parse_cell_filter(text)
    return [c for c in ok if all(getattr(c, k) in v for k, v in wanted.items())]


def reevaluate(run_dir: Path, out: Path, sets: Sequence[str], cells_filter: str | None = None,
               device: str = "auto", progress: bool = False) -> list[tuple[CellResult, CellResult]]:
    """(cell as recorded, cell scored under the new protocol) for every selected cell; writes ``out``."""
    run = load_run_scenario(run_dir)
    scenario = protocol_scenario(run, sets)
    cells = _selected(read_cells(run_dir, run), cells_filter)
    if not cells:
        raise ScenarioError(f"{run_dir}: no finished cell with a synthetic set matches {cells_filter or 'the grid'!r}")
    data = federation_train_set(scenario)
    meta = data.meta
    score_x, score_y = data.scoring_split(scenario.evaluation.split)
    score_x = normalize(score_x, meta)
    ecfg = scenario.evaluation
    factory = functools.partial(build_model, meta, {"width": ecfg.width, "depth": ecfg.depth})
    dev = pick_device(device)
    pairs = []
    for i, cell in enumerate(cells, 1):
        syn = load_synthetic_artifact(cell.files["synthetic"], meta=meta)
        t0 = time.perf_counter()
        res = evaluate_synthetic(syn.x, syn.y, score_x, score_y, factory, ecfg, seed=cell.seed, device=dev,
                                 progress=progress)
        new = dataclasses.replace(cell, accuracies=list(res.accuracies), mean=res.mean, std=res.std,
                                  eval_s=time.perf_counter() - t0)
        pairs.append((cell, new))
        print(f"[reevaluate] {i}/{len(cells)} {cell.method} ipc {cell.ipc} pipc {pipc_label(cell.pipc)} seed "
              f"{cell.seed}: {100 * cell.mean:.2f} -> {100 * new.mean:.2f} ({new.eval_s:.0f} s)", flush=True)
    _write(out, run_dir, run, scenario, sets, pairs)
    return pairs


def _protocol(s: Scenario) -> str:
    e = s.evaluation
    return (f"{e.optimizer} lr {e.resolved_lr:g}{f' rho {e.rho:g}' if e.optimizer == 'sam' else ''}, {e.epochs} "
            f"epochs, {e.num_models} models, ConvNet width {e.width} depth {e.depth}, DSA {e.dsa}, split {e.split}")


def _write(out: Path, run_dir: Path, run: Scenario, new: Scenario, sets: Sequence[str],
           pairs: Sequence[tuple[CellResult, CellResult]]) -> None:
    table = [["method", "ipc", "pipc", "seed", "recorded_mean", "new_mean", "new_std", "new_accuracies"]]
    table += [[old.method, old.ipc, pipc_label(old.pipc), old.seed, f"{old.mean:.6f}", f"{cur.mean:.6f}",
               f"{cur.std:.6f}", " ".join(f"{a:.6f}" for a in cur.accuracies)] for old, cur in pairs]
    write_csv(out / "reevaluation.csv", table)
    groups: dict[tuple[int, int, str], tuple[dict, dict]] = {}
    for old, cur in pairs:
        g = groups.setdefault((old.ipc, old.pipc, old.method), ({}, {}))
        g[0][old.seed], g[1][old.seed] = old.accuracies, cur.accuracies
    lines = [f"# Re-evaluation of {run_dir}", "",
             f"Recorded protocol: {_protocol(run)}.", f"New protocol: {_protocol(new)} (`--set {' '.join(sets)}`).",
             "The synthetic sets are the run's; each cell keeps its seed. Accuracy %, mean ± std over seeds × models.",
             "", "| ipc | pipc | method | seeds | recorded | new protocol |", "|---|---|---|---|---|---|"]
    for (ipc, pipc, method), (old, cur) in sorted(groups.items()):
        lines.append(f"| {ipc} | {pipc_label(pipc)} | {method} | {len(cur)} | {format_cell(*pooled(old)[:2])} | "
                     f"{format_cell(*pooled(cur)[:2])} |")
    lines += paired_markdown([c for _, c in pairs], label=pipc_label)
    write_text(out / "reevaluation.md", "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run folder (server.report's input)")
    p.add_argument("--out", type=Path, required=True, help="folder for reevaluation.md / .csv (not the run folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation override (repeatable): --set evaluation.optimizer=sam --set evaluation.width=64")
    p.add_argument("--cells", help="only these cells, e.g. 'method=dm,dkkt_dm; ipc=1'")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    setup_process("server")
    if a.out.resolve() == a.run_dir.resolve() or a.run_dir.resolve() in a.out.resolve().parents:
        print(f"server.reevaluate: --out {a.out} is inside the run folder; the run folder is only read", file=sys.stderr)
        return 2
    try:
        reevaluate(a.run_dir, a.out, a.set, a.cells, a.device, progress=sys.stderr.isatty())
    except (ScenarioError, ManifestError, RunFolderError, OSError, ValueError) as err:
        print(f"server.reevaluate: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"[reevaluate] written: {a.out / 'reevaluation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
