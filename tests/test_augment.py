"""Tests for common/augment.py (differentiable siamese augmentation)."""

from __future__ import annotations

import pytest
import torch

from common.augment import (
    DSA_OPS,
    DSA_STRATEGY,
    DSAParams,
    apply_dsa,
    dsa,
    parse_strategy,
    sample_dsa_params,
)

STRATEGY_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _x(n: int = 12, c: int = 3, size: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g, dtype=dtype)


def test_strategy_constant_and_parse() -> None:
    assert DSA_STRATEGY == "color_crop_cutout_flip_scale_rotate"
    assert parse_strategy(DSA_STRATEGY) == STRATEGY_OPS
    assert parse_strategy("flip_rotate") == ("flip", "rotate")
    assert parse_strategy("none") == () and parse_strategy("") == ()


@pytest.mark.parametrize("bad", ["color_blur", "bogus", "flip__zoom", "_"])
def test_unknown_op_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="DSA op"):
        parse_strategy(bad)
    with pytest.raises(ValueError, match="DSA op"):
        sample_dsa_params(torch.Generator().manual_seed(0), bad)


def test_apply_unknown_op_raises() -> None:
    with pytest.raises(ValueError, match="blur"):
        apply_dsa(_x(), DSAParams("blur", 0))
    with pytest.raises(ValueError, match="N×C×H×W"):
        apply_dsa(torch.randn(3, 8, 8), DSAParams("flip", 0))


def test_sample_params_deterministic_and_covers_ops() -> None:
    a = [sample_dsa_params(torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g = torch.Generator().manual_seed(0)
    draws = [sample_dsa_params(g) for _ in range(300)]
    assert {p.op for p in draws} == set(STRATEGY_OPS)  # 'single' mode: one group per call
    assert all(0 <= p.seed < 2**63 for p in draws)
    assert len({p.seed for p in draws}) == 300
    g = torch.Generator().manual_seed(0)
    assert {sample_dsa_params(g, "flip_rotate").op for _ in range(50)} == {"flip", "rotate"}
    assert sample_dsa_params(g, "none").op == "none"
    x = _x()
    assert apply_dsa(x, DSAParams("none", 3)) is x


@pytest.mark.parametrize("op", DSA_OPS)
def test_same_params_same_output_and_shape_dtype(op: str) -> None:
    for dtype in (torch.float32, torch.float64):
        x = _x(dtype=dtype)
        p = DSAParams(op, 42)
        a, b = apply_dsa(x, p), apply_dsa(x, p)
        assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", DSA_OPS)
def test_siamese_leading_samples_match(op: str) -> None:
    x = _x(n=40)
    p = DSAParams(op, 2024)
    full = apply_dsa(x, p)
    for k in (1, 5):
        part = apply_dsa(x[:k], p)
        torch.testing.assert_close(part, full[:k], rtol=0, atol=1e-6)
    # a *different* batch (real vs synthetic) gets the same per-sample transform:
    # for ops linear in x, T(x + y) = T(x) + T(y) sample by sample
    if op in ("crop", "cutout", "flip", "scale", "rotate"):
        y = _x(n=5, seed=1)
        torch.testing.assert_close(apply_dsa(x[:5] + y, p), full[:5] + apply_dsa(y, p),
                                   rtol=1e-5, atol=1e-5)


def test_siamese_dm_sizes() -> None:
    # DM applies one params object to 256 real and `ipc` synthetic images of a class
    real, syn = _x(n=256, seed=3), _x(n=10, seed=3)[:10]
    for op in STRATEGY_OPS:
        p = DSAParams(op, 99)
        torch.testing.assert_close(apply_dsa(syn, p), apply_dsa(real, p)[:10], rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", DSA_OPS)
def test_different_seeds_differ(op: str) -> None:
    x = _x(n=32)
    assert not torch.equal(apply_dsa(x, DSAParams(op, 1)), apply_dsa(x, DSAParams(op, 2)))


@pytest.mark.parametrize("op", DSA_OPS)
def test_gradient_reaches_input(op: str) -> None:
    x = _x(n=6).requires_grad_(True)
    w = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    out = apply_dsa(x, DSAParams(op, 7))
    assert out.requires_grad
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all()
    assert g.abs().sum() > 0
    # every sample receives gradient (no op blanks a whole image)
    assert (g.abs().flatten(1).sum(1) > 0).all()


def test_flip_matches_torch_flip() -> None:
    x = _x(n=64)
    out = apply_dsa(x, DSAParams("flip", 11))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all()  # each sample is exactly one of the two
    assert 10 < int(flipped.sum()) < 54  # prob 0.5


def test_crop_is_integer_translation_with_zero_fill() -> None:
    # ramp images (value = column + 1): each non-empty output row must be the ramp
    # shifted by an integer in [-4, 4] (0.125 * 32) with zero fill
    n, s = 32, 32
    ramp = (torch.arange(s, dtype=torch.float32) + 1).view(1, 1, 1, s).expand(n, 1, s, s).contiguous()
    out = apply_dsa(ramp, DSAParams("crop", 3))

    def shifted(t: int) -> torch.Tensor:
        j = torch.arange(s) + t
        return torch.where((j >= 0) & (j < s), (j + 1).float(), torch.zeros(()))

    seen = set()
    for img in out[:, 0]:
        rows = img.abs().sum(1) > 0
        assert s - 4 <= int(rows.sum()) <= s  # vertical shift ≤ 4 px, rest zero-filled
        body = img[rows]
        match = [t for t in range(-4, 5) if torch.equal(body, shifted(t).expand_as(body))]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 3


def test_cutout_hole_size_and_untouched_elsewhere() -> None:
    x = _x(n=32, size=32).abs() + 1.0  # strictly positive so zeros mark the hole
    out = apply_dsa(x, DSAParams("cutout", 5))
    holes = (out == 0).all(dim=1)  # N×H×W
    areas = holes.flatten(1).sum(1)
    assert (areas > 0).all() and (areas <= 16 * 16).all()
    assert (areas == 256).any()  # some holes lie fully inside the image
    keep = ~holes.unsqueeze(1).expand_as(x)
    assert torch.equal(out[keep], x[keep])


def test_color_ranges() -> None:
    x = _x(n=64)
    b = apply_dsa(x, DSAParams("brightness", 1)) - x
    per = b.flatten(1)
    assert torch.allclose(per, per[:, :1].expand_as(per), atol=1e-5)  # constant shift per image
    assert per.abs().max() <= 0.5 + 1e-6
    c = apply_dsa(x, DSAParams("contrast", 1))
    ratio = (c - c.mean((1, 2, 3), keepdim=True)).flatten(1).norm(dim=1) / (
        x - x.mean((1, 2, 3), keepdim=True)).flatten(1).norm(dim=1)
    assert (ratio >= 0.5 - 1e-5).all() and (ratio <= 1.5 + 1e-5).all()
    s = apply_dsa(x, DSAParams("saturation", 1))
    torch.testing.assert_close(s.mean(1), x.mean(1))  # channel mean preserved per pixel
    gray = _x(n=4, c=1)
    torch.testing.assert_close(apply_dsa(gray, DSAParams("saturation", 1)), gray)


def test_dsa_convenience_matches_sample_then_apply() -> None:
    x = _x()
    p = sample_dsa_params(torch.Generator().manual_seed(13))
    torch.testing.assert_close(dsa(x, torch.Generator().manual_seed(13)), apply_dsa(x, p))


@pytest.mark.parametrize("op", ["rotate", "scale"])
def test_gradcheck_smooth_ops(op: str) -> None:
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, DSAParams(op, 4)), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("op", DSA_OPS)
def test_cuda_matches_cpu(op: str) -> None:
    x = _x(n=16)
    p = DSAParams(op, 17)
    torch.testing.assert_close(apply_dsa(x.cuda(), p).cpu(), apply_dsa(x, p), rtol=1e-4, atol=1e-4)
