"""torch.set_num_threads 1 vs 2 (or --thread-counts) for a distillation iteration (dm and
dkkt_dm at ipc 10, pipc 50) and an evaluation epoch (one model, ipc 10), interleaved in
one process: the thread count is switched before every call.

    python bench/threads.py
    python bench/threads.py --thread-counts 1,2,4
"""

from __future__ import annotations

import argparse
import time

from _common import add_common_args, cifar_like, cifar_meta, emit, interleave, setup


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3, warmup=1)
    p.add_argument("--thread-counts", default="1,2")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--pipc", type=int, default=50)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args(argv)
    if args.quick:
        args.ipc, args.pipc, args.width = 1, 4, 16
    device = setup(args)

    import torch

    from common.models import build_model
    from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize
    from common.evaluate import EvalConfig, train_model

    meta = cifar_meta()
    arch = {"width": args.width}
    theta = build_model(meta, arch, seed=1).eval()
    theta0 = build_model(meta, arch, seed=2)  # theta_0 of the stationarity target theta* - theta_0
    embed_factory = make_embed_factory(meta, arch)
    safe_x, safe_y = cifar_like(10 * args.pipc, seed=1)
    syn_x, syn_y = cifar_like(10 * args.ipc, seed=2)
    counts = [int(v) for v in args.thread_counts.split(",")]

    def distill(method: str) -> float:
        s = synthesize(method, ipc=args.ipc, num_classes=10, image_shape=(3, 32, 32), pipc=args.pipc,
                       safe_x=safe_x, safe_y=safe_y, model=theta, embed_factory=embed_factory,
                       config=DistillConfig(iterations=1, log_every=1), seed=0, device=device, progress=False,
                       init_model=theta0)
        return float(s.info["loss_history"][0]["elapsed_s"])

    def eval_epoch() -> float:
        m = build_model(meta, arch, seed=3)
        t0 = time.perf_counter()
        train_model(m, syn_x, syn_y, EvalConfig(epochs=1), seed=3, device=device)
        return time.perf_counter() - t0

    work = {"dm_iter": lambda: distill("dm"), "dkkt_dm_iter": lambda: distill("dkkt_dm"), "eval_epoch_1model": eval_epoch}
    for what, fn in work.items():
        def with_threads(n: int, fn=fn) -> float:
            torch.set_num_threads(n)
            return fn()

        res = interleave({f"threads_{n}": (lambda n=n: with_threads(n)) for n in counts}, args.repeats,
                         args.warmup, device)
        for n in counts:
            emit({"kind": "threads", "work": what, "threads": n, "ipc": args.ipc, "pipc": args.pipc,
                  "device": str(device), **res[f"threads_{n}"]})
        if len(counts) >= 2:
            emit({"kind": "ratio", "what": f"{what} threads_{counts[0]} / threads_{counts[1]}",
                  "value": round(res.ratio(f"threads_{counts[0]}", f"threads_{counts[1]}"), 3)})
    torch.set_num_threads(args.threads if args.threads > 0 else counts[0])


if __name__ == "__main__":
    main()
