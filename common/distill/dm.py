"""Distribution-matching loss (paper Eq. 2; Zhao & Bilen, "Dataset Condensation with
Distribution Matching", WACV 2023).

    L_DM(S) = sum_c || mean_{x in T'_c} psi(A_c(x)) - mean_{s in S_c} psi(A_c(s)) ||^2

psi is the ``embed()`` of a freshly, randomly initialised ConvNet (a new one every
iteration, parameters frozen; the caller builds it), A_c is DSA with ONE sampled
``DSAParams`` per class shared by the real and the synthetic images of that class
(the siamese property of ``common.augment.apply_dsa``).

Implementation notes
- The real embeddings carry no gradient (only S is optimised), so they are computed
  under ``torch.no_grad()``: no graph is kept for the (up to 256 per class) real images.
- Classes are packed into as few psi forwards as ``max_batch`` allows (one for the real
  and one for the synthetic images by default, instead of a forward per class as in the
  reference loop; ``max_batch=1`` is the reference's per-class loop). This is exact for
  per-sample normalisations (instance/layer norm, the ConvNet default) but NOT for batch
  norm, where the batch statistics would mix the classes of one forward.
  Which is fastest depends on the device (bench/README.md, ``dm_full_pool.py``): on the
  CPU one class per forward (``DistillConfig.dm_max_batch`` = 256 with real batch 256) is
  2.7-3.6x faster than all classes at once on the full pool; on a GPU (H200) all classes in
  one forward (``dm_max_batch`` = 0) take 0.68x the per-class time (launch-bound).
- A large real pool can stay uint8: ``sample_real_batches(..., transform=normalize)``
  normalizes only the drawn rows (element-wise, so the same values).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from common.augment import DSAParams, apply_dsa

__all__ = ["dm_loss", "class_indices", "pack_classes", "sample_real_batches"]


def _augment(x: Tensor, params: DSAParams | None) -> Tensor:
    return x if params is None else apply_dsa(x, params)


def dm_loss(
    embed: Callable[[Tensor], Tensor],
    real: Sequence[Tensor],
    syn: Sequence[Tensor],
    dsa_params: Sequence[DSAParams | None] | None = None,
    max_batch: int | None = None,
) -> Tensor:
    """Class-wise mean-embedding matching, summed over the classes given.

    Args:
        embed: psi, maps an N×C×H×W batch to N×D features (e.g. ``ConvNet.embed`` of a
            fresh random network with frozen parameters).
        real: per class, the real images (normalized float, K_c×C×H×W, K_c >= 1).
        syn: per class, the synthetic images (ipc_c×C×H×W, ipc_c >= 1), same order.
        dsa_params: per class, the DSA draw applied to BOTH the real and the synthetic
            images of that class; ``None`` (or a ``None`` entry) means no augmentation.
        max_batch: most images per psi forward; consecutive classes are packed up to it
            (a class is never split, so 1 = one forward per class). ``None`` or 0: all
            classes in one forward. Same loss up to float rounding either way.

    Returns:
        Scalar tensor, differentiable w.r.t. every tensor in ``syn``.
    """
    n = len(real)
    if len(syn) != n:
        raise ValueError(f"dm_loss: got {n} real class batches but {len(syn)} synthetic ones")
    if n == 0:
        raise ValueError("dm_loss: no classes given (real and syn are empty)")
    if dsa_params is None:
        dsa_params = [None] * n
    elif len(dsa_params) != n:
        raise ValueError(f"dm_loss: dsa_params has {len(dsa_params)} entries for {n} classes")
    for c, (r, s) in enumerate(zip(real, syn)):
        if r.dim() != 4 or s.dim() != 4 or r.shape[0] == 0 or s.shape[0] == 0:
            raise ValueError(
                f"dm_loss: class slot {c} needs non-empty N×C×H×W batches, "
                f"got real {tuple(r.shape)} and syn {tuple(s.shape)}"
            )
        if r.shape[1:] != s.shape[1:]:
            raise ValueError(
                f"dm_loss: class slot {c} real images {tuple(r.shape[1:])} and synthetic "
                f"images {tuple(s.shape[1:])} differ in shape"
            )

    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 0):
        raise ValueError(f"dm_loss: max_batch must be None or an int >= 0, got {max_batch!r}")
    with torch.no_grad():  # real embeddings: no graph kept
        mean_r = _class_means(embed, real, dsa_params, max_batch)
    mean_s = _class_means(embed, syn, dsa_params, max_batch)
    return ((mean_r - mean_s) ** 2).sum()


def pack_classes(sizes: Sequence[int], max_batch: int | None) -> list[range]:
    """Consecutive class slots grouped so that each group holds at most ``max_batch``
    images (a single class larger than that forms its own group). None / 0: one group."""
    if not max_batch:
        return [range(len(sizes))]
    groups: list[range] = []
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > max_batch:
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    groups.append(range(start, len(sizes)))
    return groups


def _class_means(
    embed: Callable[[Tensor], Tensor],
    xs: Sequence[Tensor],
    dsa_params: Sequence[DSAParams | None],
    max_batch: int | None,
) -> Tensor:
    """(num_classes × D) mean embedding per class slot, psi run once per packed group."""
    means: list[Tensor] = []
    for group in pack_classes([x.shape[0] for x in xs], max_batch):
        emb = embed(torch.cat([_augment(xs[c], dsa_params[c]) for c in group]))
        means.extend(e.mean(0) for e in emb.split([xs[c].shape[0] for c in group]))
    return torch.stack(means)


def class_indices(y: Tensor, num_classes: int) -> list[Tensor]:
    """Indices (int64, CPU) of each class 0..num_classes-1 in label vector ``y``."""
    y = y.detach().to("cpu", torch.int64)
    return [torch.nonzero(y == c, as_tuple=False).flatten() for c in range(num_classes)]


def sample_real_batches(
    x: Tensor,
    idx_by_class: Sequence[Tensor],
    batch: int,
    generator: torch.Generator,
    classes: Sequence[int] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Per class, up to ``batch`` random images of that class (all of them when fewer).

    Randomness comes only from ``generator`` (a CPU generator), so a seed fixes the draw.
    ``transform`` maps each drawn batch (e.g. ``common.datasets.normalize``, so that a large
    pool can stay uint8 and only the drawn images are converted: element-wise, so the batch
    equals the same rows of the normalized pool). None: the rows as stored.
    """
    if batch < 1:
        raise ValueError(f"real batch size must be >= 1, got {batch}")
    out: list[Tensor] = []
    for c in classes if classes is not None else range(len(idx_by_class)):
        idx = idx_by_class[c]
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no real (safe) images to match")
        if idx.numel() > batch:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:batch]]
        rows = x[idx.to(x.device)]
        out.append(rows if transform is None else transform(rows))
    return out
