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

The pool stays uint8 and each drawn batch is normalized (``sample_real_batches(...,
transform=normalize)``, as ``synthesize`` does with ``safe_normalize``); ``--pool-dtype
float32`` holds it normalized instead (the earlier way). Peak memory: within one process a
variant's peak also counts what earlier variants freed (the allocator setting keeps it
resident), so ``--isolate`` runs every (ipc, variant) in a fresh process of its own and
reports that process's whole peak RSS (``process_peak_mib``: data set, pool, torch, the
variant's own activations); the loss agreement is then checked across the processes.
"""

from __future__ import annotations

import argparse
import json

from _common import add_common_args, emit, env_record, interleave, setup


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3)
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--real-batch", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--variants", default="ours_packed,ours_per_class,reference")
    p.add_argument("--pool-dtype", choices=("uint8", "float32"), default="uint8")
    p.add_argument("--isolate", action="store_true",
                   help="each (ipc, variant) in its own process: true per-variant peak RSS")
    args = p.parse_args(argv)
    if args.isolate:
        return isolate(args, argv)
    device = setup(args)
    import resource

    import torch

    from common.augment import apply_dsa, sample_dsa_params
    from common.datasets import load_dataset, normalize
    from common.models import build_model
    from common.distill.dm import class_indices, dm_loss, sample_real_batches

    data = load_dataset("fashion-mnist")
    meta, labels = data.meta, data.train_y
    n = 600 if args.quick else len(data.train_y)
    pool = torch.as_tensor(data.train_x[:n]).to(device)
    norm = lambda x: normalize(x, meta)  # noqa: E731
    if args.pool_dtype == "float32":
        pool, norm = norm(pool), None
    del data  # keep only the pool (as synthesize does)
    idx = class_indices(torch.as_tensor(labels[:n]), meta.num_classes)
    arch = {"width": 16 if args.quick else args.width}
    emit(env_record(device, pool_images=n, real_batch=args.real_batch, pool_dtype=args.pool_dtype,
                    pool_mib=round(pool.numel() * pool.element_size() / 2**20, 1)))
    names = tuple(v for v in args.variants.split(",") if v)
    losses: dict[str, list[float]] = {n: [] for n in names}

    for ipc in [int(v) for v in args.ipcs.split(",")]:
        start = torch.randn(meta.num_classes * ipc, *meta.image_shape,
                            generator=torch.Generator().manual_seed(ipc)).to(device)
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
            real = sample_real_batches(pool, idx, args.real_batch, g, transform=norm)
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

        fns = {"ours_packed": lambda: ours("ours_packed", None),
               "ours_per_class": lambda: ours("ours_per_class", 1), "reference": reference}
        res = interleave({k: fns[k] for k in names}, args.repeats, args.warmup, device)
        for name in names:
            emit({"kind": "dm_full_pool_iter", "variant": name, "ipc": ipc, "pipc": n // meta.num_classes,
                  "real_batch": args.real_batch, "width": arch["width"], "pool_dtype": args.pool_dtype,
                  **res[name]})
            emit({"kind": "losses", "variant": name, "ipc": ipc, "values": losses[name]})
        if "reference" in names:
            k = min(len(v) for v in losses.values())
            for name in [v for v in names if v != "reference"]:
                emit({"kind": "ratio", "what": f"{name} / reference (time per DM iteration)", "ipc": ipc,
                      "value": round(res.ratio(name, "reference"), 3),
                      "max_loss_rel_diff": _rel(losses[name][:k], losses["reference"][:k]), "calls": k})
        losses = {n: [] for n in names}
    emit({"kind": "process_peak", "variants": list(names), "ipcs": args.ipcs, "pool_dtype": args.pool_dtype,
          "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def _rel(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=float("nan"))


def isolate(args: argparse.Namespace, argv: list[str] | None) -> None:
    """One fresh process per (ipc, variant); forwards their records, adds process peaks and the
    loss agreement across processes (same seeds, so the same draws)."""
    import subprocess
    import sys

    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--isolate"]
    drop = {"--ipcs", "--variants"}
    base = [a for i, a in enumerate(base) if a not in drop and (i == 0 or base[i - 1] not in drop)]
    for ipc in args.ipcs.split(","):
        losses: dict[str, list[float]] = {}
        for v in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, *base, "--ipcs", ipc, "--variants", v],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                rec = json.loads(line)
                if rec["kind"] == "losses":
                    losses[v] = rec["values"]
                    continue
                if rec["kind"] == "process_peak":
                    rec["ipc"] = int(ipc)
                emit(rec)
        if "reference" in losses:
            for v in [v for v in losses if v != "reference"]:
                emit({"kind": "loss_agreement", "what": f"{v} vs reference (separate processes)", "ipc": int(ipc),
                      "max_loss_rel_diff": _rel(losses[v], losses["reference"])})


if __name__ == "__main__":
    main()
