"""One DM iteration on the FULL Fashion-MNIST training pool (pipc 6000): ours vs a baseline
written from the DM reference's description, side by side in one process.

    python bench/dm_full_pool.py                  # ipc 1, 10, 50; real batch 256 per class
    python bench/dm_full_pool.py --ipcs 1 --repeats 5 --threads 0

Unit of work: one iteration = a fresh random ConvNet-3 (width 128), per class a random real
batch of ``--real-batch`` images out of the class's 6,000 and ONE siamese DSA draw shared by
the real and synthetic images of that class, the DM loss, one backward, one SGD step on S.

- ``reference``: the reference loop (main_DM.py as described in shared/DESIGN.md): per class
  one forward of the real batch (with autograd on, its output detached, as the reference
  writes it) and one of the synthetic images, loss summed over classes.
- ``ours``: ``common.distill.dm.dm_loss`` (real images under ``torch.no_grad``, classes
  packed into one forward for the real and one for the synthetic images).

Both draw the same real batches, networks and DSA parameters (same generator seed per
round), so their loss values must agree to float tolerance; the script checks it and prints
the largest relative difference. Prints median seconds per iteration, peak RSS per variant
(bench/_common.py) and the ratio ours / reference.
"""

from __future__ import annotations

import argparse

from _common import add_common_args, emit, env_record, interleave, setup


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3)
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--real-batch", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args(argv)
    device = setup(args)
    import torch

    from common.augment import apply_dsa, sample_dsa_params
    from common.datasets import load_dataset, normalize
    from common.models import build_model
    from common.distill.dm import class_indices, dm_loss, sample_real_batches

    data = load_dataset("fashion-mnist")
    meta = data.meta
    n = 600 if args.quick else len(data.train_y)
    pool = normalize(torch.as_tensor(data.train_x[:n]), meta).to(device)
    idx = class_indices(torch.as_tensor(data.train_y[:n]), meta.num_classes)
    arch = {"width": 16 if args.quick else args.width}
    emit(env_record(device, pool_images=n, real_batch=args.real_batch))
    names = ("ours_packed", "ours_per_class", "reference")
    losses: dict[str, list[float]] = {n: [] for n in names}

    for ipc in [int(v) for v in args.ipcs.split(",")]:
        start = torch.randn(meta.num_classes * ipc, *meta.image_shape, device=device)
        # each variant steps its own copy of S from the same start, so their k-th calls see equal inputs
        syns = {name: start.clone().requires_grad_(True) for name in names}
        opts = {name: torch.optim.SGD([syns[name]], lr=1.0, momentum=0.5) for name in syns}
        rounds = {n: 0 for n in names}

        def draw(name: str) -> tuple:
            # the same draws for both variants in their k-th call
            g = torch.Generator().manual_seed(1000 * ipc + rounds[name])
            rounds[name] += 1
            net = build_model(meta, arch, seed=int(torch.randint(0, 2**31, (1,), generator=g))).to(device)
            for q in net.parameters():
                q.requires_grad_(False)
            real = sample_real_batches(pool, idx, args.real_batch, g)
            params = [sample_dsa_params(g, siamese=True) for _ in range(meta.num_classes)]
            return net, real, params

        def step(loss: torch.Tensor, name: str) -> None:
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            losses[name].append(float(loss.detach()))

        def ours(name: str, max_batch: int | None) -> None:
            net, real, params = draw(name)
            step(dm_loss(net.embed, real, list(syns[name].split(ipc)), params, max_batch=max_batch), name)

        def reference() -> None:
            net, real, params = draw("reference")
            syn = syns["reference"]
            loss = syn.new_zeros(())
            for c in range(meta.num_classes):
                out_real = net.embed(apply_dsa(real[c], params[c])).detach()  # graph built, then dropped
                out_syn = net.embed(apply_dsa(syn[c * ipc:(c + 1) * ipc], params[c]))
                loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
            step(loss, "reference")

        res = interleave({"ours_packed": lambda: ours("ours_packed", None),
                          "ours_per_class": lambda: ours("ours_per_class", 1), "reference": reference},
                         args.repeats, args.warmup, device)
        for name in names:
            emit({"kind": "dm_full_pool_iter", "variant": name, "ipc": ipc, "pipc": n // meta.num_classes,
                  "real_batch": args.real_batch, "width": arch["width"], **res[name]})
        k = min(len(v) for v in losses.values())
        for name in ("ours_packed", "ours_per_class"):
            rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[name][:k], losses["reference"][:k]))
            emit({"kind": "ratio", "what": f"{name} / reference (time per DM iteration)", "ipc": ipc,
                  "value": round(res.ratio(name, "reference"), 3), "max_loss_rel_diff": rel, "calls": k})
        losses = {n: [] for n in names}


if __name__ == "__main__":
    main()
