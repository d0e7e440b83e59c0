"""Evaluate a synthetic set: train fresh networks on S, test them on held-out data.

Protocols (``EvalConfig``):
- ``optimizer="sam"`` (paper, appendix A): SAM (Foret et al.) with lr 0.1, rho 0.001 over
  SGD (momentum 0.9, weight decay 5e-4).
- ``optimizer="sgd"`` (DM reference, utils.evaluate_synset): SGD lr 0.01, momentum 0.9,
  weight decay 5e-4.
Both: batch 256, lr x0.1 at half of the epochs (``lr_decay_at_half``), DSA on every
training batch (``dsa``; a fresh draw per batch), cross-entropy.

``num_models`` networks are trained, each from ``model_factory(seed_i)`` with seeds
derived from ``seed`` (``numpy.random.SeedSequence``), and every random choice in
training (shuffling, DSA) comes from a CPU generator seeded with seed_i, so a result is
deterministic for a seed on the CPU (CUDA kernels may add nondeterminism).
The reported std is the POPULATION std (ddof = 0), as ``np.std`` in the DM reference
code, so numbers compare with the paper's table.

``parallel_models`` (``train_models_parallel``): the K networks are trained in lockstep,
one ``torch.func.vmap``-ed forward/backward over their stacked parameters per step,
instead of one network after the other. Each network keeps its own generator, so its
batch order and DSA draws are those of the sequential path, and SAM/SGD are applied per
network (per-network SAM gradient norm), so the results equal the sequential path's up to
float rounding (tests/test_fast_paths.py). Only for networks without buffers (batch norm
updates running stats in place, which vmap cannot batch) and with identical parameter
shapes; otherwise the sequential path runs. Measured on the CPU it is SLOWER (grouped
convolutions; bench/eval_epoch.py, bench/README.md), hence off by default.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.augment import apply_dsa, sample_dsa_params
from common.config import EvalConfig
from common.perf import tune_cpu_allocator
from common.progress import make_progress
from common.sam import SAM

__all__ = [
    "EvalConfig",
    "EvalResult",
    "SAM",
    "derive_seeds",
    "evaluate_synthetic",
    "summarize",
    "test_accuracy",
    "train_model",
    "train_models_parallel",
    "can_train_in_parallel",
]

@dataclass
class EvalResult:
    accuracies: list[float]
    mean: float
    std: float  # population std (ddof = 0)
    seeds: list[int]
    wall_s: float
    test_losses: list[float] = field(default_factory=list)  # optional addition: mean test CE per model


def derive_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds from ``seed`` (SeedSequence spawn keys 0..n-1)."""
    return [
        int(np.random.SeedSequence(int(seed) % 2**64, spawn_key=(i,)).generate_state(1, np.uint64)[0] >> 1)
        for i in range(n)
    ]


def _check_set(x: Tensor, y: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{what}_x must be a non-empty normalized float N×C×H×W tensor, "
                         f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}_y must be int64 of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")


@torch.no_grad()
def test_accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device | str,
                  batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on (x, y); leaves it in eval mode."""
    _check_set(x, y, "test")
    device = torch.device(device)
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        yb = y[i:i + batch_size].to(device, torch.int64, non_blocking=True)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = x.shape[0]
    return correct / n, loss_sum / n


test_accuracy.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def train_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: EvalConfig,
    seed: int,
    device: torch.device | str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` (moved to ``device``) on (x, y) with the protocol of ``config``.

    ``on_epoch(epoch, mean_train_loss)`` is called after every epoch. Returns the model.
    """
    config.validate()
    _check_set(x, y, "train")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    model = model.to(device)
    x = x.to(device, torch.float32)
    y = y.to(device, torch.int64)
    lr = config.resolved_lr
    kw = dict(lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    opt: torch.optim.Optimizer
    if config.optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=config.rho, **kw)
    else:
        opt = torch.optim.SGD(model.parameters(), **kw)
    n = x.shape[0]
    for epoch in range(config.epochs):
        if config.lr_decay_at_half and epoch == config.epochs // 2 and config.epochs > 1:
            for g in opt.param_groups:
                g["lr"] = lr * 0.1
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = 0.0
        for i in range(0, n, config.batch_size):
            idx = perm[i:i + config.batch_size]
            xb, yb = x[idx], y[idx]
            if config.dsa:
                xb = apply_dsa(xb, sample_dsa_params(gen, config.dsa_strategy))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(opt, SAM):
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(xb), yb).backward()  # same (augmented) batch at w + e(w)
                opt.second_step(zero_grad=True)
            else:
                opt.step()
            loss_sum += float(loss.detach()) * idx.numel()
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"training loss became non-finite in epoch {epoch + 1} (seed {seed})")
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / n)
    return model


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
    from torch.func import functional_call, vmap

    config.validate()
    _check_set(x, y, "train")
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


def evaluate_synthetic(
    syn_x: Tensor,
    syn_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    model_factory: Callable[[int], nn.Module],
    config: EvalConfig,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
) -> EvalResult:
    """Train ``config.num_models`` fresh networks on (syn_x, syn_y); test each on (test_x, test_y).

    ``syn_x`` / ``test_x``: normalized float images; ``model_factory(seed)`` builds a
    fresh, seeded network. Returns accuracies in [0, 1], their mean and population std.
    """
    config.validate()
    _check_set(syn_x, syn_y, "syn")
    _check_set(test_x, test_y, "test")
    if tuple(syn_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise ValueError(f"synthetic images {tuple(syn_x.shape[1:])} and test images "
                         f"{tuple(test_x.shape[1:])} differ in shape")
    device = torch.device(device)
    if device.type == "cpu":
        tune_cpu_allocator()  # large activations: reuse heap memory instead of page-faulting it in (common/perf.py)
    t0 = time.monotonic()
    seeds = derive_seeds(seed, config.num_models)
    accs: list[float] = []
    losses: list[float] = []
    with make_progress(progress) as bar:
        task = bar.add_task(f"eval {config.optimizer}", total=config.num_models * config.epochs, status="")
        models = [model_factory(s) for s in seeds] if config.parallel_models else []
        if models and can_train_in_parallel(models):
            def tick_all(epoch: int, train_losses: list[float]) -> None:
                bar.update(task, advance=len(seeds), status=f"{len(seeds)} models in parallel, epoch {epoch}, "
                           f"train_loss={float(np.mean(train_losses)):.3g}")

            for model in train_models_parallel(models, syn_x, syn_y, config, seeds, device, on_epoch=tick_all):
                acc, loss = test_accuracy(model, test_x, test_y, device)
                accs.append(acc)
                losses.append(loss)
            seeds_left: list[int] = []
        else:
            seeds_left = seeds
        for k, s in enumerate(seeds_left):
            model = models[k] if models else model_factory(s)  # parallel not possible: reuse the built ones

            def tick(epoch: int, train_loss: float, k: int = k) -> None:
                bar.update(task, advance=1, status=f"model {k + 1}/{len(seeds)} train_loss={train_loss:.3g}"
                           + (f" last_acc={accs[-1]:.4f}" if accs else ""))

            model = train_model(model, syn_x, syn_y, config, s, device, on_epoch=tick)
            acc, loss = test_accuracy(model, test_x, test_y, device)
            accs.append(acc)
            losses.append(loss)
    return EvalResult(accuracies=accs, mean=float(np.mean(accs)), std=float(np.std(accs)),
                      seeds=seeds, wall_s=time.monotonic() - t0, test_losses=losses)


def summarize(accuracies: Sequence[float]) -> str:
    """'mean ± std' in percent (population std), e.g. '25.53 ± 0.45'."""
    return f"{100 * float(np.mean(accuracies)):.2f} ± {100 * float(np.std(accuracies)):.2f}"
