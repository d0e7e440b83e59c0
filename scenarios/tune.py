"""Tune each method's image optimizer alike, on the validation split, never on the test split.

    python scenarios/tune.py --scenario scenarios/core-fed.yaml --fed runs/core-fed-s0 \\
        --out runs/core-fed-s0-tuning [--methods dm,dkkt_dm] [--grid "sgd:0.3,1,3,10;adam:0.03,0.1,0.3,1"] \\
        [--ipc 1] [--pipc 10] [--seeds 0 1] [--num-models 3] [--report-only]

Every method gets the same search: each (image optimizer, lr) of ``--grid`` at the scenario's
distillation budget (``distill.iterations``, its init rule, its evaluation protocol), on theta* and
the safe pool of the federated run folder ``--fed``, scored on ``evaluation.split: validation``
(``data.validation_size`` training images that no client trains on or shares). One run folder per
setting under ``--out`` (``python -m server.pipeline ... --set``; a rerun resumes its cells). The
pick is each method's best mean validation accuracy over seeds x models.

Writes ``<out>/tuning.md`` (what was tried, every score, what was picked) and
``<out>/method_settings.yaml`` (the picks as ``distill.method_settings``, to paste into the
scenario or pass with ``--set``). Methods without image optimisation (random_real, dm_reference,
whose recipe fixes SGD lr 1) are not tuned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GRID = "sgd:0.3,1,3,10;adam:0.03,0.1,0.3,1"  # a decade each side of the references' SGD lr 1 / Adam 0.1
LR_KEY = {"sgd": "lr_img", "adam": "lr_img_adam"}


def parse_grid(text: str) -> list[tuple[str, float]]:
    """'sgd:0.3,1;adam:0.1' -> [('sgd', 0.3), ('sgd', 1.0), ('adam', 0.1)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        opt, _, lrs = part.partition(":")
        if opt not in LR_KEY or not lrs:
            raise ValueError(f"--grid part {part!r}: expected sgd:LR,LR... or adam:LR,LR...")
        out += [(opt, float(lr)) for lr in lrs.split(",")]
    return out


def setting_name(opt: str, lr: float) -> str:
    return f"{opt}-lr{lr:g}"


def run_setting(a: argparse.Namespace, opt: str, lr: float) -> Path:
    out = a.out / setting_name(opt, lr)
    sets = {"output_dir": str(out), "name": f"tune-{setting_name(opt, lr)}", "evaluation.split": "validation",
            "evaluation.num_models": a.num_models, "distill.methods": a.methods, "distill.ipc": [a.ipc],
            "distill.pipc": [a.pipc], "distill.seeds": a.seeds, "distill.img_optimizer": opt,
            f"distill.{LR_KEY[opt]}": lr, "distill.method_settings": {}, "privacy.audit": False}
    if opt == "sgd":
        sets["distill.momentum_img"] = 0.5  # the DM reference's image momentum
    cmd = [sys.executable, "-m", "server.pipeline", str(a.scenario), "--reuse", str(a.fed)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    print(f"[tune] {setting_name(opt, lr)}: {' '.join(cmd[3:5])} -> {out}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def scores(folder: Path) -> dict[str, list[float]]:
    """Per method: every (seed, model) validation accuracy of a finished setting's run folder."""
    out: dict[str, list[float]] = {}
    for rec in sorted((folder / "cells").glob("*.json")):
        r = json.loads(rec.read_text())
        if "result" not in r:
            continue
        if r["config"]["evaluation"].get("split") != "validation":
            raise ValueError(f"{rec} was not scored on the validation split: a choice never looks at the test split")
        out.setdefault(r["cell"]["method"], []).extend(r["result"]["accuracies"])
    return out


def report(a: argparse.Namespace, grid: list[tuple[str, float]]) -> dict[str, dict]:
    table: dict[str, dict[str, list[float]]] = {}
    for opt, lr in grid:
        for method, acc in scores(a.out / setting_name(opt, lr)).items():
            table.setdefault(method, {})[setting_name(opt, lr)] = acc
    picks: dict[str, dict] = {}
    lines = [f"# Image-optimizer search on the validation split ({a.fed})", "",
             f"Same search for every method: {', '.join(setting_name(o, l) for o, l in grid)}; ipc {a.ipc}, pipc "
             f"{a.pipc}, distillation seeds {a.seeds}, {a.num_models} evaluation models each; the scenario's budget "
             f"({a.scenario}). Scored on `evaluation.split: validation`; mean ± std (%) over seeds x models.", "",
             "| method | " + " | ".join(setting_name(o, l) for o, l in grid) + " | picked |",
             "|---|" + "---|" * (len(grid) + 1)]
    for method in a.methods:
        row = table.get(method, {})
        cells, best = [], None
        for opt, lr in grid:
            acc = row.get(setting_name(opt, lr))
            if not acc:
                cells.append("not run")
                continue
            m = statistics.fmean(acc)
            cells.append(f"{100 * m:.2f} ± {100 * statistics.pstdev(acc):.2f}")
            if best is None or m > best[0]:
                best = (m, opt, lr)
        if best is not None:
            picks[method] = {"img_optimizer": best[1], LR_KEY[best[1]]: best[2]}
            if best[1] == "sgd":
                picks[method]["momentum_img"] = 0.5
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {setting_name(best[1], best[2]) if best else '-'} |")
    lines += ["", "Picked settings (`distill.method_settings`):", "", "```yaml",
              yaml.safe_dump({"method_settings": picks}, sort_keys=True).rstrip(), "```", ""]
    (a.out / "tuning.md").write_text("\n".join(lines))
    (a.out / "method_settings.yaml").write_text(yaml.safe_dump(picks, sort_keys=True))
    print("\n".join(lines))
    return picks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", type=Path, required=True)
    p.add_argument("--fed", type=Path, required=True, help="federated run folder: global_model.pt, safe_pool.pt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="dm,dkkt_dm")
    p.add_argument("--grid", default=DEFAULT_GRID)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--pipc", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-models", type=int, default=3)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    try:
        grid = parse_grid(a.grid)
    except ValueError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    if not grid:
        p.exit(2, f"{p.prog}: error: --grid is empty\n")
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for opt, lr in grid:
            run_setting(a, opt, lr)
            report(a, grid)  # after every setting: the log so far
    report(a, grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
