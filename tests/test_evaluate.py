"""Tests for common/sam.py and common/evaluate.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.models import build_model
from common.evaluate import SAM, EvalConfig, derive_seeds, evaluate_synthetic, test_accuracy, train_model




# ----------------------------------------------------------------------------- SAM


def _quad(w: torch.Tensor, a: float = 2.0, b: float = 0.5) -> torch.Tensor:
    return 0.5 * (a * w[0] ** 2 + b * w[1] ** 2)


def _sam_by_hand(w0: list[float], steps: int, lr: float, rho: float, mom: float, wd: float) -> list[float]:
    a, b = 2.0, 0.5
    w = list(w0)
    buf = None
    for _ in range(steps):
        g = [a * w[0], b * w[1]]
        n = math.hypot(*g)
        adv = [w[0] + rho * g[0] / n, w[1] + rho * g[1] / n]
        ga = [a * adv[0] + wd * w[0], b * adv[1] + wd * w[1]]  # SGD adds wd * (restored) w
        buf = ga if buf is None else [mom * buf[i] + ga[i] for i in range(2)]
        w = [w[i] - lr * buf[i] for i in range(2)]
    return w


def test_sam_two_step_update_matches_hand_computation() -> None:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        _quad(w).backward()
        opt.first_step(zero_grad=True)
        _quad(w).backward()
        opt.second_step(zero_grad=True)
    expected = _sam_by_hand([1.0, -2.0], 3, lr=0.1, rho=0.3, mom=0.9, wd=0.01)
    assert w.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_sam_first_step_moves_rho_along_normalized_gradient_and_closure_step() -> None:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    _quad(w).backward()
    opt.first_step()
    g = torch.tensor([2.0, -1.0], dtype=torch.float64)
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.3 * g / g.norm())
    _quad(w).backward()
    opt.second_step()
    # step(closure) == first_step + closure + second_step
    w2 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt2 = SAM([w2], torch.optim.SGD, rho=0.3, lr=0.1)
    _quad(w2).backward()
    opt2.step(lambda: _quad(w2).backward())
    assert torch.allclose(w.detach(), w2.detach())
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.base_optimizer.param_groups is opt2.param_groups


# ----------------------------------------------------------------------------- evaluation

META = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Class c = a bright blob in a class-specific corner: learnable in a few steps.
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, q = (0, 0) if c == 0 else (0, 4) if c == 1 else (4, 2)
        x[i, 0, r:r + 4, q:q + 4] += 2.0
    return x, y


def _factory(seed: int) -> nn.Module:
    return build_model(META, {"width": 8, "depth": 2}, seed=seed)


@pytest.mark.parametrize("optimizer", ["sam", "sgd"])
def test_evaluate_synthetic_in_range_and_deterministic(optimizer: str) -> None:
    sx, sy = _data(9, 0)
    tx, ty = _data(60, 1)
    cfg = EvalConfig(optimizer=optimizer, epochs=6, num_models=2, batch_size=4, dsa=True)
    r1 = evaluate_synthetic(sx, sy, tx, ty, _factory, cfg, seed=3, device="cpu", progress=False)
    r2 = evaluate_synthetic(sx, sy, tx, ty, _factory, cfg, seed=3, device="cpu", progress=False)
    assert len(r1.accuracies) == 2 and all(0.0 <= a <= 1.0 for a in r1.accuracies)
    assert r1.accuracies == r2.accuracies and r1.seeds == r2.seeds
    assert r1.mean == pytest.approx(float(np.mean(r1.accuracies)))
    assert r1.std == pytest.approx(float(np.std(r1.accuracies)))  # population std
    assert len(set(r1.seeds)) == 2 and r1.seeds != derive_seeds(4, 2)


def test_training_learns_an_easy_task() -> None:
    sx, sy = _data(30, 0)
    tx, ty = _data(60, 1)
    cfg = EvalConfig(optimizer="sam", epochs=15, num_models=1, batch_size=10, dsa=False)
    res = evaluate_synthetic(sx, sy, tx, ty, _factory, cfg, seed=0, device="cpu", progress=False)
    assert res.accuracies[0] > 0.8


def test_test_accuracy_on_fixed_model() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 1, 1, 1])  # 3 of 4 correct
    acc, loss = test_accuracy(model, x, y, "cpu", batch_size=3)
    assert acc == pytest.approx(0.75)
    p_right = math.exp(1) / (math.e + 1)
    assert loss == pytest.approx((3 * -math.log(p_right) - math.log(1 - p_right)) / 4, rel=1e-6)


def test_lr_decays_at_half() -> None:
    sx, sy = _data(6, 0)
    seen: list[float] = []
    model = _factory(0)
    cfg = EvalConfig(optimizer="sgd", epochs=4, num_models=1, batch_size=6, dsa=False, lr=0.05)
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):  # record the lr used at every step
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.SGD.step = spy  # type: ignore[method-assign]
    try:
        train_model(model, sx, sy, cfg, seed=0, device="cpu")
    finally:
        torch.optim.SGD.step = orig  # type: ignore[method-assign]
    assert seen == pytest.approx([0.05, 0.05, 0.005, 0.005])


def test_bad_config_and_inputs_raise() -> None:
    sx, sy = _data(6, 0)
    with pytest.raises(ValueError, match="EvalConfig.optimizer"):
        evaluate_synthetic(sx, sy, sx, sy, _factory, EvalConfig(optimizer="adam"), 0, "cpu", progress=False)
    with pytest.raises(ValueError, match="EvalConfig.epochs"):
        evaluate_synthetic(sx, sy, sx, sy, _factory, EvalConfig(epochs=0), 0, "cpu", progress=False)
    with pytest.raises(ValueError, match="syn_y must be int64"):
        evaluate_synthetic(sx, sy[:3], sx, sy, _factory, EvalConfig(epochs=1), 0, "cpu", progress=False)
    assert EvalConfig().resolved_lr == 0.1 and EvalConfig(optimizer="sgd").resolved_lr == 0.01
