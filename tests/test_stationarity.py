"""The stationarity condition where real data can satisfy it, its diagnostic and the NNLS solver.

Toy: a logistic-regression model theta_0 takes ONE gradient-descent step on real data X, so
theta* - theta_0 = -lr sum_i grad L_i(theta_0) exactly: with the gradients at theta_0 (stat_at theta0)
the real data with uniform lambda satisfy the condition (cos = 1); at theta* they do not.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError, DistillConfig
from common.distill import make_embed_factory, synthesize
from common.distill.dkkt import kkt_terms, lambda_scale, stationarity_points, stationarity_target
from common.distill.stationarity import diagnose, gram_cosine, markdown_table, nnls_gram, path_ts, per_sample_gradients
from common.models import build_model

C, SHAPE = 3, (1, 4, 4)


def _logistic(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, C))


def _one_gd_step(lr: float = 0.5) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(theta*, theta_0, X, y): theta* = theta_0 - lr * sum_i grad CE_i(theta_0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, *SHAPE, generator=g)
    y = torch.arange(C).repeat(4)
    init = _logistic(1)
    loss = F.cross_entropy(init(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, list(init.parameters()))
    model = copy.deepcopy(init)
    with torch.no_grad():
        for p, gr in zip(model.parameters(), grads):
            p -= lr * gr
    return model.eval(), init.eval(), x, y


def test_theta0_condition_is_met_by_the_real_data_and_the_theta_star_one_is_not() -> None:
    model, init, x, y = _one_gd_step()
    target = stationarity_target(model, init)
    ones = torch.ones(x.shape[0])
    _, at_theta0 = kkt_terms(model, x, y, ones, distance="cosine", target=target,
                             at=stationarity_points(model, init, "theta0"))
    _, at_star = kkt_terms(model, x, y, ones, distance="cosine", target=target)
    assert at_theta0 is not None and at_star is not None
    assert float(at_theta0.detach()) == pytest.approx(0.0, abs=1e-6)  # cos = 1
    assert float(at_star.detach()) > 1e-3  # the gradients at theta* point elsewhere
    # l2 at the LS scale: theta0's condition is met exactly with lambda = lr
    _, l2 = kkt_terms(model, x, y, 0.5 * ones, distance="l2", target=target,
                      at=stationarity_points(model, init, "theta0"))
    assert float(l2.detach()) == pytest.approx(0.0, abs=1e-10)
    assert lambda_scale(model, x, y, target, at=stationarity_points(model, init, "theta0")) == pytest.approx(0.5)


def test_theta0_and_path_variants_reach_x_and_lambda() -> None:
    model, init, x, y = _one_gd_step()
    target = stationarity_target(model, init)
    for at in ("theta0", "path"):
        xs = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
        lam = torch.rand(x.shape[0]).add(0.1).requires_grad_(True)
        primal, stat = kkt_terms(model, xs, y, lam, distance="cosine", target=target,
                                 at=stationarity_points(model, init, at, 3))
        assert stat is not None
        gx, gl = torch.autograd.grad(stat, [xs, lam])
        assert float(gx.abs().sum()) > 0 and float(gl.abs().sum()) > 0, at
        # the primal stays at theta*
        assert float(primal.detach()) == pytest.approx(float(F.cross_entropy(model(xs), y).detach()), rel=1e-6)
        with pytest.raises(ValueError, match="lam must be >= 0"):
            kkt_terms(model, xs, y, -lam.detach(), distance="cosine", target=target,
                      at=stationarity_points(model, init, at, 3))


def test_path_points_run_from_theta0_to_theta_star() -> None:
    model, init, _, _ = _one_gd_step()
    pts = stationarity_points(model, init, "path", 3)
    assert pts is not None and len(pts) == 3
    for k, p in model.named_parameters():
        p0 = dict(init.named_parameters())[k]
        assert torch.allclose(pts[0][k], p0, atol=1e-6) and torch.allclose(pts[2][k], p, atol=1e-6)
        assert torch.allclose(pts[1][k], (p + p0) / 2, atol=1e-6)
    assert stationarity_points(model, init, "theta_star") is None
    with pytest.raises(ValueError, match="needs the initial network"):
        stationarity_points(model, None, "theta0")
    with pytest.raises(ValueError, match="at least 2"):
        stationarity_points(model, init, "path", 1)


def test_path_mean_gradient_equals_the_mean_of_the_points() -> None:
    model, init, x, y = _one_gd_step()
    target = stationarity_target(model, init)
    lam = torch.rand(x.shape[0]) + 0.1
    pts = stationarity_points(model, init, "path", 3)
    _, both = kkt_terms(model, x, y, lam, distance="l2", target={k: torch.zeros_like(v) for k, v in target.items()},
                        at=pts)
    # D_l2(0, v) = mean(v^2): compare with v built by hand as the mean of the per-point gradients
    vs = []
    for pt in pts:  # type: ignore[union-attr]
        live = {k: t.clone().requires_grad_(True) for k, t in pt.items()}
        ce = F.cross_entropy(torch.func.functional_call(model, live, (x,)), y, reduction="none")
        vs.append(torch.autograd.grad((lam * ce).sum(), list(live.values())))
    mean = [sum(v[i] for v in vs) / 3 for i in range(len(vs[0]))]
    numel = sum(m.numel() for m in mean)
    assert float(both.detach()) == pytest.approx(float(sum((m ** 2).sum() for m in mean) / numel), rel=1e-5)


# ---------------------------------------------------------------- NNLS


def test_nnls_hand_solved_cases() -> None:
    # G = I: lambda = max(h, 0)
    assert nnls_gram(torch.eye(3), torch.tensor([1.0, -2.0, 3.0])).tolist() == [1.0, 0.0, 3.0]
    # columns a1 = (1, 0), a2 = (1, 1), b = (0, 1): unconstrained (-1, 1); with lambda >= 0: (0, 1/2)
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([0.0, 1.0])
    lam = nnls_gram(a.T @ a, a.T @ b)
    assert lam.tolist() == pytest.approx([0.0, 0.5])
    assert gram_cosine(a.T @ a, a.T @ b, 1.0, lam) == pytest.approx(1 / math.sqrt(2))
    # b inside the cone: exact reconstruction, cos 1
    b = torch.tensor([3.0, 1.0])  # = 2 a1 + 1 a2
    lam = nnls_gram(a.T @ a, a.T @ b)
    assert lam.tolist() == pytest.approx([2.0, 1.0])
    assert gram_cosine(a.T @ a, a.T @ b, float(b.norm()), lam) == pytest.approx(1.0)


def test_nnls_meets_the_kkt_conditions_on_random_problems() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randn(20, 15, generator=g, dtype=torch.float64)
        b = torch.randn(20, generator=g, dtype=torch.float64)
        G, h = a.T @ a, a.T @ b
        lam = nnls_gram(G, h)
        w = h - G @ lam  # minus the objective's gradient
        assert bool((lam >= 0).all())
        assert float(w[lam > 0].abs().max()) < 1e-8  # stationary on the support
        assert bool((lam == 0).any()) and bool((lam > 0).any())  # a mixed active set
        assert float(w[lam == 0].max()) < 1e-8  # no free coordinate can improve


def test_nnls_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2x2"):
        nnls_gram(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="not finite"):
        nnls_gram(torch.tensor([[float("nan")]]), torch.ones(1))


# ---------------------------------------------------------------- the diagnostic


def test_diagnostic_on_the_toy_finds_the_theta0_condition_and_nnls_beats_uniform() -> None:
    model, init, x, y = _one_gd_step()
    target = stationarity_target(model, init)
    lam = torch.rand(x.shape[0]) + 0.1
    rows = diagnose(model, init, target, {"real": (x, y, None), "synthetic": (x[:6], y[:6], lam[:6])}, points=3,
                    nnls_samples=12)
    by = {(r["set"], r["weights"], r["at"]): r["cos"] for r in rows}
    assert by[("real", "uniform", "0.00")] == pytest.approx(1.0, abs=1e-5)
    assert by[("real", "nnls", "0.00")] == pytest.approx(1.0, abs=1e-5)
    assert by[("real", "uniform", "1.00")] < 0.999
    for (s, w, at), cos in by.items():
        assert -1.0 - 1e-6 <= cos <= 1.0 + 1e-6
        if w == "uniform":  # uniform lambda is feasible for NNLS, so NNLS is at least as good
            assert by[(s, "nnls", at)] >= cos - 1e-6
    assert {r["at"] for r in rows} == {"0.00", "0.50", "1.00", "path_mean"}
    assert ("synthetic", "lambda", "path_mean") in by
    table = markdown_table(rows + [{"set": "junk"}])  # a malformed row read back is skipped
    assert table[0].startswith("| images | lambda | n | t = 0.00") and len(table) == 2 + 5
    # without theta_0 only theta* is a gradient point
    only = diagnose(model, None, target, {"real": (x, y, None)}, points=5, nnls_samples=0)
    assert [r["at"] for r in only] == ["1.00"]
    assert path_ts(1) == [1.0] and path_ts(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_per_sample_gradients_sum_to_the_batch_gradient() -> None:
    model = build_model(SimpleNamespace(channels=1, height=8, width=8, num_classes=C), {"width": 4, "depth": 2},
                        seed=0).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    params = dict(model.named_parameters())
    per = per_sample_gradients(model, params, x, y, chunk=2)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
    assert per.shape == (5, full.numel())
    assert torch.allclose(per.sum(0), full, atol=1e-5)


# ---------------------------------------------------------------- the scenario options


META = SimpleNamespace(channels=1, height=8, width=8, num_classes=C)
ARCH = {"width": 4, "depth": 2}


def _cell(cfg: DistillConfig, method: str = "dkkt_dm"):
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(C).repeat(4)
    sx = torch.randn(len(sy), 1, 8, 8, generator=g)
    return synthesize(method, ipc=2, num_classes=C, image_shape=(1, 8, 8), pipc=4, safe_x=sx, safe_y=sy,
                      model=build_model(META, ARCH, seed=1), embed_factory=make_embed_factory(META, ARCH),
                      init_model=build_model(META, ARCH, seed=2), config=cfg, seed=0, device="cpu", progress=False)


def test_stat_at_options_run_and_the_cell_carries_its_diagnostic() -> None:
    base = DistillConfig(iterations=2, real_batch=4, log_every=1, diagnose_path_points=3)
    outs = {at: _cell(dataclasses.replace(base, stat_at=at)) for at in ("theta_star", "theta0", "path")}
    assert not torch.equal(outs["theta_star"].x, outs["theta0"].x)  # the inner gradients moved
    for out in outs.values():
        rows = out.info["stationarity"]
        assert {r["set"] for r in rows} == {"safe", "synthetic"}
        assert {r["weights"] for r in rows if r["set"] == "synthetic"} == {"uniform", "lambda", "nnls"}
        assert {r["at"] for r in rows} == {"0.00", "0.50", "1.00", "path_mean"}
        assert min(out.info["lambda"]) >= 0
    off = _cell(dataclasses.replace(base, diagnose_samples=0))
    assert "stationarity" not in off.info


def test_paper_variant_is_eq3_literally_and_refuses_contradicting_keys() -> None:
    out = _cell(DistillConfig(iterations=2, real_batch=4, log_every=1, stat_variant="paper"))
    cfg = out.info["config"]
    assert (cfg["stat_target"], cfg["stat_distance"], cfg["stat_at"], cfg["aug_weight"]) == \
        ("theta", "l1", "theta_star", 0.0)
    assert all("primal_aug" not in row for row in out.info["loss_history"])  # no manifold pass
    with pytest.raises(ConfigError, match="stat_distance.*stat_variant 'paper'"):
        DistillConfig(stat_variant="paper", stat_distance="l2").validate()
    with pytest.raises(ConfigError, match="aug_weight.*stat_variant 'paper'"):
        DistillConfig(stat_variant="paper", aug_weight=2.0).validate()
    DistillConfig(stat_variant="paper", stat_distance="l1").validate()  # the same value is fine
    with pytest.raises(ConfigError, match="stat_at.*needs stat_target 'update'"):
        DistillConfig(stat_at="theta0", stat_target="theta").validate()


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, 10.0])
def test_alpha_dose_response_values_are_taken_as_given(alpha: float) -> None:
    out = _cell(DistillConfig(iterations=1, real_batch=4, log_every=1, alpha=alpha, diagnose_samples=0))
    assert out.info["alpha"] == alpha
    row = out.info["loss_history"][-1]
    assert row["gradnorm_stat"] == pytest.approx(0.0) if alpha == 0 else row["gradnorm_stat"] > 0


def test_ablation_knobs_gamma_zero_and_no_manifold_pass() -> None:
    out = _cell(DistillConfig(iterations=1, real_batch=4, log_every=1, alpha=0.0, gamma=0.0, aug_weight=0.0,
                              diagnose_samples=0))
    row = out.info["loss_history"][-1]
    assert out.info["gamma"] == 0.0 and "primal_aug" not in row
    assert row["gradnorm_dm"] == pytest.approx(0.0) and row["gradnorm_stat"] == pytest.approx(0.0)
    assert row["gradnorm_primal"] > 0  # primal only
