"""The engine's fast paths: the uint8 real pool gives the normalized pool's values; the DKKT
approximations are what they claim (and off by default)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.augment import DSAParams
from common.datasets import get_meta, normalize
from common.distill.dkkt import dkkt_loss, kkt_terms
from common.distill.dm import class_indices, sample_real_batches
from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize
from common.models import build_model

FM = get_meta("fashion-mnist")
ARCH = {"width": 8, "depth": 2}


def _uint8_pool(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *FM.image_shape), generator=g, dtype=torch.uint8)
    return x, torch.arange(FM.num_classes).repeat(n // FM.num_classes)


def test_uint8_pool_normalized_per_batch_equals_normalized_pool() -> None:
    x8, y = _uint8_pool()
    idx = class_indices(y, FM.num_classes)
    a = sample_real_batches(normalize(x8, FM), idx, 4, torch.Generator().manual_seed(3))
    b = sample_real_batches(x8, idx, 4, torch.Generator().manual_seed(3), transform=lambda t: normalize(t, FM))
    assert len(a) == len(b) == FM.num_classes
    for ra, rb in zip(a, b):
        assert rb.dtype == torch.float32 and ra.shape == rb.shape
        assert float((ra - rb).abs().max()) <= 1e-6


@pytest.mark.parametrize("method", ["dm", "random_real", "safe_all"])
def test_synthesize_uint8_pool_same_result_as_normalized_pool(method: str) -> None:
    x8, y = _uint8_pool()
    common = dict(ipc=2, num_classes=FM.num_classes, image_shape=FM.image_shape, pipc=5, safe_y=y, model=None,
                  embed_factory=make_embed_factory(FM, ARCH), seed=4, device="cpu", progress=False,
                  config=DistillConfig(iterations=3, real_batch=3, log_every=1, init="real"))
    ref = synthesize(method, safe_x=normalize(x8, FM), **common)
    got = synthesize(method, safe_x=x8, safe_normalize=lambda t: normalize(t, FM), **common)
    assert got.x.dtype == torch.float32 and got.x.shape == ref.x.shape
    assert float((got.x - ref.x).abs().max()) <= 1e-6
    if method == "dm":
        assert [r["dm"] for r in got.info["loss_history"]] == pytest.approx(
            [r["dm"] for r in ref.info["loss_history"]], rel=1e-6)
    with pytest.raises(ValueError, match="safe_normalize"):
        synthesize(method, safe_x=x8, **common)


def _kkt_setup():
    meta = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)
    model = build_model(meta, {"width": 8, "depth": 2}, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 1, 8, 8, generator=g).requires_grad_(True)
    y = torch.arange(3).repeat(3)
    lam = (torch.rand(9, generator=g) + 0.5).requires_grad_(True)
    return model, x, y, lam


def test_single_pass_is_one_addend_of_the_two_pass_loss() -> None:
    model, x, y, lam = _kkt_setup()
    alpha, eta, aug = 0.1, 5.0, DSAParams("flip", 3)
    both, _ = dkkt_loss(model, x, y, lam, alpha=alpha, dsa_params=aug, aug_weight=eta, distance="cosine")
    clean, tc = dkkt_loss(model, x, y, lam, alpha=alpha, dsa_params=aug, aug_weight=eta, distance="cosine",
                          passes="clean")
    augd, ta = dkkt_loss(model, x, y, lam, alpha=alpha, dsa_params=aug, aug_weight=eta, distance="cosine",
                         passes="aug")
    # drawing "aug" with probability eta / (1 + eta): the expectation is the two-pass loss
    assert ((clean + eta * augd) / (1 + eta)).item() == pytest.approx(both.item(), rel=1e-6)
    assert float(tc["aug_pass"]) == 0.0 and float(ta["aug_pass"]) == 1.0
    assert (tc["primal_part"] + tc["stat_part"]).item() == pytest.approx(clean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="passes"):
        dkkt_loss(model, x, y, lam, alpha=alpha, dsa_params=aug, passes="sometimes")


def test_stat_subset_keeps_the_full_primal_and_scales_the_sum() -> None:
    model, x, y, lam = _kkt_setup()
    p_all, s_all = kkt_terms(model, x, y, lam, distance="l2")
    p_same, s_same = kkt_terms(model, x, y, lam, distance="l2", stat_idx=torch.arange(9))
    assert p_same.item() == pytest.approx(p_all.item(), rel=1e-6) and s_same.item() == pytest.approx(s_all.item(), rel=1e-6)
    sub = torch.tensor([7, 1, 4])
    p_sub, s_sub = kkt_terms(model, x, y, lam, distance="l2", stat_idx=sub)
    assert p_sub.item() == pytest.approx(p_all.item(), rel=1e-5)  # the primal still covers all 9
    # the stationarity sum over 3 of 9 candidates, times 9 / 3
    _, s_want = kkt_terms(model, x[sub], y[sub], lam[sub] * 3.0, distance="l2")
    assert s_sub.item() == pytest.approx(s_want.item(), rel=1e-5)
    assert s_sub.item() != pytest.approx(s_all.item(), rel=1e-3)
    gx, gl = torch.autograd.grad(s_sub, [x, lam])
    others = torch.tensor([i for i in range(9) if i not in sub.tolist()])
    assert float(gl[others].abs().max()) == 0.0 and float(gl[sub].abs().min()) > 0.0
    assert float(gx[others].abs().max()) == 0.0 and float(gx[sub].abs().max()) > 0.0


def test_approximations_off_by_default_and_switchable() -> None:
    cfg = DistillConfig()
    assert cfg.aug_passes == "both" and cfg.stat_candidates == 0
    for bad in (dict(aug_passes="half"), dict(stat_candidates=-1), dict(stat_candidates=True)):
        with pytest.raises(ValueError):
            DistillConfig(**bad).validate()
    meta = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(15, 1, 8, 8, generator=g), torch.arange(3).repeat(5)
    kw = dict(ipc=2, num_classes=3, image_shape=(1, 8, 8), pipc=5, safe_x=sx, safe_y=sy,
              model=build_model(meta, ARCH, seed=1), embed_factory=make_embed_factory(meta, ARCH),
              init_model=build_model(meta, ARCH, seed=2), seed=0, device="cpu", progress=False)
    base = synthesize("dkkt_dm", config=DistillConfig(iterations=4, real_batch=4, log_every=1), **kw)
    again = synthesize("dkkt_dm", config=DistillConfig(iterations=4, real_batch=4, log_every=1), **kw)
    fast = synthesize("dkkt_dm", config=DistillConfig(iterations=4, real_batch=4, log_every=1,
                                                      aug_passes="sample", stat_candidates=2), **kw)
    assert torch.equal(base.x, again.x)
    assert not torch.equal(base.x, fast.x) and bool(torch.isfinite(fast.x).all())
    assert {r["aug_pass"] for r in fast.info["loss_history"]} <= {0.0, 1.0}
