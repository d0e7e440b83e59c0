"""Tests for server/reports/audit.py (nearest-private-neighbour audit of synthetic sets)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.datasets import DatasetMeta
from server.reports.audit import (
    AuditReference,
    audit_synthetic,
    nearest_cosine,
    nearest_l2,
    save_closest_pairs_grid,
)

CPU = torch.device("cpu")
SHAPE = (3, 8, 8)
META = DatasetMeta(name="toy", class_names=("a", "b", "c"), channels=3, height=8, width=8,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class TinyEmbedder(nn.Module):
    """Stand-in for the trained ConvNet: anything with embed(x) works."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def embed(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


def _model(seed: int = 0) -> TinyEmbedder:
    torch.manual_seed(seed)
    return TinyEmbedder()


def _smooth_images(n: int, gen: torch.Generator) -> Tensor:
    # Low-resolution noise upsampled: structured "training images", unlike white noise.
    low = torch.randn(n, 3, 4, 4, generator=gen)
    return F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)


def test_planted_private_copy_is_found_and_flagged() -> None:
    gen = torch.Generator().manual_seed(1)
    private = torch.randn(300, *SHAPE, generator=gen)
    reference = torch.randn(120, *SHAPE, generator=gen)
    syn = torch.randn(20, *SHAPE, generator=gen)
    syn[5] = private[123]

    res = audit_synthetic("planted", syn, private, reference, model=_model(), device=CPU, n_reference=100)

    assert res.nearest_l2[5].item() == 0.0
    assert res.nearest_l2_index[5].item() == 123
    assert res.l2_min == 0.0
    assert 5 in res.flagged_l2
    assert res.nearest_cos is not None and res.nearest_cos_index is not None
    assert res.nearest_cos[5].item() == pytest.approx(1.0, abs=1e-5)
    assert res.nearest_cos_index[5].item() == 123
    assert res.cos_max == pytest.approx(1.0, abs=1e-5)
    assert 5 in res.flagged_cos
    # Random images are nowhere near a private image: their distances are of the reference's order.
    others = torch.cat([res.nearest_l2[:5], res.nearest_l2[6:]])
    assert others.min().item() > 0.5 * res.l2_ref_median
    assert res.nearest_l2.shape == (20,) and res.nearest_l2_index.dtype == torch.int64
    assert res.n_synthetic == 20 and res.n_private == 300 and res.n_reference == 100


def test_gaussian_noise_is_not_flagged_against_tight_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    private = _smooth_images(400, gen)
    # Jittered copies of training images: their nearest-private distances are tiny, so the
    # reference 1st percentile is tight (small L2, cosine close to 1).
    reference = private[:200] + 0.02 * torch.randn(200, *SHAPE, generator=gen)
    noise = torch.randn(30, *SHAPE, generator=gen)

    ref = AuditReference.build(private, reference, _model(), device=CPU, n_reference=200, seed=0)
    res = ref.audit("noise", noise)

    assert res.l2_ref_p1 < 0.02 * (3 * 8 * 8) ** 0.5 * 1.5
    assert res.cos_ref_p99 > 0.99
    assert res.flagged_l2 == []
    assert res.flagged_cos == []
    assert res.l2_min > 10 * res.l2_ref_median
    assert res.cos_max < res.cos_ref_p99
    row = res.row()
    assert row["set"] == "noise" and row["n_flagged_l2"] == 0 and row["n_flagged_cos"] == 0
    assert row["flagged_l2"] == "" and row["flagged_cos"] == ""


def test_chunked_equals_unchunked_and_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    private = torch.randn(257, *SHAPE, generator=gen)
    reference = torch.randn(90, *SHAPE, generator=gen)
    syn = torch.randn(23, *SHAPE, generator=gen)
    model = _model(1)

    big = audit_synthetic("s", syn, private, reference, model=model, device=CPU, chunk=4096, n_reference=50)
    small = audit_synthetic("s", syn, private, reference, model=model, device=CPU, chunk=7, n_reference=50)

    assert torch.equal(big.nearest_l2_index, small.nearest_l2_index)
    assert torch.allclose(big.nearest_l2, small.nearest_l2, atol=1e-5)
    assert torch.equal(big.nearest_cos_index, small.nearest_cos_index)
    assert torch.allclose(big.nearest_cos, small.nearest_cos, atol=1e-5)
    assert big.l2_ref_p1 == pytest.approx(small.l2_ref_p1, abs=1e-5)
    assert big.cos_ref_p99 == pytest.approx(small.cos_ref_p99, abs=1e-5)
    assert big.flagged_l2 == small.flagged_l2 and big.flagged_cos == small.flagged_cos

    # Brute force: full distance / similarity matrices.
    d = torch.cdist(syn.flatten(1).double(), private.flatten(1).double())
    assert torch.equal(small.nearest_l2_index, d.argmin(1))
    assert torch.allclose(small.nearest_l2.double(), d.min(1).values, atol=1e-4)
    with torch.no_grad():
        e_syn = F.normalize(model.embed(syn), dim=1)
        e_priv = F.normalize(model.embed(private), dim=1)
    sim = e_syn @ e_priv.T
    assert torch.equal(small.nearest_cos_index, sim.argmax(1))
    assert torch.allclose(small.nearest_cos, sim.max(1).values, atol=1e-5)


def test_low_level_search_helpers_chunk_invariant() -> None:
    gen = torch.Generator().manual_seed(4)
    q, bank = torch.randn(11, 5, generator=gen), torch.randn(40, 5, generator=gen)
    d1, i1 = nearest_l2(q, bank, CPU, chunk=3)
    d2, i2 = nearest_l2(q, bank, CPU, chunk=1000)
    assert torch.equal(i1, i2) and torch.allclose(d1, d2)
    unit = F.normalize(bank, dim=1)
    s1, j1 = nearest_cosine(q, unit, CPU, chunk=4)
    s2, j2 = nearest_cosine(q, unit, CPU, chunk=1000)
    assert torch.equal(j1, j2) and torch.allclose(s1, s2)


def test_reference_is_reusable_seeded_and_model_untouched() -> None:
    gen = torch.Generator().manual_seed(5)
    private = torch.randn(100, *SHAPE, generator=gen)
    reference = torch.randn(80, *SHAPE, generator=gen)
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    ref = AuditReference.build(private, reference, model, device=CPU, n_reference=30, seed=7)
    again = AuditReference.build(private, reference, model, device=CPU, n_reference=30, seed=7)
    other = AuditReference.build(private, reference, model, device=CPU, n_reference=30, seed=8)
    assert ref.ref_index.shape == (30,) and torch.equal(ref.ref_index, again.ref_index)
    assert not torch.equal(ref.ref_index, other.ref_index)
    assert torch.equal(ref.ref_l2, again.ref_l2)

    s1, s2 = torch.randn(4, *SHAPE, generator=gen), torch.randn(6, *SHAPE, generator=gen)
    r1, r2 = ref.audit("one", s1), ref.audit("two", s2)
    one_shot = audit_synthetic("one", s1, private, reference, model, device=CPU, n_reference=30, seed=7)
    assert torch.equal(r1.nearest_l2_index, one_shot.nearest_l2_index)
    assert r1.l2_ref_p1 == r2.l2_ref_p1 == one_shot.l2_ref_p1
    assert r2.nearest_l2.shape == (6,)

    assert model.training  # caller's model keeps its mode and weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_audit_without_model_skips_cosine() -> None:
    gen = torch.Generator().manual_seed(6)
    private, reference = torch.randn(50, *SHAPE, generator=gen), torch.randn(20, *SHAPE, generator=gen)
    res = audit_synthetic("pix", private[:3].clone(), private, reference, device=CPU)
    assert res.nearest_cos is None and res.nearest_cos_index is None and res.flagged_cos == []
    assert res.cos_max != res.cos_max  # NaN
    assert res.flagged_l2 == [0, 1, 2]
    assert res.nearest_l2_index.tolist() == [0, 1, 2]
    assert res.n_reference == 20  # n_reference=500 capped at the available 20


def test_bad_inputs_raise_clear_errors() -> None:
    private = torch.randn(10, *SHAPE)
    with pytest.raises(TypeError, match="normalized float"):
        audit_synthetic("x", torch.randn(2, *SHAPE), (private * 50).to(torch.uint8), torch.randn(5, *SHAPE), device=CPU)
    with pytest.raises(ValueError, match="image shape"):
        audit_synthetic("x", torch.randn(2, 3, 4, 4), private, torch.randn(5, *SHAPE), device=CPU)
    with pytest.raises(ValueError, match="chunk"):
        audit_synthetic("x", torch.randn(2, *SHAPE), private, torch.randn(5, *SHAPE), device=CPU, chunk=0)
    with pytest.raises(TypeError, match="embed"):
        audit_synthetic("x", torch.randn(2, *SHAPE), private, torch.randn(5, *SHAPE), model=nn.Linear(2, 2), device=CPU)


def test_closest_pairs_grid_png(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    private = torch.randn(60, *SHAPE, generator=gen)
    syn = torch.randn(12, *SHAPE, generator=gen)
    syn[3] = private[42]
    res = audit_synthetic("g", syn, private, torch.randn(30, *SHAPE, generator=gen), model=_model(), device=CPU)

    out = tmp_path / "sub" / "pairs.png"
    syn_y = torch.arange(12) % 10
    private_y = torch.arange(60) % 10
    pairs = save_closest_pairs_grid(res, syn, private, META, out, k=5, syn_y=syn_y, private_y=private_y, title="g")
    assert pairs[0] == (3, 42)  # the exact copy is the closest pair
    assert len(pairs) == 5
    img = mpimg.imread(out)
    # a readable figure (titles, class names, distances under each pair), not a strip of 8 px tiles
    assert img.shape[0] >= 300 and img.shape[1] >= 5 * 100
    assert out.stat().st_size > 0

    pairs_cos = save_closest_pairs_grid(res, syn, private, META, tmp_path / "cos.png", k=50, by="cos")
    assert pairs_cos[0] == (3, 42) and len(pairs_cos) == 12
    with pytest.raises(ValueError, match="by must be"):
        save_closest_pairs_grid(res, syn, private, META, tmp_path / "bad.png", by="pixels")
