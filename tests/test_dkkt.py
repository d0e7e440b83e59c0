"""Tests for common/distill/dkkt.py (primal / stationarity / DKKT, Eq. 3-4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.augment import DSAParams
from common.models import build_model
from common.distill.dkkt import dkkt_loss, kkt_terms, primal_loss, stationarity_loss




def _stationary_linear(n: int = 6, d: int = 5, c: int = 3, seed: int = 0):
    """A linear model whose theta* equals -sum_i lam_i grad_theta CE_i(theta*) exactly.

    theta = T(theta) := -sum_i lam_i (softmax(W x_i + b) - e_{y_i}) [x_i; 1] is solved by a
    damped fixed-point iteration (the map is a contraction for small lam and x).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    y = torch.arange(n) % c
    lam = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.2
    W = torch.zeros(c, d, dtype=torch.float64)
    b = torch.zeros(c, dtype=torch.float64)
    onehot = F.one_hot(y, c).double()
    for _ in range(400):
        r = lam[:, None] * (F.softmax(x @ W.T + b, 1) - onehot)
        W, b = 0.5 * W - 0.5 * (r.T @ x), 0.5 * b - 0.5 * r.sum(0)
    model = nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    return model, x, y, lam


@pytest.mark.parametrize("distance", ["l1", "l2", "cosine"])
def test_stationarity_zero_at_constructed_kkt_point(distance: str) -> None:
    model, x, y, lam = _stationary_linear()
    assert stationarity_loss(model, x, y, lam, distance=distance).item() == pytest.approx(0.0, abs=1e-12)
    # Perturbing lambda breaks the match (cosine: only when the direction changes).
    lam2 = lam.clone()
    lam2[0] *= 3.0
    assert stationarity_loss(model, x, y, lam2, distance=distance).item() > 1e-6


def test_cosine_is_scale_blind_l1_is_not() -> None:
    model, x, y, lam = _stationary_linear()
    assert stationarity_loss(model, x, y, 1.7 * lam, distance="cosine").item() == pytest.approx(0.0, abs=1e-12)
    assert stationarity_loss(model, x, y, 1.7 * lam, distance="l1").item() > 1e-3


def _smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("distance", ["l1", "l2", "cosine"])
def test_stationarity_gradcheck_x_and_lambda(distance: str) -> None:
    model = _smooth_mlp()
    for p in model.parameters():
        p.requires_grad_(False)  # theta* is frozen; the loss still differentiates w.r.t. theta inside
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lam = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 1])
    assert torch.autograd.gradcheck(
        lambda xx, ll: stationarity_loss(model, xx, y, ll, distance=distance), (x, lam), eps=1e-6, atol=1e-6
    )


def test_stationarity_grad_reaches_x_and_lambda_through_convnet() -> None:
    meta = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)
    model = build_model(meta, {"width": 8, "depth": 2}, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    lam = torch.ones(3, requires_grad=True)
    loss = stationarity_loss(model, x, torch.tensor([0, 1, 2]), lam)
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert lam.grad is not None and float(lam.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())  # theta* untouched


def test_primal_ce_and_hinge() -> None:
    model = _smooth_mlp()
    x = torch.randn(5, 1, 2, 3, dtype=torch.float64)
    logits = model(x)
    pred = logits.argmax(1)
    y = pred.clone()
    y[0] = (pred[0] + 1) % 3  # exactly one misclassified sample
    assert primal_loss(model, x, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    hinge = primal_loss(model, x, y, mode="hinge").item()
    assert hinge == pytest.approx(F.cross_entropy(logits[:1], y[:1]).item() / 5, rel=1e-12)


def test_dkkt_combines_clean_and_augmented_terms() -> None:
    meta = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)
    model = build_model(meta, {"width": 8, "depth": 2}, seed=0).eval()
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    lam = torch.full((3,), 0.5, requires_grad=True)
    alpha, eta = 0.1, 5.0
    loss, t = dkkt_loss(model, x, y, lam, alpha=alpha, dsa_params=DSAParams("flip", 3), aug_weight=eta)
    want = ((t["primal"] + alpha * t["stat"]) + eta * (t["primal_aug"] + alpha * t["stat_aug"])) / (1 + eta)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain, t2 = dkkt_loss(model, x, y, lam, alpha=alpha)
    assert set(t2) == {"primal", "stat", "primal_part", "stat_part"}
    assert plain.item() == pytest.approx((t2["primal"] + alpha * t2["stat"]).item(), rel=1e-6)
    # the weighted parts add up to the loss (what the gradient-share trace relies on)
    assert (t["primal_part"] + t["stat_part"]).item() == pytest.approx(loss.item(), rel=1e-6)
    assert t["stat_part"].item() == pytest.approx(alpha * (t["stat"] + eta * t["stat_aug"]).item() / (1 + eta), rel=1e-6)
    p, s = kkt_terms(model, x, y, lam)
    assert p.item() == pytest.approx(t2["primal"].item(), rel=1e-6) and s is not None


def test_bad_lambda_raises() -> None:
    model = _smooth_mlp()
    x = torch.randn(2, 1, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="lam must be >= 0"):
        stationarity_loss(model, x, y, torch.tensor([1.0, -0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lam must have shape \(2,\)"):
        stationarity_loss(model, x, y, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="distance must be one of"):
        stationarity_loss(model, x, y, torch.ones(2, dtype=torch.float64), distance="l3")


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_manifold_term_backpropagates_through_every_dsa_op(op: str) -> None:
    meta = SimpleNamespace(channels=3, height=8, width=8, num_classes=3)
    model = build_model(meta, {"width": 8, "depth": 2}, seed=0).eval()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    lam = torch.ones(3, requires_grad=True)
    loss, terms = dkkt_loss(model, x, torch.tensor([0, 1, 2]), lam, alpha=0.1, dsa_params=DSAParams(op, 5))
    loss.backward()
    assert "stat_aug" in terms
    assert float(x.grad.abs().sum()) > 0 and float(lam.grad.abs().sum()) > 0
