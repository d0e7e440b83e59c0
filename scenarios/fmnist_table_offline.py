"""Fashion-MNIST table in the paper's form (Table 1), offline, on the CPU.

    python scenarios/fmnist_table_offline.py prepare [--width 32] [--train-epochs 2]
    python scenarios/fmnist_table_offline.py table   [--iterations 400] [--eval-epochs 300]
    python scenarios/fmnist_table_offline.py tune --method dkkt_dm --ipc 1 --pipc 10 \\
        --set img_optimizer=adam --set lr_img_adam=0.01 --tag adam0.01

Stages (all write under ``--out``, default ``runs/fmnist-table-offline``):

- ``prepare``: trains the application ConvNet-3 centrally on the Fashion-MNIST training set
  (plain SGD, a few epochs; it stands in for theta* from FedAvg) and saves it with
  ``server.artifacts.save_model_artifact`` as ``model.pt``; draws a seeded safe pool of 50
  images per class from the training set (``safe.pt``, ``save_safe_artifact``; pipc 10 =
  its first 10 per class, so the pools are nested) and a disjoint, seeded, class-balanced
  VALIDATION split of 2,000 other training images (``val_idx.pt``). Tuning decisions are
  taken on that validation split, never on the test set.
- ``table``: distills and evaluates every cell of methods x ipc x pipc (default dm, dsv,
  dkkt_dm, random_real x ipc 1, 10 x pipc 10, 50) on the full 10k test set, appending one
  row per cell to ``results.csv`` / ``results.json`` and rewriting ``results.md``; synthetic
  sets and PNG grids go to ``synthetic/``. Cells already in ``results.json`` (same key) are
  skipped, so an interrupted run resumes.
  ``--tag T`` with ``--set`` adds a variant column "method [T]" (e.g. the old SGD image optimizer).
- ``tune``: one cell evaluated on the validation split, with DistillConfig overrides
  (``--set key=value``), rows into ``<out>/tuning/results.csv``.

Data: ``common.datasets.load_dataset('fashion-mnist')`` (Debian's
/usr/share/datasets/fashion-mnist). Every run uses one torch thread unless
``--threads`` says otherwise (the machine is shared).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.datasets import balanced_subset_indices, get_meta, load_dataset, normalize  # noqa: E402
from common.models import build_model  # noqa: E402
from server.artifacts import (  # noqa: E402
    build_model_from_artifact, load_model_artifact, load_safe_artifact, save_model_artifact,
    save_safe_artifact, save_synthetic_artifact,
)
from server.distill.synthesize import DistillConfig, make_embed_factory, synthesize  # noqa: E402
from server.evaluate import EvalConfig, evaluate_synthetic, test_accuracy  # noqa: E402
from server.images import save_image_grid  # noqa: E402

DATASET = "fashion-mnist"
COLUMNS = ("method", "ipc", "pipc", "split", "tag", "iterations", "eval_optimizer", "eval_epochs",
           "num_models", "acc_mean", "acc_std", "accuracies", "distill_wall_s", "eval_wall_s",
           "alpha", "gamma", "init", "overrides", "lambda_mean_end", "seed")


# --------------------------------------------------------------------------- prepare

def prepare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = get_meta(DATASET)
    splits = load_dataset(DATASET)
    n_train = splits.train_y.numel()
    g = np.random.default_rng(args.seed)
    # safe pool: args.safe_per_class per class, in a seeded random order (first k = pipc k)
    safe_idx = []
    for c in range(meta.num_classes):
        idx = np.flatnonzero(splits.train_y.numpy() == c)
        safe_idx.append(g.permutation(idx)[:args.safe_per_class])
    safe_idx = np.stack(safe_idx, 1).reshape(-1)  # interleaved; class order inside per class kept
    safe_idx_t = torch.from_numpy(safe_idx)
    save_safe_artifact(out / "safe.pt", splits.train_x[safe_idx_t], splits.train_y[safe_idx_t], DATASET,
                       extra={"seed": args.seed, "per_class": args.safe_per_class,
                              "train_indices": safe_idx.tolist()})
    # validation split for tuning: class-balanced, disjoint from the safe pool
    rest = np.setdiff1d(np.arange(n_train), safe_idx)
    pick = balanced_subset_indices(splits.train_y[torch.from_numpy(rest)], args.val_size, seed=args.seed + 1)
    val_idx = torch.from_numpy(rest)[pick]
    torch.save(val_idx, out / "val_idx.pt")

    # theta*: central SGD on the training set minus the validation split
    torch.manual_seed(args.seed)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[val_idx] = False
    x = normalize(splits.train_x[keep], meta)
    y = splits.train_y[keep]
    arch = {"width": args.width, "depth": 3}
    model = build_model(meta, arch, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.train_lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    steps = args.train_epochs * ((x.shape[0] + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.train_lr, total_steps=steps)
    for ep in range(args.train_epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 128):
            b = perm[i:i + 128]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc, _ = test_accuracy(model, normalize(splits.test_x, meta), splits.test_y, "cpu")
        print(f"epoch {ep + 1}: loss {float(loss):.3f} test acc {100 * acc:.2f} % ({time.monotonic() - t0:.0f} s)",
              flush=True)
    train_s = time.monotonic() - t0
    save_model_artifact(out / "model.pt", model, arch, DATASET,
                        extra={"test_acc": acc, "train_epochs": args.train_epochs, "train_lr": args.train_lr,
                               "train_wall_s": train_s, "optimizer": "SGD m0.9 wd5e-4 one-cycle, batch 128",
                               "train_size": int(x.shape[0]), "seed": args.seed})
    print(json.dumps({"theta_test_acc": acc, "train_wall_s": round(train_s, 1), "arch": arch}))


# --------------------------------------------------------------------------- cells

def _parse_sets(items: list[str]) -> dict[str, Any]:
    names = {f.name: f for f in fields(DistillConfig)}
    out: dict[str, Any] = {}
    for item in items:
        k, _, v = item.partition("=")
        if k not in names:
            raise SystemExit(f"--set: unknown DistillConfig field {k!r}; fields: {sorted(names)}")
        cur = getattr(DistillConfig(), k)
        if isinstance(cur, bool):
            out[k] = v.lower() in ("1", "true", "yes")
        elif isinstance(cur, int) and not isinstance(cur, bool):
            out[k] = int(v)
        elif isinstance(cur, float) or cur is None:
            out[k] = None if v.lower() == "none" else float(v)
        else:
            out[k] = v
    return out


def _load(out: Path):
    meta = get_meta(DATASET)
    art = load_model_artifact(out / "model.pt", dataset=DATASET)
    model = build_model_from_artifact(art, meta).eval()
    safe = load_safe_artifact(out / "safe.pt", meta=meta)
    return meta, art, model, safe


def run_cell(*, method: str, ipc: int, pipc: int, meta, art, model, safe, eval_x, eval_y, split: str,
             iterations: int, eval_cfg: EvalConfig, overrides: dict[str, Any], seed: int, out_dir: Path,
             tag: str) -> dict[str, Any]:
    cfg = DistillConfig(iterations=iterations, log_every=max(1, iterations // 10), **overrides)
    syn = synthesize(method, ipc=ipc, num_classes=meta.num_classes, image_shape=meta.image_shape, pipc=pipc,
                     safe_x=normalize(safe.x, meta), safe_y=safe.y, model=model,
                     embed_factory=make_embed_factory(meta, art.arch), config=cfg, seed=seed, device="cpu",
                     progress=False)
    name = f"{method}_ipc{ipc}_pipc{pipc}" + (f"_{tag}" if tag else "")
    (out_dir / "synthetic").mkdir(parents=True, exist_ok=True)
    save_synthetic_artifact(out_dir / "synthetic" / f"{name}.pt", syn, dataset=DATASET, pipc=pipc)
    save_image_grid(syn.x, syn.y, out_dir / "synthetic" / f"{name}.png", meta,
                    title=f"{method} ipc={ipc} pipc={pipc} {tag}".strip())
    res = evaluate_synthetic(syn.x, syn.y, eval_x, eval_y, lambda s: build_model(meta, art.arch, seed=s),
                             eval_cfg, seed=seed, device="cpu", progress=False)
    lam = syn.info.get("lambda")
    return {
        "method": method, "ipc": ipc, "pipc": pipc, "split": split, "tag": tag,
        "iterations": syn.info.get("iterations_done", 0), "eval_optimizer": eval_cfg.optimizer,
        "eval_epochs": eval_cfg.epochs, "num_models": eval_cfg.num_models,
        "acc_mean": res.mean, "acc_std": res.std, "accuracies": ";".join(f"{a:.4f}" for a in res.accuracies),
        "distill_wall_s": round(float(syn.info.get("wall_s", 0.0)), 1), "eval_wall_s": round(res.wall_s, 1),
        "alpha": syn.info.get("alpha"), "gamma": syn.info.get("gamma"), "init": syn.info.get("init"),
        "overrides": json.dumps(overrides, sort_keys=True), "seed": seed,
        "lambda_mean_end": None if lam is None else round(float(np.mean(lam)), 4),
    }


def _append(out_dir: Path, row: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cpath = out_dir / "results.csv"
    new = not cpath.exists()
    with cpath.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
    jpath = out_dir / "results.json"
    rows = json.loads(jpath.read_text()) if jpath.exists() else []
    rows.append(row)
    jpath.write_text(json.dumps(rows, indent=2))


def _eval_cfg(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(optimizer=args.eval_optimizer, epochs=args.eval_epochs, num_models=args.num_models)


def _val_split(out: Path, meta):
    splits = load_dataset(DATASET)
    idx = torch.load(out / "val_idx.pt", weights_only=True)
    return normalize(splits.train_x[idx], meta), splits.train_y[idx]


def tune(args: argparse.Namespace) -> None:
    out = Path(args.out)
    meta, art, model, safe = _load(out)
    vx, vy = _val_split(out, meta)
    row = run_cell(method=args.method, ipc=args.ipc, pipc=args.pipc, meta=meta, art=art, model=model, safe=safe,
                   eval_x=vx, eval_y=vy, split="val", iterations=args.iterations, eval_cfg=_eval_cfg(args),
                   overrides=_parse_sets(args.set), seed=args.seed, out_dir=out / "tuning", tag=args.tag)
    _append(out / "tuning", row)
    print(json.dumps(row))


def write_md(out: Path, rows: list[dict[str, Any]], theta_acc: float | None, notes: str) -> None:
    col = lambda r: r["method"] + (f" [{r['tag']}]" if r.get("tag") else "")  # noqa: E731
    methods = [m for m in ("dm", "dsv", "dkkt_dm", "random_real") if any(col(r) == m for r in rows)]
    methods += sorted({col(r) for r in rows} - set(methods))
    lines = ["# Fashion-MNIST, offline: synthetic-set test accuracy (%)", "",
             "| ipc | pipc | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    keys = sorted({(r["ipc"], r["pipc"]) for r in rows})
    for ipc, pipc in keys:
        cells = []
        for m in methods:
            r = [x for x in rows if col(x) == m and x["ipc"] == ipc and x["pipc"] == pipc]
            cells.append(f"{100 * r[-1]['acc_mean']:.2f} ± {100 * r[-1]['acc_std']:.2f}" if r else "")
        lines.append(f"| {ipc} | {pipc} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per cell, seconds (distillation + evaluation):", "",
              "| ipc | pipc | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ipc, pipc in keys:
        cells = []
        for m in methods:
            r = [x for x in rows if col(x) == m and x["ipc"] == ipc and x["pipc"] == pipc]
            cells.append(f"{r[-1]['distill_wall_s']:.0f} + {r[-1]['eval_wall_s']:.0f}" if r else "")
        lines.append(f"| {ipc} | {pipc} | " + " | ".join(cells) + " |")
    lines += ["", "Budget per cell (distillation iterations / evaluation epochs):", "",
              "| ipc | pipc | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ipc, pipc in keys:
        cells = []
        for m in methods:
            r = [x for x in rows if col(x) == m and x["ipc"] == ipc and x["pipc"] == pipc]
            cells.append(f"{r[-1]['iterations']} / {r[-1]['eval_epochs']}" if r else "")
        lines.append(f"| {ipc} | {pipc} | " + " | ".join(cells) + " |")
    if theta_acc is not None:
        lines += ["", f"theta* (the trained model) test accuracy: {100 * theta_acc:.2f} %"]
    lines += ["", notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    meta, art, model, safe = _load(out)
    splits = load_dataset(DATASET)
    tx, ty = normalize(splits.test_x, meta), splits.test_y
    if args.test_limit:
        sub = splits.limit(test_limit=args.test_limit, seed=args.seed)
        tx, ty = normalize(sub.test_x, meta), sub.test_y
    overrides = _parse_sets(args.set)
    jpath = out / "results.json"
    done = json.loads(jpath.read_text()) if jpath.exists() else []
    key = lambda r: (r["method"], r["ipc"], r["pipc"], r.get("tag", ""))  # noqa: E731
    have = {key(r) for r in done}
    for ipc in args.ipcs:
        for pipc in args.pipcs:
            for method in args.methods:
                if (method, ipc, pipc, args.tag) in have:
                    continue
                t0 = time.monotonic()
                row = run_cell(method=method, ipc=ipc, pipc=pipc, meta=meta, art=art, model=model, safe=safe,
                               eval_x=tx, eval_y=ty, split="test" if not args.test_limit else f"test{args.test_limit}",
                               iterations=args.iterations, eval_cfg=_eval_cfg(args), overrides=overrides,
                               seed=args.seed, out_dir=out, tag=args.tag)
                _append(out, row)
                done.append(row)
                print(f"{method} ipc={ipc} pipc={pipc}: {100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
    notes = (f"Budgets: see the budget table (this invocation: {args.iterations} iterations); evaluation "
             f"{args.eval_optimizer.upper()}, {args.num_models} models (ConvNet-3, width {art.arch.get('width')}), "
             f"test set {'full 10k' if not args.test_limit else args.test_limit}; DistillConfig defaults "
             f"(appendix-A alpha/gamma/init), a tagged column 'method [T]' used the overrides in its "
             f"results.csv row; seed {args.seed}. Mean ± population std over the models.")
    write_md(out, [r for r in done if r.get("split", "test").startswith("test")],
             art.extra.get("test_acc"), notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("prepare", "table", "tune"))
    p.add_argument("--out", default=str(ROOT / "runs" / "fmnist-table-offline"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    # prepare
    p.add_argument("--width", type=int, default=32, help="ConvNet width (the paper's is 128; 32 fits the CPU)")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--train-lr", type=float, default=0.05)
    p.add_argument("--safe-per-class", type=int, default=50)
    p.add_argument("--val-size", type=int, default=2000)
    # cells
    p.add_argument("--methods", nargs="+", default=["dm", "dsv", "dkkt_dm", "random_real"])
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    p.add_argument("--pipcs", nargs="+", type=int, default=[10, 50])
    p.add_argument("--method", default="dkkt_dm")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--pipc", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--eval-optimizer", choices=("sam", "sgd"), default="sam")
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--num-models", type=int, default=3)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="DistillConfig override key=value (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"prepare": prepare, "table": table, "tune": tune}[args.stage](args)


if __name__ == "__main__":
    main()
