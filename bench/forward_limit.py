"""The machine's limit for DM: forward throughput of the ConvNet-3 embedding (width 128,
Fashion-MNIST shape 1x28x28, the production model) without autograd, per batch size and
thread count, side by side in one process.

    python bench/forward_limit.py                                # batches 64..2560, threads 1, 2
    python bench/forward_limit.py --batches 256,1024 --thread-counts 1

Unit of work: ``--images`` images (default 2,560 = one DM iteration's real images at real
batch 256) pushed through ``net.embed`` in batches of B under ``torch.no_grad()``; reported as
images/s and GFLOP/s (FLOPs of one image's forward from ``torch.utils.flop_counter``:
convolutions and the linear layer, multiply-add = 2; norm, activation and pooling add
element-wise work that is not counted). The best (batch, threads) cell is the limit that
``dm_full_pool.py``'s iterations are compared with (bench/README.md):

    % of limit = forward-equivalents per DM iteration / limit (images/s) / seconds per iteration

with forward-equivalents = real images (forward only) + 3 x synthetic images (forward and a
backward of about twice its cost).
"""

from __future__ import annotations

import argparse

from _common import add_common_args, emit, interleave, setup


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=5)
    p.add_argument("--batches", default="64,128,256,512,1024,2560")
    p.add_argument("--thread-counts", default="1,2")
    p.add_argument("--images", type=int, default=2560, help="images per timed call")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--channels-last", action="store_true", help="also time channels_last (same cells)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.images, args.width = "64,128", 256, 16
    device = setup(args)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from common.datasets import get_meta
    from common.models import build_model

    meta = get_meta("fashion-mnist")
    net = build_model(meta, {"width": args.width}, seed=0).to(device).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        net.embed(torch.zeros(1, *meta.image_shape, device=device))
    flops_per_image = fc.get_total_flops()
    emit({"kind": "flops", "what": "ConvNet-3 embed forward, one image", "width": args.width,
          "shape": list(meta.image_shape), "flops": flops_per_image})
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.thread_counts.split(",")] if device.type == "cpu" else [0]
    formats = [False, True] if args.channels_last else [False]
    x_all = torch.randn(max(batches), *meta.image_shape, generator=torch.Generator().manual_seed(0)).to(device)
    nets = {False: net, True: build_model(meta, {"width": args.width}, seed=0).to(device).eval()
            .to(memory_format=torch.channels_last)}

    def run(b: int, t: int, cl: bool) -> None:
        if t:
            torch.set_num_threads(t)
        x = x_all[:b].contiguous(memory_format=torch.channels_last) if cl else x_all[:b]
        with torch.no_grad():
            for _ in range(max(1, args.images // b)):
                nets[cl].embed(x)

    cells = {f"b{b}_t{t}" + ("_cl" if cl else ""): (b, t, cl) for b in batches for t in threads for cl in formats}
    res = interleave({k: (lambda c=c: run(*c)) for k, c in cells.items()}, args.repeats, args.warmup, device)
    best = None
    for k, (b, t, cl) in cells.items():
        n = max(1, args.images // b) * b
        ips = n / res.median(k)
        rec = {"kind": "forward_limit", "batch": b, "threads": t, "channels_last": cl, "images": n,
               "images_per_s": round(ips, 1), "gflop_per_s": round(ips * flops_per_image / 1e9, 2), **res[k]}
        emit(rec)
        if best is None or ips > best["images_per_s"]:
            best = rec
    assert best is not None
    emit({"kind": "limit", "batch": best["batch"], "threads": best["threads"], "channels_last": best["channels_last"],
          "images_per_s": best["images_per_s"], "gflop_per_s": best["gflop_per_s"]})


if __name__ == "__main__":
    main()
