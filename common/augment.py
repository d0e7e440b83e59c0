"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen, ICML 2021).

'single' mode as in the DC/DM reference: each call picks ONE op group of the
strategy ("color", "crop", "cutout", "flip", "scale", "rotate"; "color" =
brightness + saturation + contrast) and applies it with per-sample random values.

Two modes, both fixed by a ``DSAParams(op, seed, siamese)``; values come from a CPU
``torch.Generator`` seeded with ``seed`` (same values on CPU and CUDA):

- ``siamese=True`` (distillation, the reference's ``DiffAugment(..., seed=s)``): every
  image of the batch gets the values of sample 0 (the reference's ``randf[:] = randf[0]``),
  i.e. ONE transform for the whole batch. DM applies the same params to the real batch of
  a class and to its synthetic images, so both see the identical transform: with
  ipc = pipc and real initialisation the DM loss is exactly 0 and S does not move.
- ``siamese=False`` (training the evaluation networks, the reference's ``seed=-1``):
  each image gets its own values. Each op draws an (N, K) matrix in row-major order, so
  sample i gets the same K values whatever the batch size N.

Deviation from the reference, on purpose: it reseeds torch's GLOBAL generator before
every draw (``seed + k``); we draw from a private generator, so the values differ
from the reference's for the same integer seed (the distribution is the same) and
the global RNG is never touched.

Every op is differentiable with respect to the input: color ops are affine in x,
cutout is a mask multiply, flip is a ``torch.where`` over ``x.flip(3)``, and
scale / rotate / crop (translation) use ``affine_grid`` + ``grid_sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import DSA_OPS, DSA_STRATEGY, parse_strategy  # the vocabulary is config; the ops are here

__all__ = [
    "DSA_STRATEGY",
    "DSA_OPS",
    "DSARatios",
    "DEFAULT_RATIOS",
    "DSAParams",
    "parse_strategy",
    "sample_dsa_params",
    "apply_dsa",
    "dsa",
]

_NONE = "none"  # the op of "no augmentation"


@dataclass(frozen=True)
class DSARatios:
    """Magnitudes of the reference ParamDiffAug."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125  # max translation as a fraction of the side
    ratio_cutout: float = 0.5  # hole side as a fraction of the image side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


DEFAULT_RATIOS = DSARatios()


@dataclass(frozen=True)
class DSAParams:
    """One DSA draw: which op, the seed of its random values, and whether the whole
    batch shares sample 0's values (``siamese``, distillation) or each image has its own."""

    op: str
    seed: int
    siamese: bool = False


def sample_dsa_params(generator: torch.Generator, strategy: str = DSA_STRATEGY,
                      siamese: bool = False) -> DSAParams:
    """Pick one op of ``strategy`` uniformly and a 63-bit seed, both from ``generator``.

    ``siamese=True``: one transform for the whole batch (see the module docstring).
    """
    ops = parse_strategy(strategy)
    dev = generator.device
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=dev).item())
    if not ops:
        return DSAParams(op=_NONE, seed=seed, siamese=siamese)
    idx = int(torch.randint(0, len(ops), (1,), generator=generator, device=dev).item())
    return DSAParams(op=ops[idx], seed=seed, siamese=siamese)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Rng:
    """The random source of one ``apply_dsa`` call: a seeded generator, and whether
    every sample gets sample 0's values (siamese) or its own."""

    gen: torch.Generator
    siamese: bool

    def uniform(self, n: int, k: int) -> Tensor:
        """(n, k) float64 CPU uniforms in [0, 1); row i depends only on (seed, i).
        Siamese: row 0 repeated n times (the reference's ``randf[:] = randf[0]``)."""
        u = torch.rand(1 if self.siamese else n, k, generator=self.gen, dtype=torch.float64)
        return u.expand(n, k)


def _draw(rng: _Rng, n: int, k: int, like: Tensor) -> Tensor:
    """(n, k) uniforms in [0, 1) on ``like``'s device and dtype."""
    return rng.uniform(n, k).to(device=like.device, dtype=like.dtype)


def _draw_int(rng: _Rng, n: int, highs: tuple[int, ...]) -> Tensor:
    """(n, len(highs)) CPU int64; column j uniform in [0, highs[j]] (inclusive)."""
    u = rng.uniform(n, len(highs))
    span = torch.tensor(highs, dtype=torch.float64) + 1
    return torch.minimum((u * span).floor(), span - 1).long()


def _affine(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    # align_corners=False: the reference calls affine_grid/grid_sample with torch's default
    # (False since torch 1.3); zeros outside the image.
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- ops


def _brightness(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    b = _draw(rng, x.shape[0], 1, x).view(-1, 1, 1, 1)
    return x + (b - 0.5) * r.brightness


def _saturation(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    s = _draw(rng, x.shape[0], 1, x).view(-1, 1, 1, 1)
    m = x.mean(dim=1, keepdim=True)  # per-pixel mean over channels
    return (x - m) * (s * r.saturation) + m


def _contrast(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    c = _draw(rng, x.shape[0], 1, x).view(-1, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # per-image mean
    return (x - m) * (c + r.contrast) + m


def _color(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    # One draw of 3 values per sample keeps the siamese property for the group
    # (separate sequential draws of N values would depend on N).
    v = _draw(rng, x.shape[0], 3, x)
    b, s, c = (v[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = x + (b - 0.5) * r.brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (s * r.saturation) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (c + r.contrast) + m


def _flip(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    f = _draw(rng, x.shape[0], 1, x).view(-1, 1, 1, 1) < r.prob_flip
    return torch.where(f, x.flip(3), x)


def _scale(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    lo = 1.0 / r.ratio_scale
    v = _draw(rng, x.shape[0], 2, x) * (r.ratio_scale - lo) + lo  # sx, sy in [1/ratio, ratio]
    zero = torch.zeros_like(v[:, 0])
    theta = torch.stack(
        [torch.stack([v[:, 0], zero, zero], 1), torch.stack([zero, v[:, 1], zero], 1)], 1
    )
    return _affine(x, theta)


def _rotate(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    a = (_draw(rng, x.shape[0], 1, x)[:, 0] - 0.5) * 2.0 * (r.ratio_rotate / 180.0 * math.pi)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _crop(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    # Reference "crop" = pad-and-crop, i.e. an integer translation by up to
    # ratio*side pixels with zero fill. Done with grid_sample at exact pixel
    # offsets; "nearest" makes it an exact shift and is still differentiable
    # w.r.t. x (it is a gather).
    n, _, h, w = x.shape
    sh, sw = int(h * r.ratio_crop_pad + 0.5), int(w * r.ratio_crop_pad + 0.5)
    t = _draw_int(rng, n, (2 * sh, 2 * sw))
    ty, tx = t[:, 0] - sh, t[:, 1] - sw
    # with align_corners=False one pixel is 2/side in normalized coordinates, and a shift
    # by whole pixels lands "nearest" exactly on pixel centres
    dx = tx.to(x.device, x.dtype) * (2.0 / w)
    dy = ty.to(x.device, x.dtype) * (2.0 / h)
    one = torch.ones_like(dx)
    zero = torch.zeros_like(dx)
    theta = torch.stack([torch.stack([one, zero, dx], 1), torch.stack([zero, one, dy], 1)], 1)
    return _affine(x, theta, mode="nearest")


def _cutout(x: Tensor, rng: _Rng, r: DSARatios) -> Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * r.ratio_cutout + 0.5), int(w * r.ratio_cutout + 0.5)
    # hole centre range as in the reference: [0, side + (1 - size % 2))
    c = _draw_int(rng, n, (h - (ch % 2), w - (cw % 2))).to(x.device)
    cy, cx = c[:, 0], c[:, 1]
    y0 = (cy - ch // 2).view(-1, 1, 1)
    x0 = (cx - cw // 2).view(-1, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rows >= y0) & (rows < y0 + ch) & (cols >= x0) & (cols < x0 + cw)
    mask = (~hole).to(x.dtype).unsqueeze(1)
    return x * mask


_OP_FNS = {
    "color": _color,
    "brightness": _brightness,
    "saturation": _saturation,
    "contrast": _contrast,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


def apply_dsa(x: Tensor, params: DSAParams, ratios: DSARatios = DEFAULT_RATIOS) -> Tensor:
    """Apply ``params.op`` to the N×C×H×W batch ``x`` (differentiable w.r.t. ``x``).

    Same ``params`` -> same op and same values for the leading samples of any two
    batches; with ``params.siamese`` every sample of both batches gets the same values.
    Op "none" returns ``x`` unchanged.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_dsa expects an N×C×H×W tensor, got shape {tuple(x.shape)}")
    if params.op == _NONE:
        return x
    fn = _OP_FNS.get(params.op)
    if fn is None:
        raise ValueError(f"unknown DSA op {params.op!r}; valid ops: {list(DSA_OPS)}")
    if x.shape[0] == 0:
        return x
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(params.seed) % (2**63))
    return fn(x, _Rng(gen, bool(params.siamese)), ratios)


def dsa(x: Tensor, generator: torch.Generator, strategy: str = DSA_STRATEGY, siamese: bool = False) -> Tensor:
    """Sample params from ``generator`` and apply them to ``x``."""
    return apply_dsa(x, sample_dsa_params(generator, strategy, siamese))
