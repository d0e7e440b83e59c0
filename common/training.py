"""The one training loop and the one accuracy loop for every network the project trains: a
client's local epochs on its shard (``edge_client/train.py``) and the evaluation networks
trained on a synthetic set (``common/evaluate.py``).

``fit``: epochs of shuffled mini-batches (a fresh permutation per epoch from ``generator``),
optional DSA per batch (its parameters from the same generator, after the permutation),
cross-entropy, one step of ``optimizer`` per batch; SAM (``common.sam.SAM``) takes its two
steps on the same augmented batch. ``lr_at(epoch)`` sets every group's learning rate at the
start of an epoch. The caller puts ``x`` where indexing should happen (the client keeps its
shard on the CPU and moves one batch at a time; evaluation moves S to the device once).

``accuracy``: (accuracy in [0, 1], mean cross-entropy) over batches, in eval mode, no grad;
``transform`` maps a raw batch to the network's input (the client normalizes uint8 images
batch by batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.augment import apply_dsa, sample_dsa_params
from common.sam import SAM

__all__ = ["EpochStats", "fit", "accuracy", "check_images"]


@dataclass
class EpochStats:
    """The last epoch of ``fit``: mean cross-entropy and accuracy over its batches (before each step)."""

    loss: float
    accuracy: float
    num_examples: int


def check_images(x: Tensor, y: Tensor, what: str) -> None:
    """``x``: a non-empty normalized float N x C x H x W tensor; ``y``: its int labels."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{what}_x must be a non-empty normalized float N×C×H×W tensor, "
                         f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}_y must be int64 of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    dsa_strategy: str | None = None,
    lr_at: Callable[[int], float] | None = None,
    on_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> EpochStats:
    """Train ``model`` (already on ``device``) in place; returns the last epoch's statistics.

    ``dsa_strategy``: None = no augmentation. ``on_step()`` after every batch,
    ``on_epoch(epoch, stats)`` (epoch counted from 1) after every epoch.
    """
    n = x.shape[0]
    stats = EpochStats(loss=float("nan"), accuracy=float("nan"), num_examples=n)
    for epoch in range(epochs):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch)
        model.train()
        loss_sum, correct = 0.0, torch.zeros((), dtype=torch.int64, device=device)
        for idx in torch.randperm(n, generator=generator).to(x.device).split(batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            if dsa_strategy is not None:
                xb = apply_dsa(xb, sample_dsa_params(generator, dsa_strategy))
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(optimizer, SAM):
                optimizer.first_step(zero_grad=True)
                F.cross_entropy(model(xb), yb).backward()  # the same (augmented) batch at w + e(w)
                optimizer.second_step(zero_grad=True)
            else:
                optimizer.step()
            loss_sum += float(loss.detach()) * idx.numel()
            correct += (logits.detach().argmax(1) == yb).sum()  # stays on the device: one sync per epoch
            if on_step is not None:
                on_step()
        stats = EpochStats(loss=loss_sum / n, accuracy=int(correct) / n, num_examples=n)
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
    return stats


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 1024,
             transform: Callable[[Tensor], Tensor] | None = None) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on (x, y); leaves it in eval mode."""
    model.eval()
    correct, loss_sum = 0, 0.0
    n = x.shape[0]
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size]
        if transform is not None:
            xb = transform(xb)
        xb = xb.to(device, non_blocking=True)
        yb = y[i:i + batch_size].to(device, torch.int64, non_blocking=True)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / n, loss_sum / n
