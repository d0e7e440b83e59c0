"""Local training and evaluation of the global ConvNet on a client's private images."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from common.augment import DSA_STRATEGY
from common.datasets import DatasetMeta, normalize
from common.training import accuracy, fit

__all__ = ["TrainStats", "train_local", "evaluate_local"]


@dataclass
class TrainStats:
    loss: float  # mean cross-entropy over the last epoch
    accuracy: float  # training accuracy over the last epoch
    num_examples: int
    seconds: float


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yields an ``advance()``: a rich bar on a terminal, a no-op elsewhere (simulation actors log to files)."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda: prog.advance(task)


def train_local(
    model: nn.Module,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    meta: DatasetMeta,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    augment: bool,
    device: torch.device,
    seed: int,
    progress: bool = True,
    label: str = "local training",
) -> TrainStats:
    """Plain SGD on the shard for ``epochs`` epochs (model trained in place; the loop: common.training.fit)."""
    if x_uint8.shape[0] == 0:
        raise ValueError(f"{label}: no training images")
    start = time.perf_counter()
    model.to(device)
    x = normalize(x_uint8, meta)  # float32 on CPU; batches go to the device one at a time
    gen = torch.Generator().manual_seed(seed)  # shuffling and DSA draws: CPU generator
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    with _progress(progress, label, steps) as advance:
        last = fit(model, x, y, opt, epochs=epochs, batch_size=batch_size, generator=gen, device=device,
                   dsa_strategy=DSA_STRATEGY if augment else None, on_step=advance)
    return TrainStats(loss=last.loss, accuracy=last.accuracy, num_examples=n, seconds=time.perf_counter() - start)


def evaluate_local(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, meta: DatasetMeta, device: torch.device,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on uint8 images."""
    n = x_uint8.shape[0]
    if n == 0:
        raise ValueError("evaluation: no held-out images (federation.holdout_fraction is 0 or the shard is tiny)")
    model.to(device)
    return accuracy(model, x_uint8, y, device, batch_size, transform=lambda xb: normalize(xb, meta))
