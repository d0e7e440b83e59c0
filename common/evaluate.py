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

The training and accuracy loops are ``common.training``'s (shared with the clients).
``parallel_models``: the K networks in lockstep with vmap, ``common/evaluate_parallel.py``
(same results; faster only on a GPU at ipc <= 10, measured there; off by default).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.config import EvalConfig, profile_value
from common.progress import make_progress
from common.evaluate_parallel import can_train_in_parallel, train_models_parallel
from common.sam import SAM
from common.training import EpochStats, accuracy, check_images, fit

__all__ = [
    "EvalConfig",
    "EvalResult",
    "SAM",
    "derive_seeds",
    "evaluate_synthetic",
    "summarize",
    "test_accuracy",
    "train_model",
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


def test_accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device | str,
                  batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on (x, y); leaves it in eval mode."""
    check_images(x, y, "test")
    return accuracy(model, x, y, torch.device(device), batch_size)


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
    check_images(x, y, "train")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    model = model.to(device)
    lr = config.resolved_lr
    kw = dict(lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    opt: torch.optim.Optimizer
    if config.optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=config.rho, **kw)
    else:
        opt = torch.optim.SGD(model.parameters(), **kw)
    half = config.epochs // 2 if config.lr_decay_at_half and config.epochs > 1 else config.epochs

    def epoch_done(epoch: int, stats: EpochStats) -> None:
        if not math.isfinite(stats.loss):
            raise RuntimeError(f"training loss became non-finite in epoch {epoch} (seed {seed})")
        if on_epoch is not None:
            on_epoch(epoch, stats.loss)

    fit(model, x.to(device, torch.float32), y.to(device, torch.int64), opt, epochs=config.epochs,
        batch_size=config.batch_size, generator=gen, device=device,
        dsa_strategy=config.dsa_strategy if config.dsa else None,
        lr_at=lambda epoch: lr * 0.1 if epoch >= half else lr, on_epoch=epoch_done)
    return model


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
    check_images(syn_x, syn_y, "syn")
    check_images(test_x, test_y, "test")
    if tuple(syn_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise ValueError(f"synthetic images {tuple(syn_x.shape[1:])} and test images "
                         f"{tuple(test_x.shape[1:])} differ in shape")
    device = torch.device(device)
    t0 = time.monotonic()
    seeds = derive_seeds(seed, config.num_models)
    accs: list[float] = []
    losses: list[float] = []
    with make_progress(progress) as bar:
        task = bar.add_task(f"eval {config.optimizer}", total=config.num_models * config.epochs, status="")
        parallel = profile_value("evaluation.parallel_models", config.parallel_models, device.type)
        models = [model_factory(s) for s in seeds] if parallel else []
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
