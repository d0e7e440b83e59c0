"""Can real data satisfy the stationarity condition of a run's theta*?

    python -m server.diagnose_stationarity RUN_DIR [--samples 500] [--path-points 5] [--nnls-samples 100]
        [--real train|safe] [--target update|theta] [--cells PATTERN | --no-cells] [--out DIR] [--device auto]

For the run's theta* (``global_model.pt``, checked against the manifest) and theta_0 (rebuilt from the
scenario seed, as server.pipeline builds it), cos(target, -sum_i lambda_i grad_theta L_i) with the
gradients taken at theta_0 + t (theta* - theta_0) for ``--path-points`` values of t from 0 to 1 and for
their mean (common/distill/stationarity.py):

- ``--samples`` real images (``--real train``: the federation's training view, a seeded random sample;
  ``safe``: the run's safe pool) with uniform lambda, and the best lambda >= 0 (NNLS) over the first
  ``--nnls-samples`` of them;
- every DKKT cell's synthetic set (``--cells``: a glob on the cell name) with its learned lambda,
  uniform lambda and NNLS.

Writes ``stationarity.md`` (one table per theta*) and ``stationarity.csv`` into ``--out`` (default:
the run folder). Exit status 2 with a one-line reason for a folder that is not a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.datasets import federation_train_set, get_meta, normalize
from common.device import pick_device
from common.distill.dkkt import stationarity_target
from common.distill.stationarity import DIAGNOSTIC_COLUMNS, diagnose, markdown_table
from common.methods import needs_model
from common.models import build_model
from common.threads import setup_process
from server.reports.figures import load_run_scenario
from server.store.artifacts import build_model_from_artifact, load_model_artifact, load_safe_artifact, \
    load_synthetic_artifact
from server.store.manifest import verify_files
from server.sweep.cells import read_cells
from server.store.run_folder import write_dict_csv, write_text

__all__ = ["diagnose_run", "main"]


def _real_sample(run_dir: Path, scenario: Any, meta: Any, source: str, samples: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "safe":
        verify_files(run_dir, ["safe_pool.pt"], required=True)
        safe = load_safe_artifact(run_dir / "safe_pool.pt", meta=meta)
        x, y = safe.x, safe.y
    else:
        data = federation_train_set(scenario)
        x, y = data.train_x, data.train_y
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return normalize(x[pick], meta), y[pick].to(torch.int64)


def diagnose_run(run_dir: str | Path, samples: int = 500, path_points: int = 5, nnls_samples: int = 100,
                 real: str = "train", target: str | None = None, cells: str | None = "*",
                 device: str = "auto", seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, facts) of the diagnostic; ``facts`` holds the norms that check theta_0 was rebuilt right."""
    run_dir = Path(run_dir).resolve()
    scenario = load_run_scenario(run_dir)
    meta = get_meta(scenario.data.dataset)
    dev = pick_device(device)
    verify_files(run_dir, ["global_model.pt"], required=True)
    art = load_model_artifact(run_dir / "global_model.pt", dataset=meta.name)
    model = build_model_from_artifact(art, meta).to(dev).eval()
    # theta_0: FedAvg's starting point, the scenario-seeded network of the model section (server.pipeline)
    init = build_model(meta, dataclasses.asdict(scenario.model), seed=scenario.seed).to(dev).eval()
    kind = target or scenario.distill.resolved().stat_target
    goal = stationarity_target(model, init if kind == "update" else None)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = theta - torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    facts = {"theta_norm": float(theta.norm()), "update_norm": float(delta.norm()), "target": kind,
             "dataset": meta.name, "params": int(theta.numel())}

    sets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    if samples > 0:
        x, y = _real_sample(run_dir, scenario, meta, real, samples, seed)
        sets[f"real ({real})"] = (x.to(dev), y.to(dev), None)
    if cells is not None:
        for c in read_cells(run_dir, scenario):
            syn = c.files.get("synthetic")
            name = Path(syn).stem if syn else ""
            if c.skipped or not syn or not needs_model(c.method) or not fnmatch.fnmatch(name, cells):
                continue
            s = load_synthetic_artifact(syn, meta=meta, cell=(c.method, c.pipc))
            lam = s.info.get("lambda")
            lam_t = None
            if isinstance(lam, list) and len(lam) == s.x.shape[0] and all(isinstance(v, (int, float)) for v in lam):
                lam_t = torch.tensor([float(v) for v in lam], dtype=torch.float32)
                lam_t = lam_t.clamp_min(0.0).to(dev) if bool(torch.isfinite(lam_t).all()) else None
            sets[name] = (s.x.to(dev), s.y.to(dev), lam_t)
    rows = diagnose(model, init, goal, sets, points=path_points, nnls_samples=nnls_samples)
    return rows, facts


def _write(rows: list[dict[str, Any]], facts: dict[str, Any], run_dir: Path, out: Path, argv: Sequence[str]) -> None:
    write_dict_csv(out / "stationarity.csv", DIAGNOSTIC_COLUMNS, rows)
    target = "theta* - theta_0" if facts["target"] == "update" else "theta*"
    lines = [f"# Stationarity diagnostic of {run_dir.name}", "",
             f"`python -m server.diagnose_stationarity {' '.join(argv)}`", "",
             f"theta*: {facts['params']:,} parameters, ||theta*|| = {facts['theta_norm']:.4g}, "
             f"||theta* - theta_0|| = {facts['update_norm']:.4g} (ratio {facts['update_norm'] / max(facts['theta_norm'], 1e-30):.3f}; "
             "a theta_0 rebuilt from a wrong seed gives a ratio near 1 or above).", "",
             f"cos({target}, -sum_i lambda_i grad L_i) with the gradients at theta_0 + t (theta* - theta_0): "
             "t = 0 is theta_0, t = 1 is theta*, 'path mean' the mean gradient over the points (distill.stat_at "
             "path). lambda: uniform (all 1), the multipliers the distillation learned, or the best non-negative "
             "weighting (NNLS, the largest cosine any lambda >= 0 reaches).", "",
             *markdown_table(rows), ""]
    write_text(out / "stationarity.md", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.diagnose_stationarity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run folder (scenario.resolved.yaml, global_model.pt, cells/)")
    parser.add_argument("--samples", type=int, default=500, help="real images with uniform lambda (0: none)")
    parser.add_argument("--path-points", type=int, default=5, help="points of the path theta_0 -> theta* (1: theta*)")
    parser.add_argument("--nnls-samples", type=int, default=100, help="images per set in the NNLS (0: no NNLS)")
    parser.add_argument("--real", choices=("train", "safe"), default="train",
                        help="real images: the federation's training view or the run's safe pool")
    parser.add_argument("--target", choices=("update", "theta"), default=None,
                        help="theta* - theta_0 or theta* (default: the run's distill.stat_target)")
    parser.add_argument("--cells", default="*", help="glob on the DKKT cells' names whose sets are diagnosed")
    parser.add_argument("--no-cells", action="store_true", help="real images only")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the run folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the real-image sample")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    for flag, value, low in (("--samples", args.samples, 0), ("--path-points", args.path_points, 1),
                             ("--nnls-samples", args.nnls_samples, 0)):
        if value < low:
            print(f"server.diagnose_stationarity: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    setup_process("server")
    try:
        rows, facts = diagnose_run(args.run_dir, args.samples, args.path_points, args.nnls_samples, args.real,
                                   args.target, None if args.no_cells else args.cells, args.device, args.seed)
        out = args.out if args.out is not None else args.run_dir
        _write(rows, facts, Path(args.run_dir).resolve(), out, raw)
    except (ValueError, FileNotFoundError, OSError) as err:  # ArtifactError, ManifestError, ScenarioError ...
        print(f"server.diagnose_stationarity: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"stationarity: {out / 'stationarity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
