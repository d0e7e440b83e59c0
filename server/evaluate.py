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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.augment import DSA_STRATEGY, apply_dsa, parse_strategy, sample_dsa_params
from server.progress import make_progress
from server.sam import SAM

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

OPTIMIZERS: tuple[str, ...] = ("sam", "sgd")


@dataclass
class EvalConfig:
    optimizer: str = "sam"  # "sam" | "sgd"
    epochs: int = 300
    lr: float | None = None  # None: 0.1 for sam, 0.01 for sgd
    rho: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    num_models: int = 3
    lr_decay_at_half: bool = True
    dsa_strategy: str = DSA_STRATEGY  # optional addition

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.1 if self.optimizer == "sam" else 0.01

    def validate(self) -> "EvalConfig":
        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"EvalConfig.{key} must be {want}, got {getattr(self, key)!r}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {list(OPTIMIZERS)}")
        for key in ("epochs", "batch_size", "num_models"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "an int >= 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "None or a finite number > 0")
        if not self.rho >= 0:
            raise bad("rho", ">= 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "in [0, 1)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", ">= 0")
        parse_strategy(self.dsa_strategy)
        return self


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
    t0 = time.monotonic()
    seeds = derive_seeds(seed, config.num_models)
    accs: list[float] = []
    losses: list[float] = []
    with make_progress(progress) as bar:
        task = bar.add_task(f"eval {config.optimizer}", total=config.num_models * config.epochs, status="")
        for k, s in enumerate(seeds):
            model = model_factory(s)

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
