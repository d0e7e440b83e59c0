"""A/B of every candidate speed-up, each pair interleaved in one process (CIFAR-10 shape).

Groups (``--only`` picks some; default all but ``compile``):
- ``malloc``: common/perf.py's allocator setting off vs on, for a dkkt_dm iteration
  (ipc 10, pipc 50) and an evaluation epoch of one model (ipc 10). "off" is glibc with
  its adaptive thresholds at their steady-state ceilings (``reset_cpu_allocator``).
- ``dm_pack``: DM term with all classes in one forward (``dm_max_batch=0``) vs one
  forward per class (``dm_max_batch=1``, the reference loop), or any ``--dm-pack-sizes``,
  dm iteration at (10, 50) and (50, 50).
- ``dkkt``: DKKT loss (clean + augmented pass, N = 100) and its backward three ways:
  ``backward()`` (before), ``backward(inputs=[x, lambda])`` (kept in synthesize), and
  both passes fused into ONE vmap-ed pass over two copies of theta* (a prototype here,
  not in the product).
- ``channels_last``: a SAM step of one ConvNet on 100 images, contiguous vs channels_last.
- ``compile`` (only with ``--only compile``; slow): torch.compile of the ConvNet, compile
  time and the steady step time vs eager.

    python bench/fast_paths.py
    python bench/fast_paths.py --only dkkt --repeats 5
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from _common import add_common_args, cifar_like, cifar_meta, emit, interleave, set_malloc, setup

GROUPS = ("malloc", "dm_pack", "dkkt", "channels_last", "compile")


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3, warmup=1)
    p.add_argument("--only", default=",".join(g for g in GROUPS if g != "compile"))
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--dm-pack-sizes", default="1,0",
                   help="dm_max_batch values for the dm_pack group (0 = one forward, 1 = per class)")
    args = p.parse_args(argv)
    small = args.quick
    if small:
        args.width = 16
    device = setup(args)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; valid: {list(GROUPS)}")

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, vmap

    from common.augment import DSAParams, apply_dsa
    from common.models import build_model
    from common.distill.dkkt import _distance, dkkt_loss
    from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize
    from common.evaluate import EvalConfig, SAM, train_model

    meta = cifar_meta()
    arch = {"width": args.width}
    theta = build_model(meta, arch, seed=1).eval()
    theta0 = build_model(meta, arch, seed=2)  # theta_0 of the stationarity target theta* - theta_0
    for prm in theta.parameters():
        prm.requires_grad_(False)
    embed_factory = make_embed_factory(meta, arch)
    ipc, pipc = (1, 4) if small else (10, 50)

    def ab(group: str, what: str, variants: dict[str, Callable[[], float | None]], base: str, new: str,
           **extra: object) -> None:
        res = interleave(variants, args.repeats, args.warmup, device)
        for n in variants:
            emit({"kind": "fast_path", "group": group, "work": what, "variant": n, "device": str(device),
                  **extra, **res[n]})
        emit({"kind": "ratio", "group": group, "what": f"{what}: {base} / {new} (speed-up of {new})",
              "value": round(res.ratio(base, new), 3), **extra})

    def distill(method: str, ipc: int, pipc: int, **cfg: object) -> float:
        sx, sy = cifar_like(10 * pipc, seed=pipc)
        s = synthesize(method, ipc=ipc, num_classes=10, image_shape=(3, 32, 32), pipc=pipc, safe_x=sx,
                       safe_y=sy, model=theta, embed_factory=embed_factory,
                       config=DistillConfig(iterations=1, log_every=1, **cfg),  # type: ignore[arg-type]
                       seed=0, device=device, progress=False, init_model=theta0)
        return float(s.info["loss_history"][0]["elapsed_s"])

    syn_x, syn_y = cifar_like(10 * ipc, seed=2)

    def eval_epoch() -> float:
        m = build_model(meta, arch, seed=3)
        t0 = time.perf_counter()
        train_model(m, syn_x, syn_y, EvalConfig(epochs=1), seed=3, device=device)
        return time.perf_counter() - t0

    if "malloc" in groups:
        for what, fn in (("dkkt_dm_iter", lambda: distill("dkkt_dm", ipc, pipc)),
                         ("eval_epoch_1model", eval_epoch)):
            def with_malloc(on: bool, fn=fn) -> float | None:
                set_malloc(on)
                return fn()

            ab("malloc", what, {"off": lambda: with_malloc(False), "on": lambda: with_malloc(True)},
               "off", "on", ipc=ipc, pipc=pipc)
        if args.malloc != "leave":
            set_malloc(args.malloc == "on")

    if "dm_pack" in groups:
        sizes = [int(v) for v in args.dm_pack_sizes.split(",")]
        for i, pc in ((ipc, pipc), (2, 4) if small else (50, 50)):
            variants = {f"max_batch_{mb}": (lambda mb=mb, i=i, pc=pc: distill("dm", i, pc, dm_max_batch=mb))
                        for mb in sizes}
            res = interleave(variants, args.repeats, args.warmup, device)
            for n, r in res.items():
                emit({"kind": "fast_path", "group": "dm_pack", "work": "dm_iter", "variant": n, "ipc": i, "pipc": pc,
                      "device": str(device), **r})
            for mb in sizes:
                if mb != 0 and 0 in sizes:
                    emit({"kind": "ratio", "group": "dm_pack", "ipc": i, "pipc": pc,
                          "what": f"dm_iter: max_batch_{mb} / max_batch_0 (speed-up of one forward)",
                          "value": round(res.ratio(f"max_batch_{mb}", "max_batch_0"), 3)})

    n_syn = 10 * ipc
    gx = torch.Generator().manual_seed(5)
    x0 = torch.randn(n_syn, 3, 32, 32, generator=gx).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    theta_d = theta.to(device)
    aug = DSAParams("rotate", 11)
    alpha, eta = 0.01, 5.0

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        return x0.clone().requires_grad_(True), torch.ones(n_syn, device=device, requires_grad=True)

    def dkkt_two_pass(restrict: bool) -> None:
        x, lam = leaves()
        loss, _ = dkkt_loss(theta_d, x, y, lam, alpha=alpha, dsa_params=aug, aug_weight=eta)
        loss.backward(inputs=[x, lam]) if restrict else loss.backward()


    def dkkt_fused() -> None:
        # Both passes in one vmap over two (expanded, memory-shared) copies of theta*:
        # grad w.r.t. each copy = that pass's sum_i lam_i grad L_i.
        x, lam = leaves()
        live = {k: p.detach().requires_grad_(True) for k, p in theta_d.named_parameters()}
        two = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in live.items()}
        xx = torch.stack([x, apply_dsa(x, aug)])
        logits = vmap(lambda pk, xk: functional_call(theta_d, pk, (xk,)))(two, xx)
        ce = F.cross_entropy(logits.reshape(2 * n_syn, -1), y.repeat(2), reduction="none").view(2, n_syn)
        grads = torch.autograd.grad((lam * ce).sum(), list(two.values()), create_graph=True)
        th = {k: v.detach() for k, v in live.items()}
        stat = [_distance(th, {k: -g[i] for k, g in zip(live, grads)}, "l1") for i in range(2)]
        prim = ce.mean(1)
        loss = ((prim[0] + alpha * stat[0]) + eta * (prim[1] + alpha * stat[1])) / (1 + eta)
        loss.backward(inputs=[x, lam])

    if "dkkt" in groups:
        res = interleave({"backward_all": lambda: dkkt_two_pass(False),
                          "backward_inputs": lambda: dkkt_two_pass(True),
                          "vmap_fused": dkkt_fused}, args.repeats, args.warmup, device)
        for n, r in res.items():
            emit({"kind": "fast_path", "group": "dkkt", "work": "dkkt_loss+backward", "variant": n, "n": n_syn,
                  "device": str(device), **r})
        for base, new in (("backward_all", "backward_inputs"), ("backward_inputs", "vmap_fused")):
            emit({"kind": "ratio", "group": "dkkt", "what": f"dkkt_loss+backward: {base} / {new} (speed-up of {new})",
                  "value": round(res.ratio(base, new), 3), "n": n_syn})

    def sam_step(model: torch.nn.Module, x: torch.Tensor, yy: torch.Tensor, opt: SAM) -> None:
        F.cross_entropy(model(x), yy).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), yy).backward()
        opt.second_step(zero_grad=True)

    def sam_runner(memory_format: torch.memory_format | None, compile_: bool = False) -> Callable[[], None]:
        model = build_model(meta, arch, seed=4).to(device)
        x = syn_x.to(device)
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
            x = x.contiguous(memory_format=memory_format)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.001, lr=0.1, momentum=0.9, weight_decay=5e-4)
        fwd = torch.compile(model) if compile_ else model
        yy = syn_y.to(device)
        return lambda: sam_step(fwd, x, yy, opt)

    if "channels_last" in groups:
        ab("channels_last", "sam_step_1model", {"contiguous": sam_runner(None),
                                                "channels_last": sam_runner(torch.channels_last)},
           "contiguous", "channels_last", n=n_syn)

    if "compile" in groups:
        eager, compiled = sam_runner(None), sam_runner(None, compile_=True)
        t0 = time.perf_counter()
        compiled()  # first call compiles (forward and backward graphs)
        emit({"kind": "fast_path", "group": "compile", "work": "sam_step_1model", "variant": "compile_first_call",
              "seconds": round(time.perf_counter() - t0, 2), "n": n_syn, "device": str(device)})
        ab("compile", "sam_step_1model", {"eager": eager, "compiled": compiled}, "eager", "compiled", n=n_syn)


if __name__ == "__main__":
    main()
