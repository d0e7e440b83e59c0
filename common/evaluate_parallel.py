"""K evaluation networks trained in lockstep: one ``torch.func.vmap``-ed forward/backward over
their stacked parameters per step, instead of ``common.evaluate.train_model`` one network
after the other. Chosen by one switch, ``EvalConfig.parallel_models`` (default False), in
``common.evaluate.evaluate_synthetic``.

Each network keeps its own generator, so its batch order and DSA draws are those of the
sequential path, and SGD / SAM are written out per network on the stacked tensors (per-network
SAM gradient norm, the op order of ``torch.optim.SGD``'s single-tensor path), so the results
equal ``train_model``'s up to float rounding (tests/test_fast_paths.py: same accuracies,
weights to 1e-5). Only for networks without buffers (vmap cannot batch batch norm's in-place
running statistics) and with identical parameter shapes (``can_train_in_parallel``).

Measured (bench/eval_epoch.py: one SAM epoch of K = 5 ConvNet-3 width 128, batch 256, DSA;
speed-up = sequential / parallel, medians side by side in one process; bench/README.md):

| ipc | CPU (2 cores) | GPU (NVIDIA H200, torch 2.11) seq / par | GPU peak memory seq / par |
|---|---|---|---|
| 1  | 0.84x | **1.62x** (43 / 27 ms) | 95 / 227 MiB |
| 10 | 0.69x | **1.48x** (51 / 34 ms) | 276 / 1365 MiB |
| 50 | 0.55x | 0.89x (90 / 102 ms) | 595 / 3348 MiB |

It pays only on a GPU at small ipc (launch-bound steps) and costs 2.5-5.6x the memory, hence
off by default: turn it on for GPU sweeps at ipc <= 10.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from common.augment import apply_dsa, sample_dsa_params
from common.config import EvalConfig
from common.training import check_images

__all__ = ["can_train_in_parallel", "train_models_parallel"]


def can_train_in_parallel(models: Sequence[nn.Module]) -> bool:
    """True when ``train_models_parallel`` can batch these networks: same parameter names,
    shapes and dtypes, and no buffers (vmap cannot batch in-place running-stat updates)."""
    if not models:
        return False
    ref = [(n, p.shape, p.dtype) for n, p in models[0].named_parameters()]
    for m in models:
        if any(True for _ in m.buffers()):
            return False
        if [(n, p.shape, p.dtype) for n, p in m.named_parameters()] != ref:
            return False
    return bool(ref)


def train_models_parallel(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: EvalConfig,
    seeds: Sequence[int],
    device: torch.device | str,
    on_epoch: Callable[[int, list[float]], None] | None = None,
) -> list[nn.Module]:
    """``train_model`` for K networks at once: model k with ``seeds[k]``, same result.

    One ``vmap``-ed forward/backward over the stacked parameters per step; batch order and
    DSA per model from its own generator (as in ``train_model``); SGD / SAM per model,
    written out on the stacked tensors with the op order of ``torch.optim.SGD`` (CPU
    single-tensor path) and ``common.sam.SAM``. ``on_epoch(epoch, mean_losses)`` after
    every epoch. Returns the models (moved to ``device``) with the trained weights.
    """
    config.validate()
    check_images(x, y, "train")
    if len(models) != len(seeds):
        raise ValueError(f"got {len(models)} models but {len(seeds)} seeds")
    if not can_train_in_parallel(models):
        raise ValueError("models cannot be trained in parallel (different parameters or buffers); "
                         "use train_model per model")
    device = torch.device(device)
    models = [m.to(device) for m in models]
    k_models = len(models)
    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).clone()
              for n in names}
    template = copy.deepcopy(models[0]).to("meta")  # structure only; weights come from `params`
    for m in models:
        m.train()
    template.train()
    x = x.to(device, torch.float32)
    y = y.to(device, torch.int64)
    gens = [torch.Generator().manual_seed(int(s) % 2**63) for s in seeds]
    lr = config.resolved_lr
    wd, mom, rho = config.weight_decay, config.momentum, config.rho
    sam = config.optimizer == "sam"
    bufs: dict[str, Tensor] = {}  # SGD momentum buffers, created at the first step as in torch.optim.SGD

    def forward_all(p: dict[str, Tensor], xb: Tensor) -> Tensor:
        return vmap(lambda pk, xk: functional_call(template, pk, (xk,)))(p, xb)

    def losses_and_grads(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        live = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        out = forward_all(live, xb)
        # Per model its own mean CE (as train_model); the sum keeps the models' gradients apart.
        per = torch.stack([F.cross_entropy(out[k], yb[k]) for k in range(k_models)])
        return per.detach(), torch.autograd.grad(per.sum(), list(live.values()))

    def bshape(v: Tensor, like: Tensor) -> Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))

    n = x.shape[0]
    cur_lr = lr
    for epoch in range(config.epochs):
        if config.lr_decay_at_half and epoch == config.epochs // 2 and config.epochs > 1:
            cur_lr = lr * 0.1
        perms = [torch.randperm(n, generator=g).to(device) for g in gens]
        loss_sum = torch.zeros(k_models, device=device, dtype=torch.float64)
        for i in range(0, n, config.batch_size):
            xbs, ybs = [], []
            for k in range(k_models):
                idx = perms[k][i:i + config.batch_size]
                xb = x[idx]
                if config.dsa:
                    xb = apply_dsa(xb, sample_dsa_params(gens[k], config.dsa_strategy))
                xbs.append(xb)
                ybs.append(y[idx])
            xb_all, yb_all = torch.stack(xbs), torch.stack(ybs)
            loss, grads = losses_and_grads(params, xb_all, yb_all)
            with torch.no_grad():
                if sam:
                    # SAM.first_step per model: e = rho * g / ||g|| over all of that model's parameters.
                    norms = torch.stack([g.flatten(1).norm(p=2, dim=1) for g in grads])  # (P, K)
                    scale = rho / (torch.linalg.vector_norm(norms, 2, dim=0) + 1e-12)  # (K,)
                    perturbed = {nm: params[nm] + g * bshape(scale, g) for nm, g in zip(names, grads)}
            if sam:
                _, grads = losses_and_grads(perturbed, xb_all, yb_all)  # same batch at w + e(w)
            with torch.no_grad():
                for nm, g in zip(names, grads):  # torch.optim.SGD, single-tensor path
                    p = params[nm]
                    d = g.add(p, alpha=wd) if wd != 0 else g
                    if mom != 0:
                        if nm not in bufs:
                            bufs[nm] = torch.clone(d).detach()
                        else:
                            bufs[nm].mul_(mom).add_(d)
                        d = bufs[nm]
                    p.add_(d, alpha=-cur_lr)
            loss_sum += loss.to(torch.float64) * yb_all.shape[1]
        sums = loss_sum.tolist()  # one host sync per epoch
        bad = [k for k, v in enumerate(sums) if not math.isfinite(v)]
        if bad:
            raise RuntimeError(f"training loss became non-finite in epoch {epoch + 1} "
                               f"(seed {seeds[bad[0]]}, parallel model {bad[0]})")
        if on_epoch is not None:
            on_epoch(epoch + 1, [v / n for v in sums])
    with torch.no_grad():
        for k, m in enumerate(models):
            for nm, p in m.named_parameters():
                p.copy_(params[nm][k])
    return models
