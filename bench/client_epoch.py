"""Median time of ONE local-training epoch of a client on 5,000 CIFAR-10-shaped images
(``edge_client.train.train_local``, quickstart settings: batch 64, SGD lr 0.01, momentum
0.9, weight decay 5e-4, no augmentation unless --augment).

Clients run in their own processes and do not switch common/perf.py's allocator setting,
so the default here is ``--malloc off`` (what a client does today). ``--compare-malloc``
interleaves off / on in this process: the speed-up a client would get from calling
``common.perf.tune_cpu_allocator()``.

    python bench/client_epoch.py
    python bench/client_epoch.py --compare-malloc
"""

from __future__ import annotations

import argparse

from _common import add_common_args, cifar_meta, emit, interleave, set_malloc, setup


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3, warmup=0,
                        malloc="off")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", action="store_true", help="DSA during local training (federation.augment)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--compare-malloc", action="store_true", help="interleave --malloc off and on")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.width = 200, 16
    device = setup(args)

    import torch

    from common.models import build_model
    from edge_client.train import train_local

    meta = cifar_meta()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(args.images) % 10
    model = build_model(meta, {"width": args.width}, seed=0)

    def epoch(malloc_on: bool | None) -> float:
        if malloc_on is not None:
            set_malloc(malloc_on)
        stats = train_local(model, x, y, meta, epochs=1, batch_size=args.batch_size, lr=0.01, momentum=0.9,
                            weight_decay=5e-4, augment=args.augment, device=device, seed=0, progress=False)
        return stats.seconds

    # untimed warm-up (first-call costs) on one batch
    train_local(build_model(meta, {"width": args.width}, seed=1), x[:args.batch_size], y[:args.batch_size], meta,
                epochs=1, batch_size=args.batch_size, lr=0.01, momentum=0.9, weight_decay=5e-4,
                augment=args.augment, device=device, seed=0, progress=False)
    if args.compare_malloc:
        variants = {"malloc_off": lambda: epoch(False), "malloc_on": lambda: epoch(True)}
    else:
        variants = {f"malloc_{args.malloc}": lambda: epoch(None)}
    res = interleave(variants, args.repeats, args.warmup, device)
    for n in variants:
        emit({"kind": "client_epoch", "variant": n, "images": args.images, "batch_size": args.batch_size,
              "augment": args.augment, "width": args.width, "device": str(device), **res[n]})
    if args.compare_malloc:
        emit({"kind": "ratio", "what": "client_epoch malloc_off / malloc_on (speed-up of the setting)",
              "value": round(res.ratio("malloc_off", "malloc_on"), 3)})


if __name__ == "__main__":
    main()
