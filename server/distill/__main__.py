"""Offline distillation from cached artifacts (no Flower needed).

    python -m server.distill --model MODEL.pt --safe SAFE.pt --dataset fashion-mnist \\
        --method dkkt_dm --ipc 1 --pipc 10 --iterations 200 --eval-epochs 50 --num-models 3 \\
        --out runs/offline [--data-root DIR] [--device auto] [--seed 0]

MODEL.pt: ``{"state_dict", "arch", "dataset"}``; SAFE.pt: ``{"x": uint8 N×C×H×W,
"y": int64 N, "dataset"}`` (see ``server/store/artifacts.py``). Writes into ``--out``:
``synthetic_<method>_ipc<k>_pipc<p>.pt`` (+ ``.png`` grid) and appends one row to
``results.json`` (a list) and ``results.csv``. ``--eval-epochs 0`` skips evaluation.
Exit status: 0 ok, 1 distillation diverged (NaN/Inf), 2 bad arguments or input files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flwr.common.logger  # noqa: F401  configures the "flwr" logger: off a terminal the progress lines go there
import torch

from common.methods import METHODS, spec
from common.config import DistillConfig, EvalConfig, add_arguments, from_arguments
from common.distill.synthesize import DistillationError, synthesize
from common.scenario import load_scenario
from common.datasets import get_meta, load_dataset, normalize
from common.device import pick_device
from common.models import build_model
from server.store.artifacts import (
    build_model_from_artifact, load_model_artifact, load_safe_artifact,
    load_synthetic_artifact, save_synthetic_artifact,
    )
from common.distill.synthesize import make_embed_factory
from common.evaluate import evaluate_synthetic
from server.reports.images import save_image_grid
from common.threads import setup_process
from server.store.run_folder import RunFolder, write_text

RESULT_COLUMNS = (
    "timestamp", "dataset", "method", "ipc", "pipc", "seed", "iterations", "iterations_done",
    "stopped_reason", "alpha", "gamma", "init", "distill_wall_s", "eval_optimizer", "eval_epochs",
    "num_models", "acc_mean", "acc_std", "accuracies", "eval_wall_s", "device", "synthetic",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="MODEL.pt (trained theta*); needed by dsv, dsv_real, dkkt_dm")
    p.add_argument("--safe", type=Path, help="SAFE.pt (safe set T'); needed by every method except dsv")
    p.add_argument("--dataset", required=True, help="cifar10 | fashion-mnist | mnist | cifar100 | svhn")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--ipc", type=int, required=True, help="synthetic images per class")
    p.add_argument("--pipc", type=int, default=None,
                   help="safe images per class to use (default: all in SAFE.pt; 0 without --safe)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", default=None, help="folder with the dataset files (test split)")
    p.add_argument("--download", action="store_true", help="allow a torchvision download of the dataset")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on a class-balanced subset")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dsv", type=Path, default=None, help="blend: synthetic_dsv_*.pt with pre-extracted DSVs")
    p.add_argument("--width", type=int, default=None, help="ConvNet width when no --model is given")
    p.add_argument("--depth", type=int, default=None, help="ConvNet depth when no --model is given")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed of theta_0, the network FedAvg started from (--stat-target update; default: 'seed' "
                        "of the scenario.resolved.yaml beside --model)")
    # Generated from the config model (common/config.py): --<field> for each DistillConfig knob, --eval-<field>
    # for each EvalConfig one, with the field's type, default and help; older names (--time-budget,
    # --num-models) are kept as aliases. --no-dsa / --no-eval-dsa come from the boolean fields.
    add_arguments(p.add_argument_group("distillation (DistillConfig, scenario section distill)"), DistillConfig)
    add_arguments(p.add_argument_group("evaluation (EvalConfig, scenario section evaluation; --eval-epochs 0 "
                                       "skips evaluation)"), EvalConfig, prefix="eval-")
    p.add_argument("--no-progress", action="store_true")
    return p


def _arch(args: argparse.Namespace, model_arch: dict[str, Any] | None) -> dict[str, Any]:
    arch = dict(model_arch or {})
    for key in ("width", "depth"):
        val = getattr(args, key)
        if val is None:
            continue
        if model_arch is not None and key in arch and arch[key] != val:
            raise ValueError(f"--{key} {val} contradicts {args.model}, whose arch has {key}={arch[key]}")
        arch[key] = val
    return arch


def _init_seed(args: argparse.Namespace) -> int:
    """--init-seed, else the 'seed' of the run folder that produced --model."""
    if args.init_seed is not None:
        return int(args.init_seed)
    resolved = Path(args.model).with_name("scenario.resolved.yaml")
    if resolved.is_file():
        return int(load_scenario(resolved).seed)
    raise ValueError(f"--stat-target update needs theta_0's seed: pass --init-seed (the scenario seed of the run "
                     f"that trained {args.model}), or --stat-target theta")


def append_results(out_dir: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``out_dir/results.json`` (a list) and ``out_dir/results.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / "results.json"
    rows: list[Any] = []
    if jpath.exists():
        try:
            rows = json.loads(jpath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{jpath} exists but is not valid JSON ({exc}); move it away") from exc
        if not isinstance(rows, list):
            raise ValueError(f"{jpath} must hold a JSON list of result rows")
    rows.append(row)
    write_text(jpath, json.dumps(rows, indent=2))
    cpath = out_dir / "results.csv"
    old = RunFolder(out_dir).read_text("results.csv") if cpath.exists() else ""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    if not old:
        w.writeheader()
    flat = dict(row)
    if isinstance(flat.get("accuracies"), list):
        flat["accuracies"] = ";".join(f"{a:.4f}" for a in flat["accuracies"])
    w.writerow(flat)
    write_text(cpath, old + buf.getvalue())  # the rows so far plus this one, replaced atomically


def run(args: argparse.Namespace) -> dict[str, Any]:
    meta = get_meta(args.dataset)
    device = pick_device(args.device)
    model = None
    model_arch = None
    if args.model is not None:
        art = load_model_artifact(args.model, dataset=meta.name)
        model_arch = art.arch
        model = build_model_from_artifact(art, meta)
    arch = _arch(args, model_arch)
    safe_x = safe_y = None
    counts: list[int] = []
    if args.safe is not None:
        safe = load_safe_artifact(args.safe, meta=meta)
        safe_x, safe_y = safe.x, safe.y  # uint8: synthesize normalizes each drawn batch (4x less memory)
        counts = torch.bincount(safe.y, minlength=meta.num_classes).tolist()
    if args.pipc is not None and args.pipc > 0 and counts and args.pipc > min(counts):
        # a cell labelled pipc 50 that used 10 images per class would report a setting it never had
        fewest = min(range(len(counts)), key=counts.__getitem__)
        raise ValueError(f"--pipc {args.pipc}: {args.safe} holds only {counts[fewest]} images of class {fewest} "
                         f"(fewest of any class); use --pipc {counts[fewest]} or less, or a larger safe pool")
    pipc = args.pipc if args.pipc is not None else max(counts, default=0)
    dsv_x = dsv_y = None
    if args.dsv is not None:
        if args.method != "blend":
            raise ValueError(f"--dsv is only used by --method blend, not {args.method!r}")
        d = load_synthetic_artifact(args.dsv, meta=meta)
        dsv_x, dsv_y = d.x, d.y

    cfg = from_arguments(DistillConfig, args, section="distill")
    init_model = None
    ms = spec(args.method)
    needs_kkt = ms.needs_model or (ms.uses_dsvs and dsv_x is None)
    if model is not None and needs_kkt and cfg.resolved().stat_target == "update":
        init_model = build_model(meta, arch, seed=_init_seed(args))
    tag = f"{args.method}_ipc{args.ipc}_pipc{pipc}"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    syn = synthesize(
        args.method, ipc=args.ipc, num_classes=meta.num_classes, image_shape=meta.image_shape, pipc=pipc,
        safe_x=safe_x, safe_y=safe_y, model=model, embed_factory=make_embed_factory(meta, arch),
        config=cfg, seed=args.seed, device=device, progress=not args.no_progress,
        checkpoint_path=out / f"checkpoint_{tag}.pt" if args.checkpoint_every else None,
        dsv_x=dsv_x, dsv_y=dsv_y, init_model=init_model, safe_normalize=lambda x: normalize(x, meta),
    )
    syn_path = save_synthetic_artifact(out / f"synthetic_{tag}.pt", syn, dataset=meta.name, pipc=pipc)
    save_image_grid(syn.x, syn.y, out / f"synthetic_{tag}.png", meta, title=f"{args.method} ipc={args.ipc} pipc={pipc}")

    row: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "dataset": meta.name, "method": args.method,
        "ipc": args.ipc, "pipc": pipc, "seed": args.seed, "iterations": args.iterations,
        "iterations_done": syn.info.get("iterations_done"), "stopped_reason": syn.info.get("stopped_reason"),
        "alpha": syn.info.get("alpha"), "gamma": syn.info.get("gamma"), "init": syn.info.get("init"),
        "distill_wall_s": round(float(syn.info.get("wall_s", 0.0)), 3), "device": str(device),
        "synthetic": str(syn_path), "eval_epochs": args.eval_epochs, "num_models": args.eval_num_models,
        "eval_optimizer": args.eval_optimizer, "acc_mean": None, "acc_std": None, "accuracies": None,
        "eval_wall_s": None,
    }
    if args.eval_epochs > 0:
        splits = load_dataset(meta.name, root=args.data_root, download=args.download)
        if args.test_limit:
            splits = splits.limit(test_limit=args.test_limit, seed=args.seed)
        ecfg = from_arguments(EvalConfig, args, prefix="eval-", section="evaluation")
        res = evaluate_synthetic(
            syn.x, syn.y, normalize(splits.test_x, meta), splits.test_y,
            lambda s: build_model(meta, {"width": ecfg.width, "depth": ecfg.depth}, seed=s), ecfg,
            seed=args.seed, device=device,
            progress=not args.no_progress,
        )
        row.update(acc_mean=res.mean, acc_std=res.std, accuracies=res.accuracies,
                   eval_wall_s=round(res.wall_s, 3))
    append_results(out, row)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_process("server")  # an entry point: the ServerApp's thread policy (common/threads.py)
    try:
        row = run(args)
    except DistillationError as exc:
        print(f"error: distillation diverged: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:  # ArtifactError / DatasetError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    acc = "" if row["acc_mean"] is None else f", accuracy {100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f} %"
    print(f"{row['method']} ipc={row['ipc']} pipc={row['pipc']}: {row['synthetic']}{acc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
