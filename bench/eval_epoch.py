"""Median time of ONE evaluation epoch of K fresh ConvNets on S (ipc 1, 10, 50; CIFAR-10
shape), sequential (``train_model`` per model) vs parallel (``train_models_parallel``,
one vmap-ed step for all K), interleaved in one process.

The protocol is EvalConfig's default (SAM, batch 256, DSA). Each measurement trains K
freshly built models for one epoch (building them is not timed). The seq / par ratio is
the issue's target (>= 2.5 for K = 5 at ipc 10).

    python bench/eval_epoch.py
    python bench/eval_epoch.py --ipcs 10 --models 5 --repeats 5
"""

from __future__ import annotations

import argparse
import time

from _common import add_common_args, cifar_like, cifar_meta, emit, interleave, setup

TARGET_SPEEDUP = 2.5  # issue target: parallel >= 2.5x sequential for K = 5 at ipc 10


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3, warmup=0)
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--models", type=int, default=5, help="K, networks per evaluation")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--variants", default="seq,par", help="seq and/or par")
    p.add_argument("--repeats-large", type=int, default=1,
                   help="repeats for ipc >= 50, whose epochs take tens of seconds (default 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.ipcs, args.width, args.models = "1,2", 16, 2
    device = setup(args)

    from common.models import build_model
    from common.evaluate import EvalConfig, derive_seeds, train_model
    from common.evaluate_parallel import train_models_parallel

    meta = cifar_meta()
    arch = {"width": args.width}
    cfg = EvalConfig(epochs=1, num_models=args.models)
    seeds = derive_seeds(0, args.models)

    def seq(x, y) -> float:
        models = [build_model(meta, arch, seed=s) for s in seeds]
        t0 = time.perf_counter()
        for m, s in zip(models, seeds):
            train_model(m, x, y, cfg, s, device)
        return time.perf_counter() - t0

    def par(x, y) -> float:
        models = [build_model(meta, arch, seed=s) for s in seeds]
        t0 = time.perf_counter()
        train_models_parallel(models, x, y, cfg, seeds, device)
        return time.perf_counter() - t0

    fns = {"seq": seq, "par": par}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    # untimed warm-up of both paths on a tiny set (first-call costs: kernels, allocator)
    wx, wy = cifar_like(10)
    for n in names:
        fns[n](wx, wy)
    for ipc in (int(v) for v in args.ipcs.split(",")):
        x, y = cifar_like(10 * ipc, seed=ipc)
        repeats = min(args.repeats, args.repeats_large) if ipc >= 50 else args.repeats
        res = interleave({n: (lambda n=n: fns[n](x, y)) for n in names}, repeats, args.warmup, device)
        for n in names:
            emit({"kind": "eval_epoch", "variant": n, "ipc": ipc, "models": args.models, "width": args.width,
                  "repeats": repeats,
                  "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "device": str(device), **res[n]})
        if "seq" in res and "par" in res:
            r = res.ratio("seq", "par")
            rec = {"kind": "ratio", "what": "eval_epoch seq / par (speed-up of parallel)", "ipc": ipc,
                   "models": args.models, "value": round(r, 3)}
            if ipc == 10 and args.models == 5 and args.width == 128:
                rec.update(target=f">= {TARGET_SPEEDUP}", met=r >= TARGET_SPEEDUP)
            emit(rec)


if __name__ == "__main__":
    main()
