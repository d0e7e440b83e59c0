"""The core comparison: does the Deep-KKT term help DM when clients share few images?

    python scenarios/core_result.py --run runs/core-fed --out runs/core-result \\
        [--ipc 1] [--pipc 10] [--seeds 0 1 2] [--iterations 300] [--eval-epochs 300] \\
        [--num-models 5] [--workers 2] [--variants all]

Input: a finished run folder (``--run``) holding theta* (``global_model.pt``, FedAvg as in the
quickstart) and the safe pool (``safe_pool.pt``), plus its ``scenario.resolved.yaml`` (dataset,
test split, theta_0's seed). Every VARIANT below is distilled once per distillation seed and
evaluated with the same ``--num-models`` evaluation networks (ConvNet-3 width 128, seeds derived
from the distillation seed, so two variants of one seed are evaluated by identical networks).
Variants differ from their partner in ONE thing:

    dm[sgd]  vs dkkt_dm[sgd]     the loss (both: SGD lr 1.0 momentum 0.5 on the images)
    dm[adam] vs dkkt_dm[adam]    the loss (both: Adam lr 0.1 on the images)
    dkkt_dm[adam] vs [alpha=0]   the stationarity term
    dkkt_dm[adam] vs [gamma=0]   the DM term (= DSV from the same init)

Every distillation variant starts from the same images (``--init``, default appendix A's rule
for both methods: noise at ipc 1, real safe images otherwise); ``dm[sgd,real]`` is the DM
reference recipe (real init) for orientation. Evaluation: the DM reference protocol (SGD lr
0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half, DSA) on the run's test split.

Writes ``<out>/records.jsonl`` (one line per (variant, seed); a rerun skips what is there),
``<out>/traces/<variant>_seed<s>.csv`` + ``.png`` (loss terms and gradient shares), and
``<out>/comparison.md``: mean ± std over all seeds x models, per-seed paired differences and their
95 % t-interval. Jobs run in ``--workers`` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dm[sgd]": ("dm", {"img_optimizer": "sgd"}),
    "dkkt_dm[sgd]": ("dkkt_dm", {"img_optimizer": "sgd"}),
    "dm[adam]": ("dm", {"img_optimizer": "adam"}),
    "dkkt_dm[adam]": ("dkkt_dm", {"img_optimizer": "adam"}),
    "dkkt_dm[adam,alpha=0]": ("dkkt_dm", {"img_optimizer": "adam", "alpha": 0.0}),
    "dkkt_dm[adam,gamma=0]": ("dkkt_dm", {"img_optimizer": "adam", "gamma": 0.0}),
    "dm[sgd,real]": ("dm", {"img_optimizer": "sgd", "init": "real"}),
    "random_real": ("random_real", {}),
}
# (A, B, what differs): reported as A - B.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("dkkt_dm[sgd]", "dm[sgd]", "the loss, image optimizer SGD for both"),
    ("dkkt_dm[adam]", "dm[adam]", "the loss, image optimizer Adam for both"),
    ("dkkt_dm[adam]", "dkkt_dm[adam,alpha=0]", "the stationarity term (alpha > 0 vs 0)"),
    ("dkkt_dm[adam]", "dkkt_dm[adam,gamma=0]", "the DM term (gamma > 0 vs 0)"),
    ("dkkt_dm[adam]", "random_real", "distillation vs ipc random safe images"),
)


def _load_inputs(run: Path) -> dict[str, Any]:
    import torch

    from common.datasets import normalize
    from common.models import build_model
    from common.scenario import load_scenario
    from common.datasets import federation_train_set
    from server.store.artifacts import build_model_from_artifact, load_model_artifact, load_safe_artifact

    scenario = load_scenario(run / "scenario.resolved.yaml")
    data = federation_train_set(scenario)
    meta = data.meta
    art = load_model_artifact(run / "global_model.pt", dataset=meta.name)
    safe = load_safe_artifact(run / "safe_pool.pt", meta=meta)
    return {
        "scenario": scenario, "meta": meta, "arch": art.arch,
        "model": build_model_from_artifact(art, meta).eval(),
        "init_model": build_model(meta, art.arch, seed=scenario.seed),  # theta_0 of FedAvg (server/run.py)
        "safe_x": normalize(safe.x, meta), "safe_y": safe.y,
        "test_x": normalize(data.test_x, meta), "test_y": data.test_y.to(torch.int64),
    }


_INPUTS: dict[str, Any] = {}


def _job(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from common.models import build_model
    from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize
    from common.evaluate import EvalConfig, evaluate_synthetic
    from server.sweep.loss_trace import plot_trace, summarize_trace, write_trace_csv

    run = Path(args["run"])
    if str(run) not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[str(run)] = _load_inputs(run)
    inp = _INPUTS[str(run)]
    method, overrides = VARIANTS[args["variant"]]
    cfg = DistillConfig(**{**args["distill"], **overrides})
    eval_arch = {"width": 128, "depth": 3}  # fixed evaluation network for every variant
    t0 = time.perf_counter()
    syn = synthesize(method, ipc=args["ipc"], num_classes=inp["meta"].num_classes, image_shape=inp["meta"].image_shape,
                     pipc=args["pipc"], safe_x=inp["safe_x"], safe_y=inp["safe_y"], model=inp["model"],
                     embed_factory=make_embed_factory(inp["meta"], inp["arch"]), config=cfg, seed=args["seed"],
                     device="cpu", progress=False, init_model=inp["init_model"])
    t1 = time.perf_counter()
    ecfg = EvalConfig(**args["evaluation"])
    res = evaluate_synthetic(syn.x, syn.y, inp["test_x"], inp["test_y"],
                             lambda s: build_model(inp["meta"], eval_arch, seed=s), ecfg, seed=args["seed"],
                             device="cpu", progress=False)
    t2 = time.perf_counter()
    out = Path(args["out"])
    history = syn.info.get("loss_history", [])
    stem = f"{args['variant']}_ipc{args['ipc']}_pipc{args['pipc']}_seed{args['seed']}"
    if history:
        write_trace_csv(history, out / "traces" / f"{stem}.csv")
        plot_trace(history, out / "traces" / f"{stem}.png", f"{args['variant']}  ipc {args['ipc']}  "
                   f"pipc {args['pipc']}  seed {args['seed']}")
    torch.save({"x": syn.x, "y": syn.y}, out / "sets" / f"{stem}.pt")
    return {"key": args["key"], "variant": args["variant"], "method": method, "ipc": args["ipc"],
            "pipc": args["pipc"], "seed": args["seed"], "accuracies": res.accuracies, "mean": res.mean,
            "distill_s": t1 - t0, "eval_s": t2 - t1, "trace": summarize_trace(history),
            "init": syn.info.get("init"), "img_optimizer": syn.info.get("img_optimizer"),
            "alpha": syn.info.get("alpha"), "gamma": syn.info.get("gamma")}


def _report(records: list[dict[str, Any]], out: Path, header: str) -> str:
    from server.reports.stats import paired_difference, pooled

    cells = sorted({(r["ipc"], r["pipc"]) for r in records})
    lines = [header, ""]
    for ipc, pipc in cells:
        rec = [r for r in records if (r["ipc"], r["pipc"]) == (ipc, pipc)]
        by: dict[str, dict[int, list[float]]] = {}
        for r in rec:
            by.setdefault(r["variant"], {})[r["seed"]] = r["accuracies"]
        lines += [f"## ipc {ipc}, pipc {pipc}", "",
                  "| variant | accuracy % (mean ± std, all seeds × models) | n | per seed | final L_stat/D(target,0) | "
                  "stat grad share | distill s |", "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            if v not in by:
                continue
            mean, std, n = pooled(by[v])
            seeds = ", ".join(f"{s}: {100 * sum(a) / len(a):.2f}" for s, a in sorted(by[v].items()))
            tr = [r["trace"] for r in rec if r["variant"] == v]
            ratio = [t["final_stat_ratio"] for t in tr if "final_stat_ratio" in t]
            share = [t["gradshare_stat"] for t in tr if "gradshare_stat" in t]
            dist = [r["distill_s"] for r in rec if r["variant"] == v]
            lines.append(f"| {v} | {100 * mean:.2f} ± {100 * std:.2f} | {n} | {seeds} | "
                         f"{(sum(ratio) / len(ratio)) if ratio else float('nan'):.3f} | "
                         f"{(100 * sum(share) / len(share)) if share else float('nan'):.1f} % | "
                         f"{sum(dist) / len(dist):.0f} |")
        lines += ["", "| A − B | differs in | per-seed difference (pt) | mean (pt) | 95 % CI (pt) | verdict |",
                  "|---|---|---|---|---|---|"]
        for a, b, what in PAIRS:
            if a in by and b in by:
                d = paired_difference(by[a], by[b])
                per = ", ".join(f"{s}: {100 * v:+.2f}" for s, v in sorted(d.per_seed.items()))
                verdict = d.verdict().replace("A better", f"{a} better").replace("B better", f"{b} better")
                lines.append(f"| {a} − {b} | {what} | {per} | {100 * d.mean:+.2f} | "
                             f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {verdict} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "comparison.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder with global_model.pt and safe_pool.pt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--pipc", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--num-models", type=int, default=5)
    p.add_argument("--init", choices=("auto", "noise", "real"), default="auto",
                   help="start images of every variant (auto: appendix A, noise at ipc 1, real otherwise)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variants", default="all", help="comma-separated subset of: " + "  ".join(VARIANTS))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    from common.distill.synthesize import default_init

    # commas inside [...] belong to a variant's name
    variants = list(VARIANTS) if a.variants == "all" else [v.strip() for v in re.split(r",(?![^\[]*\])", a.variants)]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sets").mkdir(exist_ok=True)
    init = default_init(a.ipc) if a.init == "auto" else a.init
    distill = {"iterations": a.iterations, "init": init, "log_every": 10}
    evaluation = {"optimizer": "sgd", "epochs": a.eval_epochs, "num_models": a.num_models}
    rec_path = a.out / "records.jsonl"
    records = [json.loads(line) for line in rec_path.read_text().splitlines() if line.strip()] \
        if rec_path.is_file() else []
    done = {r["key"] for r in records}
    jobs = []
    for seed in a.seeds:
        for v in variants:
            d = dict(distill)
            if VARIANTS[v][1].get("init"):
                d.pop("init")
            key = json.dumps([v, a.ipc, a.pipc, seed, d, evaluation], sort_keys=True)
            if key not in done:
                jobs.append({"key": key, "variant": v, "ipc": a.ipc, "pipc": a.pipc, "seed": seed, "distill": d,
                             "evaluation": evaluation, "run": str(a.run), "out": str(a.out)})
    header = (f"# Core comparison ({a.run}), every (ipc, pipc) in {rec_path.name}; the last invocation: "
              f"{a.iterations} distillation iterations, init {init}; evaluation ConvNet-3 width 128, SGD "
              f"{a.eval_epochs} epochs, {a.num_models} models per distillation seed")
    if not a.report_only and jobs:
        print(f"{len(jobs)} jobs ({len(done)} already in {rec_path}) on {a.workers} workers", flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=a.workers) as ex:
            futures = [ex.submit(_job, j) for j in jobs]
            for i, fut in enumerate(as_completed(futures), 1):
                r = fut.result()
                with rec_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                records.append(r)
                print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {r['variant']} seed {r['seed']}: "
                      f"{100 * r['mean']:.2f} % (distill {r['distill_s']:.0f}s, eval {r['eval_s']:.0f}s) "
                      f"{r['trace']}", flush=True)
                _report(records, a.out, header)
    print(_report(records, a.out, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
