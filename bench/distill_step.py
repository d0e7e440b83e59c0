"""Median time of ONE distillation iteration for dm, dsv and dkkt_dm (CIFAR-10 or Fashion-MNIST shape).

Each measurement is a ``synthesize(..., iterations=K, log_every=K)`` call (``--iters`` K,
default 10); the time per iteration is the ``elapsed_s`` of its one loss-history row / K (it
excludes the set-up: safe-pool build, model copy), so it is the production loop including
its instrumentation: the loop logs every ``log_every`` = 10 iterations by default, and a
logged iteration of a multi-term method (dkkt_dm) takes each term's gradient separately,
which costs about one more backward. (Until issue 15, K was 1, i.e. every measured
iteration was a logged one, which overstated dkkt_dm / dm.) The methods of one (ipc, pipc)
are interleaved (see bench/_common.py), so the ratios are side-by-side figures. Random
images and an untrained theta* (cost does not depend on values).

``--approx`` adds dkkt_dm variants with the approximations of ``DistillConfig``:
``sample`` = ``aug_passes="sample"``, ``K`` = ``stat_candidates=K``, ``sample:K`` = both.

    python bench/distill_step.py                     # (1,10), (10,50), (50,50)
    python bench/distill_step.py --configs 10:50 --repeats 5 --approx sample,sample:10
    python bench/distill_step.py --shape fmnist      # 1x28x28, the production Fashion-MNIST model
"""

from __future__ import annotations

import argparse

from _common import add_common_args, cifar_like, cifar_meta, emit, interleave, setup

TARGET_RATIO = 1.5  # issue target: dkkt_dm iteration <= 1.5 x dm iteration at (ipc 10, pipc 50)


def parse_approx(spec: str) -> dict[str, dict]:
    """'sample,10,sample:10' -> {'dkkt_dm[sample]': {...}, 'dkkt_dm[m=10]': {...}, ...}."""
    out: dict[str, dict] = {}
    for a in [v.strip() for v in spec.split(",") if v.strip()]:
        kw: dict = {}
        for part in a.split(":"):
            if part == "sample":
                kw["aug_passes"] = "sample"
            elif part.isdigit():
                kw["stat_candidates"] = int(part)
            else:
                raise SystemExit(f"--approx: unknown part {part!r} (use 'sample' or an int)")
        label = ",".join((["sample"] if "aug_passes" in kw else [])
                         + ([f"m={kw['stat_candidates']}"] if "stat_candidates" in kw else []))
        out[f"dkkt_dm[{label}]"] = kw
    return out


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--configs", default="1:10,10:50,50:50", help="comma-separated ipc:pipc pairs")
    p.add_argument("--methods", default="dm,dsv,dkkt_dm")
    p.add_argument("--approx", default="", help="extra dkkt_dm variants, e.g. 'sample,sample:10'")
    p.add_argument("--width", type=int, default=128, help="ConvNet width (128 = paper)")
    p.add_argument("--shape", choices=("cifar", "fmnist"), default="cifar")
    p.add_argument("--iters", type=int, default=10,
                   help="iterations per timed call, the last one logged (production: log_every 10)")
    p.add_argument("--iters-large", type=int, default=2, help="--iters for ipc >= 50")
    p.add_argument("--repeats-large", type=int, default=1,
                   help="repeats (and no warm-up) for ipc >= 50, whose iterations take many seconds "
                        "(default 1, to keep the script within a few minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.width, args.iters, args.iters_large = "1:2,2:4", 16, 2, 2
    device = setup(args)
    import torch

    from common.datasets import get_meta
    from common.models import build_model
    from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize

    meta = cifar_meta() if args.shape == "cifar" else get_meta("fashion-mnist")
    shape = tuple(meta.image_shape)
    arch = {"width": args.width}
    theta = build_model(meta, arch, seed=1).eval()
    theta0 = build_model(meta, arch, seed=2)  # theta_0 of the stationarity target theta* - theta_0
    embed_factory = make_embed_factory(meta, arch)
    approx = parse_approx(args.approx)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] + list(approx)
    for pair in args.configs.split(","):
        ipc, pipc = (int(v) for v in pair.split(":"))
        if args.shape == "cifar":
            safe_x, safe_y = cifar_like(10 * pipc, seed=ipc)
        else:
            safe_x = torch.randn(10 * pipc, *shape, generator=torch.Generator().manual_seed(ipc))
            safe_y = torch.arange(10).repeat_interleave(pipc)
        large = ipc >= 50
        iters = args.iters_large if large else args.iters

        def one(variant: str, ipc: int = ipc, pipc: int = pipc, safe_x=safe_x, safe_y=safe_y,
                iters: int = iters) -> float:
            cfg = DistillConfig(iterations=iters, log_every=iters, **approx.get(variant, {}))
            s = synthesize(variant.split("[")[0], ipc=ipc, num_classes=10, image_shape=shape, pipc=pipc,
                           safe_x=safe_x, safe_y=safe_y, model=theta, embed_factory=embed_factory,
                           config=cfg, seed=0, device=device, progress=False, init_model=theta0)
            return float(s.info["loss_history"][-1]["elapsed_s"]) / iters

        repeats, warmup = (min(args.repeats, args.repeats_large), 0) if large else (args.repeats, args.warmup)
        res = interleave({m: (lambda m=m: one(m)) for m in methods}, repeats, warmup, device)
        for m in methods:
            emit({"kind": "distill_iter", "method": m, "ipc": ipc, "pipc": pipc, "width": args.width,
                  "shape": args.shape, "iters_per_call": iters, "repeats": repeats, "device": str(device),
                  **res[m]})
        if "dm" not in res:
            continue
        for m in [m for m in methods if m.startswith("dkkt_dm")]:
            r = res.ratio(m, "dm")
            rec = {"kind": "ratio", "what": f"{m}_iter / dm_iter", "ipc": ipc, "pipc": pipc, "value": round(r, 3)}
            if (ipc, pipc) == (10, 50) and args.width == 128:
                rec.update(target=f"<= {TARGET_RATIO}", met=r <= TARGET_RATIO)
            emit(rec)


if __name__ == "__main__":
    main()
