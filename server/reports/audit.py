"""Privacy audit of a synthetic set S against the private (never uploaded) data.

For every synthetic image we find its nearest private training image

* by L2 distance of the flattened *normalized* pixels, and
* by cosine similarity of ``model.embed`` features (optional; needs a trained model),

and compare those numbers with a reference: the same nearest-private-neighbour
statistics for a seeded sample of held-out test images. A test image was never
trained on, so its distance to the training set is what "not memorized" looks
like; a synthetic image closer to some private image than the 1st percentile
of the reference (for cosine: more similar than the 99th percentile) is flagged.

Everything is computed in chunks on the given device, so a 60,000-image
private set never needs a full (queries x private) distance matrix.

Typical use (the reference is built once and reused for every synthetic set)::

    ref = AuditReference.build(private_x, test_x, model, device=device)
    for name, s in sets.items():
        rows.append(ref.audit(name, s.x).row())

No Flower imports: everything takes plain tensors and modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.datasets import DatasetMeta, denormalize
from common.device import pick_device
from server.store.run_folder import save_figure

__all__ = [
    "AuditResult",
    "AuditReference",
    "audit_synthetic",
    "nearest_l2",
    "nearest_cosine",
    "embed_images",
    "save_closest_pairs_grid",
]


@dataclass
class AuditResult:
    """Audit of one synthetic set. L2 is in normalized pixel space, cosine in embedding space.

    ``*_ref_*`` are statistics of the reference (held-out test images -> nearest private image).
    Cosine fields are NaN and ``nearest_cos*`` are None when no model was given.
    """

    name: str
    l2_min: float
    l2_median: float
    l2_ref_p1: float
    l2_ref_median: float
    cos_max: float
    cos_median: float
    cos_ref_p99: float
    cos_ref_median: float
    flagged_l2: list[int]
    flagged_cos: list[int]
    nearest_l2_index: Tensor  # int64 (N,): index into private_x
    nearest_l2: Tensor  # float (N,): L2 distance to that image
    nearest_cos_index: Tensor | None  # int64 (N,) or None without a model
    nearest_cos: Tensor | None  # float (N,) cosine similarity, or None
    l2_mean: float = float("nan")
    l2_ref_min: float = float("nan")
    cos_mean: float = float("nan")
    cos_ref_max: float = float("nan")
    n_synthetic: int = 0
    n_private: int = 0
    n_reference: int = 0

    def row(self) -> dict[str, Any]:
        """Flat dict of scalars for a CSV row (flagged indices as a ';'-joined string)."""
        return {
            "set": self.name,
            "n_synthetic": self.n_synthetic,
            "n_private": self.n_private,
            "n_reference": self.n_reference,
            "l2_min": self.l2_min,
            "l2_median": self.l2_median,
            "l2_mean": self.l2_mean,
            "l2_ref_min": self.l2_ref_min,
            "l2_ref_p1": self.l2_ref_p1,
            "l2_ref_median": self.l2_ref_median,
            "n_flagged_l2": len(self.flagged_l2),
            "flagged_l2": ";".join(str(i) for i in self.flagged_l2),
            "cos_max": self.cos_max,
            "cos_median": self.cos_median,
            "cos_mean": self.cos_mean,
            "cos_ref_max": self.cos_ref_max,
            "cos_ref_p99": self.cos_ref_p99,
            "cos_ref_median": self.cos_ref_median,
            "n_flagged_cos": len(self.flagged_cos),
            "flagged_cos": ";".join(str(i) for i in self.flagged_cos),
        }


# ---------------------------------------------------------------------------
# Chunked nearest-neighbour search
# ---------------------------------------------------------------------------


def _check_images(name: str, x: Tensor, image_shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        # Mixing uint8 pixels with normalized floats would silently give nonsense distances.
        raise TypeError(f"{name} must be normalized float images (common.datasets.normalize), got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if image_shape is not None and tuple(x.shape[1:]) != image_shape:
        raise ValueError(f"{name} has image shape {tuple(x.shape[1:])}, expected {image_shape}")


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return chunk


@torch.no_grad()
def nearest_l2(
    query: Tensor, bank: Tensor, device: torch.device, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """For each row of ``query`` (N x D) the nearest row of ``bank`` (M x D) by Euclidean distance.

    Returns (distances (N,), indices (N,)) on the CPU. Blocks of at most ``chunk`` x ``chunk``
    squared distances are formed on ``device`` via the matmul identity
    ``|q-p|^2 = |q|^2 - 2 q.p + |p|^2``; the winning pair's distance is then recomputed
    directly because the identity loses precision for near-duplicates (an exact copy must
    read 0, not ~1e-3). Ties go to the lowest bank index.
    """
    _check_chunk(chunk)
    query = query.reshape(query.shape[0], -1)
    bank = bank.reshape(bank.shape[0], -1)
    if query.shape[1] != bank.shape[1]:
        raise ValueError(f"query has {query.shape[1]} features, bank has {bank.shape[1]}")
    best_d2 = torch.empty(query.shape[0], dtype=torch.float32)
    best_i = torch.empty(query.shape[0], dtype=torch.int64)
    for q0 in range(0, query.shape[0], chunk):
        q = query[q0 : q0 + chunk].to(device, torch.float32)
        q_sq = (q * q).sum(1, keepdim=True)
        run_d2 = torch.full((q.shape[0],), float("inf"), device=device)
        run_i = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
        for b0 in range(0, bank.shape[0], chunk):
            p = bank[b0 : b0 + chunk].to(device, torch.float32)
            d2 = q_sq - 2.0 * (q @ p.T) + (p * p).sum(1)[None, :]
            d2_min, arg = d2.min(dim=1)
            better = d2_min < run_d2  # strict: an earlier chunk keeps ties
            run_d2 = torch.where(better, d2_min, run_d2)
            run_i = torch.where(better, arg + b0, run_i)
        best_i[q0 : q0 + q.shape[0]] = run_i.cpu()
        # Exact distance of the chosen pair (fixes cancellation error of the identity).
        winners = bank[run_i.to(bank.device)].to(device, torch.float32)
        best_d2[q0 : q0 + q.shape[0]] = ((q - winners) ** 2).sum(1).cpu()
    return best_d2.sqrt(), best_i


@torch.no_grad()
def nearest_cosine(
    query: Tensor, bank_unit: Tensor, device: torch.device, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """For each row of ``query`` (N x D) the most cosine-similar row of ``bank_unit`` (M x D).

    ``bank_unit`` must already be L2-normalized row-wise (see :func:`embed_images`).
    Returns (similarities (N,), indices (N,)) on the CPU; ties go to the lowest index.
    """
    _check_chunk(chunk)
    if query.shape[1] != bank_unit.shape[1]:
        raise ValueError(f"query has {query.shape[1]} features, bank has {bank_unit.shape[1]}")
    best_s = torch.empty(query.shape[0], dtype=torch.float32)
    best_i = torch.empty(query.shape[0], dtype=torch.int64)
    for q0 in range(0, query.shape[0], chunk):
        q = nn.functional.normalize(query[q0 : q0 + chunk].to(device, torch.float32), dim=1)
        run_s = torch.full((q.shape[0],), float("-inf"), device=device)
        run_i = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
        for b0 in range(0, bank_unit.shape[0], chunk):
            p = bank_unit[b0 : b0 + chunk].to(device, torch.float32)
            s_max, arg = (q @ p.T).max(dim=1)
            better = s_max > run_s
            run_s = torch.where(better, s_max, run_s)
            run_i = torch.where(better, arg + b0, run_i)
        best_s[q0 : q0 + q.shape[0]] = run_s.cpu()
        best_i[q0 : q0 + q.shape[0]] = run_i.cpu()
    return best_s, best_i


@torch.no_grad()
def embed_images(model: nn.Module, x: Tensor, device: torch.device, batch: int = 512) -> Tensor:
    """Row-normalized ``model.embed`` features of ``x`` (N x D), kept on ``device``.

    The model must be in eval mode and on ``device`` already (see :class:`AuditReference`).
    ``batch`` bounds activation memory (a ConvNet on 4096 CIFAR images would need ~2 GB).
    """
    _check_chunk(batch)
    parts = [model.embed(x[i : i + batch].to(device, torch.float32)).flatten(1) for i in range(0, x.shape[0], batch)]
    return nn.functional.normalize(torch.cat(parts).float(), dim=1)


# ---------------------------------------------------------------------------
# Reference + audit
# ---------------------------------------------------------------------------


def _frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    # A private eval-mode copy: the caller's model keeps its device and train/eval state.
    if not callable(getattr(model, "embed", None)):
        raise TypeError(f"model must have an embed(x) method (got {type(model).__name__})")
    clone = copy.deepcopy(model).to(device)
    clone.eval()
    clone.requires_grad_(False)
    return clone


class AuditReference:
    """Private bank (pixels + embeddings) and the reference distribution, built once.

    Build it with :meth:`build` and call :meth:`audit`
    for each synthetic set. Attributes after building:

    * ``ref_index`` (int64, n_reference): which ``reference_x`` rows were sampled;
    * ``ref_l2`` / ``ref_cos``: their nearest-private L2 distances / cosine similarities
      (``ref_cos`` is None without a model).
    """

    def __init__(
        self,
        private_x: Tensor,
        private_emb: Tensor | None,
        model: nn.Module | None,
        ref_index: Tensor,
        ref_l2: Tensor,
        ref_cos: Tensor | None,
        device: torch.device,
        chunk: int,
        embed_batch: int,
    ) -> None:
        self.private_x = private_x
        self.private_emb = private_emb
        self.model = model
        self.ref_index = ref_index
        self.ref_l2 = ref_l2
        self.ref_cos = ref_cos
        self.device = device
        self.chunk = chunk
        self.embed_batch = embed_batch

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.private_x.shape[1:])

    @classmethod
    def build(
        cls,
        private_x: Tensor,
        reference_x: Tensor,
        model: nn.Module | None = None,
        *,
        device: torch.device | str | None = None,
        chunk: int = 4096,
        n_reference: int = 500,
        seed: int = 0,
        embed_batch: int = 512,
    ) -> "AuditReference":
        """Embed the private set and compute the reference distances.

        Args:
            private_x: normalized float N x C x H x W, the training images that were NEVER
                uploaded (training set minus the safe subset). Kept by reference (not copied).
            reference_x: normalized held-out images (e.g. the test split), same image shape.
            model: trained model with ``embed(x)``; None skips the embedding-space audit.
                A frozen copy is moved to ``device``; the caller's model is not changed.
            device: where distances are computed (None -> ``pick_device("auto")``).
            chunk: block size (rows and columns) of each distance matrix.
            n_reference: how many reference images to sample (all if fewer exist).
            seed: seed of the reference sample.
            embed_batch: batch size of ``model.embed`` calls.
        """
        _check_images("private_x", private_x)
        _check_images("reference_x", reference_x, tuple(private_x.shape[1:]))
        _check_chunk(chunk)
        if isinstance(n_reference, bool) or not isinstance(n_reference, int) or n_reference < 1:
            raise ValueError(f"n_reference must be a positive int, got {n_reference!r}")
        dev = pick_device(device if device is not None else "auto")
        gen = torch.Generator().manual_seed(int(seed))
        n = min(n_reference, reference_x.shape[0])
        ref_index = torch.randperm(reference_x.shape[0], generator=gen)[:n].sort().values
        ref_x = reference_x[ref_index.to(reference_x.device)]

        ref_l2, _ = nearest_l2(ref_x, private_x, dev, chunk)
        frozen = private_emb = ref_cos = None
        if model is not None:
            frozen = _frozen_copy(model, dev)
            private_emb = embed_images(frozen, private_x, dev, embed_batch)
            ref_emb = embed_images(frozen, ref_x, dev, embed_batch)
            ref_cos, _ = nearest_cosine(ref_emb, private_emb, dev, chunk)
        return cls(private_x, private_emb, frozen, ref_index, ref_l2, ref_cos, dev, chunk, embed_batch)

    def audit(self, name: str, syn_x: Tensor) -> AuditResult:
        """Nearest private image of every synthetic image, compared with the reference."""
        _check_images(f"syn_x ({name})", syn_x, self.image_shape)
        syn_x = syn_x.detach()
        l2, l2_idx = nearest_l2(syn_x, self.private_x, self.device, self.chunk)
        l2_ref_p1 = _quantile(self.ref_l2, 0.01)
        # "Closer than 99% of never-trained-on test images are to the training set."
        flagged_l2 = torch.nonzero(l2 < l2_ref_p1).flatten().tolist()

        nan = float("nan")
        cos = cos_idx = None
        cos_stats = dict(cos_max=nan, cos_median=nan, cos_mean=nan)
        ref_cos_stats = dict(cos_ref_p99=nan, cos_ref_median=nan, cos_ref_max=nan)
        flagged_cos: list[int] = []
        if self.model is not None and self.private_emb is not None and self.ref_cos is not None:
            syn_emb = embed_images(self.model, syn_x, self.device, self.embed_batch)
            cos, cos_idx = nearest_cosine(syn_emb, self.private_emb, self.device, self.chunk)
            cos_stats = dict(cos_max=float(cos.max()), cos_median=_quantile(cos, 0.5), cos_mean=float(cos.mean()))
            ref_cos_stats = dict(
                cos_ref_p99=_quantile(self.ref_cos, 0.99),
                cos_ref_median=_quantile(self.ref_cos, 0.5),
                cos_ref_max=float(self.ref_cos.max()),
            )
            flagged_cos = torch.nonzero(cos > ref_cos_stats["cos_ref_p99"]).flatten().tolist()

        return AuditResult(
            name=name,
            l2_min=float(l2.min()),
            l2_median=_quantile(l2, 0.5),
            l2_ref_p1=l2_ref_p1,
            l2_ref_median=_quantile(self.ref_l2, 0.5),
            flagged_l2=flagged_l2,
            flagged_cos=flagged_cos,
            nearest_l2_index=l2_idx,
            nearest_l2=l2,
            nearest_cos_index=cos_idx,
            nearest_cos=cos,
            l2_mean=float(l2.mean()),
            l2_ref_min=float(self.ref_l2.min()),
            n_synthetic=int(syn_x.shape[0]),
            n_private=int(self.private_x.shape[0]),
            n_reference=int(self.ref_l2.shape[0]),
            **cos_stats,
            **ref_cos_stats,
        )


def _quantile(x: Tensor, q: float) -> float:
    # torch.quantile uses linear interpolation between order statistics (numpy's default).
    return float(torch.quantile(x.double(), q))


def audit_synthetic(
    name: str,
    syn_x: Tensor,
    private_x: Tensor,
    reference_x: Tensor,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
    chunk: int = 4096,
    n_reference: int = 500,
    seed: int = 0,
    embed_batch: int = 512,
) -> AuditResult:
    """One-shot audit (builds the reference and audits ``syn_x``). For several sets build an
    :class:`AuditReference` once instead."""
    ref = AuditReference.build(
        private_x, reference_x, model, device=device, chunk=chunk,
        n_reference=n_reference, seed=seed, embed_batch=embed_batch,
    )
    return ref.audit(name, syn_x)


# ---------------------------------------------------------------------------
# Closest pairs image
# ---------------------------------------------------------------------------


def _to_unit(x: Tensor, meta: DatasetMeta) -> Tensor:
    # Normalized float -> [0, 1] for display, via the dataset's mean/std.
    return denormalize(x.detach().float().cpu(), meta)


def save_closest_pairs_grid(
    result: AuditResult,
    syn_x: Tensor,
    private_x: Tensor,
    meta: DatasetMeta,
    path: str | Path,
    k: int = 10,
    by: str = "l2",
    *,
    syn_y: Tensor | None = None,
    private_y: Tensor | None = None,
    title: str | None = None,
    subject: str = "synthetic",
) -> list[tuple[int, int]]:
    """Save a PNG of the ``k`` synthetic images closest to a private image, each with that image.

    Layout: one column per pair, sorted from the closest; top row = the synthetic image (its
    index and class), bottom row = its nearest private training image (never uploaded; its
    class, the L2 distance in normalized pixels and, with a model, the embedding cosine).
    A pair closer than the reference threshold (L2 below the held-out images' 1st
    percentile, cosine above their 99th) is marked FLAGGED in red. Row labels say which side
    is synthetic and which private; the title names the set, the metric and the reference
    values. ``by`` = "l2" (ascending) or "cos" (descending); ``syn_y`` / ``private_y`` give
    the classes (names from ``meta.class_names``). Images are de-normalized with the
    dataset's mean/std and drawn at 1.2 in per tile. ``subject`` names the top row's images
    ("synthetic", or "uploaded safe" for the safe-pool sanity row). Returns the (synthetic index, private
    index) pairs in column order.
    """
    if by == "l2":
        score, nn_index = result.nearest_l2, result.nearest_l2_index
        order = torch.argsort(score, stable=True)
    elif by == "cos":
        if result.nearest_cos is None or result.nearest_cos_index is None:
            raise ValueError(f"by='cos' needs an audit with a model; {result.name!r} has no embedding results")
        score, nn_index = result.nearest_cos, result.nearest_cos_index
        order = torch.argsort(score, descending=True, stable=True)
    else:
        raise ValueError(f"by must be 'l2' or 'cos', got {by!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if syn_x.shape[0] != score.shape[0]:
        raise ValueError(f"syn_x has {syn_x.shape[0]} images but the audit {result.name!r} covers {score.shape[0]}")
    top = order[:k]
    syn_idx = top.tolist()
    priv_idx = nn_index[top].tolist()
    top_row = _to_unit(syn_x[top.to(syn_x.device)], meta).cpu()
    bottom_row = _to_unit(private_x[nn_index[top].to(private_x.device)], meta).cpu()

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(getattr(meta, "class_names", None) or [])

    def cls(y: Tensor | None, i: int) -> str:
        if y is None:
            return "?"
        c = int(y[i])
        return names[c] if c < len(names) else str(c)

    flagged_l2, flagged_cos = set(result.flagged_l2), set(result.flagged_cos)
    n = len(syn_idx)
    fig, axes = plt.subplots(2, n, figsize=(1.25 * n + 1.3, 3.9), dpi=100, squeeze=False)
    for j, (si, pi) in enumerate(zip(syn_idx, priv_idx)):
        for row, img in ((0, top_row[j]), (1, bottom_row[j])):
            ax = axes[row][j]
            arr = img.permute(1, 2, 0).numpy()
            ax.imshow(arr if arr.shape[2] == 3 else arr[:, :, 0], cmap=None if arr.shape[2] == 3 else "gray",
                      vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        flag = si in flagged_l2 or si in flagged_cos
        axes[0][j].set_title(f"#{si} {cls(syn_y, si)}", fontsize=8)
        dist = f"L2 {float(result.nearest_l2[si]):.1f}"
        if result.nearest_cos is not None:
            dist += f"\ncos {float(result.nearest_cos[si]):.3f}"
        same = syn_y is not None and private_y is not None and int(syn_y[si]) == int(private_y[pi])
        label = f"{cls(private_y, pi)}{' (same)' if same else ''}\n{dist}" + ("\nFLAGGED" if flag else "")
        axes[1][j].set_xlabel(label, fontsize=7.5, color="red" if flag else "black")
        if flag:
            for ax in (axes[0][j], axes[1][j]):
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(2)
    axes[0][0].set_ylabel(f"{subject}\n(server side)", fontsize=9)
    axes[1][0].set_ylabel("nearest private\n(never uploaded)", fontsize=9)
    metric = ("L2 in normalized pixels, closest first" if by == "l2"
              else "cosine in theta*'s embedding, most similar first")
    ref = f"reference (held-out images): L2 p1 {result.l2_ref_p1:.1f}, median {result.l2_ref_median:.1f}"
    if result.nearest_cos is not None:
        ref += f"; cos p99 {result.cos_ref_p99:.3f}"
    n_flag = len(flagged_l2 | flagged_cos)
    fig.suptitle(f"{title or result.name}: {n} of {result.n_synthetic or syn_x.shape[0]} {subject} images "
                 f"and their nearest private training image ({metric})\n{ref}; flagged: {n_flag}",
                 fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return list(zip(syn_idx, priv_idx))
