"""Median time of ONE distillation iteration for dm, dsv and dkkt_dm, CIFAR-10 shape.

Each measurement is a ``synthesize(..., iterations=1)`` call; the time of the iteration is
the ``elapsed_s`` of its loss-history row (it excludes the set-up: safe-pool build, model
copy), so it is exactly the production loop. The methods of one (ipc, pipc) are
interleaved (see bench/_common.py), so the dkkt_dm / dm ratio is a side-by-side figure.
Random images and an untrained theta* (cost does not depend on the values).

    python bench/distill_step.py                     # (1,10), (10,50), (50,50)
    python bench/distill_step.py --configs 10:50 --repeats 5
"""

from __future__ import annotations

import argparse

from _common import add_common_args, cifar_like, cifar_meta, emit, interleave, setup

TARGET_RATIO = 1.5  # issue target: dkkt_dm iteration <= 1.5 x dm iteration at (ipc 10, pipc 50)


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--configs", default="1:10,10:50,50:50", help="comma-separated ipc:pipc pairs")
    p.add_argument("--methods", default="dm,dsv,dkkt_dm")
    p.add_argument("--width", type=int, default=128, help="ConvNet width (128 = paper)")
    p.add_argument("--repeats-large", type=int, default=1,
                   help="repeats (and no warm-up) for ipc >= 50, whose iterations take many seconds "
                        "(default 1, to keep the script within a few minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.width = "1:2,2:4", 16
    device = setup(args)

    from common.models import build_model
    from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize

    meta = cifar_meta()
    arch = {"width": args.width}
    theta = build_model(meta, arch, seed=1).eval()
    theta0 = build_model(meta, arch, seed=2)  # theta_0 of the stationarity target theta* - theta_0
    embed_factory = make_embed_factory(meta, arch)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for pair in args.configs.split(","):
        ipc, pipc = (int(v) for v in pair.split(":"))
        safe_x, safe_y = cifar_like(10 * pipc, seed=ipc)
        cfg = DistillConfig(iterations=1, log_every=1)

        def one(method: str, ipc: int = ipc, pipc: int = pipc, safe_x=safe_x, safe_y=safe_y, cfg=cfg) -> float:
            s = synthesize(method, ipc=ipc, num_classes=10, image_shape=(3, 32, 32), pipc=pipc,
                           safe_x=safe_x, safe_y=safe_y, model=theta, embed_factory=embed_factory,
                           config=cfg, seed=0, device=device, progress=False, init_model=theta0)
            return float(s.info["loss_history"][0]["elapsed_s"])

        large = ipc >= 50
        repeats, warmup = (min(args.repeats, args.repeats_large), 0) if large else (args.repeats, args.warmup)
        res = interleave({m: (lambda m=m: one(m)) for m in methods}, repeats, warmup, device)
        for m in methods:
            emit({"kind": "distill_iter", "method": m, "ipc": ipc, "pipc": pipc, "width": args.width,
                  "repeats": repeats, "device": str(device), **res[m]})
        if "dm" in res and "dkkt_dm" in res:
            r = res.ratio("dkkt_dm", "dm")
            rec = {"kind": "ratio", "what": "dkkt_dm_iter / dm_iter", "ipc": ipc, "pipc": pipc,
                   "value": round(r, 3)}
            if (ipc, pipc) == (10, 50) and args.width == 128:
                rec.update(target=f"<= {TARGET_RATIO}", met=r <= TARGET_RATIO)
            emit(rec)


if __name__ == "__main__":
    main()
