"""Tests for common/distill/synthesize.py (methods, defaults, loop, errors, checkpoints)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.distill import (
    DistillationError,
    DistillConfig,
    default_alpha,
    default_gamma,
    default_init,
    make_embed_factory,
    synthesize,
)
from common.methods import METHODS
from common.models import build_model




C, SHAPE = 3, (1, 8, 8)
META = SimpleNamespace(channels=1, height=8, width=8, num_classes=C)
ARCH = {"width": 8, "depth": 2}


def _safe(per_class: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(per_class)  # interleaved classes
    return torch.randn(len(y), *SHAPE, generator=g), y


def _run(method: str, ipc: int = 2, pipc: int = 5, cfg: DistillConfig | None = None, **kw):
    sx, sy = _safe()
    args = dict(ipc=ipc, num_classes=C, image_shape=SHAPE, pipc=pipc, safe_x=sx, safe_y=sy,
                model=build_model(META, ARCH, seed=1), embed_factory=make_embed_factory(META, ARCH),
                init_model=build_model(META, ARCH, seed=2),
                config=cfg or DistillConfig(iterations=3, real_batch=4, log_every=1), seed=0,
                device=torch.device("cpu"), progress=False)
    args.update(kw)
    return synthesize(method, **args)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "safe_all"])
def test_every_method_runs_and_returns_class_major_set(method: str) -> None:
    out = _run(method)
    assert out.method == method and out.ipc == 2
    assert out.x.shape == (C * 2, *SHAPE) and out.x.dtype == torch.float32 and out.x.device.type == "cpu"
    assert out.y.tolist() == [0, 0, 1, 1, 2, 2] and out.y.dtype == torch.int64
    assert bool(torch.isfinite(out.x).all())
    if method in ("dm", "dsv", "dsv_real", "dkkt_dm"):
        assert out.info["iterations_done"] == 3 and len(out.info["loss_history"]) == 3


def test_safe_all_uses_first_pipc_per_class_with_safe_draw_first() -> None:
    sx, sy = _safe(per_class=5)
    out = _run("safe_all", pipc=3, cfg=DistillConfig(iterations=3, real_batch=4, log_every=1, safe_draw="first"))
    assert out.x.shape == (3 * C, *SHAPE) and out.y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    first3_class1 = sx[sy == 1][:3]
    assert torch.equal(out.x[3:6], first3_class1)
    assert out.info["class_counts"] == [3, 3, 3]


def _drawn(seed: int, pipc: int) -> list[set[int]]:
    """Per class, which of the 5 safe images (their index within the class) a cell drew."""
    sx, sy = _safe(per_class=5)
    out = _run("safe_all", pipc=pipc, seed=seed)
    own = [sx[sy == c] for c in range(C)]
    return [{next(i for i, s in enumerate(own[c]) if torch.equal(img, s)) for img in out.x[out.y == c]}
            for c in range(C)]


def test_safe_draw_random_varies_with_the_seed_and_nests_across_pipc() -> None:
    draws = {seed: _drawn(seed, 3) for seed in range(6)}
    assert draws[0] == _drawn(0, 3)  # seeded: the same seed draws the same images
    assert len({tuple(frozenset(d) for d in draw) for draw in draws.values()}) > 1  # seeds draw different images
    for seed in range(3):  # a smaller pipc is a subset of a larger one for the same seed
        small, large = _drawn(seed, 2), _drawn(seed, 4)
        assert all(a < b for a, b in zip(small, large))


def test_random_real_picks_safe_images_of_the_right_class() -> None:
    sx, sy = _safe()
    out = _run("random_real", ipc=2)
    for img, lab in zip(out.x, out.y):
        assert any(torch.equal(img, s) for s in sx[sy == lab])


def test_same_seed_same_result_other_seed_differs() -> None:
    a, b, c = _run("dkkt_dm"), _run("dkkt_dm"), _run("dkkt_dm", seed=5)
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


def test_lambda_is_learned_under_both_optimizers() -> None:
    cfg = DistillConfig(iterations=8, lr_lambda=0.5, lambda_init=0.05, dsa=False, log_every=4)
    lam = torch.tensor(_run("dsv", cfg=cfg).info["lambda"])
    assert not torch.allclose(lam, torch.full_like(lam, 0.05))  # Adam moved log lambda
    sgd = DistillConfig(iterations=8, lr_lambda=50.0, lambda_init=0.05, lambda_optimizer="sgd", dsa=False)
    lam2 = torch.tensor(_run("dsv_real", cfg=sgd).info["lambda"])
    assert not torch.allclose(lam2, torch.full_like(lam2, 0.05))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 50.0), ("adam", 0.5)])
def test_clamp_projects_lambda_onto_the_nonnegative_orthant(optimizer: str, lr: float) -> None:
    """lambda_param 'clamp' optimises lambda itself; steps that cross zero end exactly at 0 (the projection),
    which no unprojected float step from 0.05 lands on, and the other multipliers stay free (> 0, moved)."""
    cfg = DistillConfig(iterations=8, lr_lambda=lr, lambda_init=0.05, lambda_optimizer=optimizer,
                        lambda_param="clamp", dsa=False)
    lam = torch.tensor(_run("dsv", cfg=cfg).info["lambda"])
    assert bool((lam >= 0).all())
    assert int((lam == 0).sum()) >= 1
    assert bool((lam > 0.05).any())


def test_blend_is_pixel_average_with_given_dsvs() -> None:
    a = torch.zeros(C * 2, *SHAPE)
    b = torch.ones(C * 2, *SHAPE)
    out_a, out_b = _run("blend", dsv_x=a, model=None), _run("blend", dsv_x=b, model=None)
    assert torch.allclose(out_b.x - out_a.x, torch.full_like(out_a.x, 0.5), atol=1e-6)
    # dsv_y puts shuffled DSVs back in class-major order (each DSV's value = its class)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = y.to(torch.float32).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    out_perm = _run("blend", dsv_x=x[perm], dsv_y=y[perm], model=None)
    out_ref = _run("blend", dsv_x=x, model=None)
    assert torch.allclose(out_perm.x, out_ref.x)


def test_defaults_follow_appendix_a() -> None:
    assert [default_alpha(p) for p in (0, 10, 11, 50, 51, 5000)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [default_gamma(i) for i in (1, 3, 10, 50)] == [0.001, 0.001, 0.001, 0.01]
    assert [default_init(i) for i in (1, 2, 3, 50)] == ["noise", "real", "real", "real"]
    out = _run("dkkt_dm", ipc=1, pipc=5)
    assert out.info["alpha"] == 0.1 and out.info["gamma"] == 0.001 and out.info["init"].startswith("noise")
    out = _run("dkkt_dm", ipc=3, pipc=5, cfg=DistillConfig(iterations=1, alpha=0.5, gamma=2.0, real_batch=4))
    assert out.info["alpha"] == 0.5 and out.info["gamma"] == 2.0 and out.info["init"].startswith("real")


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown distillation method 'xyz'"):
        _run("xyz")
    with pytest.raises(ValueError, match="'dkkt_dm' needs the trained model"):
        _run("dkkt_dm", model=None)
    with pytest.raises(ValueError, match="'dsv' needs the trained model"):
        _run("dsv", model=None)
    with pytest.raises(ValueError, match="'dm' needs safe data"):
        _run("dm", safe_x=None)
    with pytest.raises(ValueError, match=r"ipc=4 .*class 0: 3"):
        _run("dm", ipc=4, pipc=3, cfg=DistillConfig(iterations=1, init="real"))
    with pytest.raises(ValueError, match=r"ipc=6"):
        _run("random_real", ipc=6)
    with pytest.raises(ValueError, match="'dsv' always starts from noise"):
        _run("dsv", cfg=DistillConfig(iterations=1, init="real"))
    with pytest.raises(ValueError, match="DistillConfig.lr_img"):
        _run("dm", cfg=DistillConfig(lr_img=0.0))
    with pytest.raises(ValueError, match=r"safe_x must be N×1×8×8"):
        _run("dm", safe_x=torch.zeros(15, 3, 8, 8))
    with pytest.raises(ValueError, match="blend' needs pre-extracted DSVs"):
        _run("blend", model=None)


def test_auto_init_falls_back_to_noise_with_warning() -> None:
    with pytest.warns(UserWarning, match="falls back to noise"):
        out = _run("dkkt_dm", ipc=4, pipc=3, cfg=DistillConfig(iterations=1, real_batch=4))
    assert out.info["init"].startswith("noise")


def test_time_budget_stops_early() -> None:
    out = _run("dm", cfg=DistillConfig(iterations=10_000, time_budget_s=0.3, real_batch=4))
    assert out.info["stopped_reason"] == "time_budget"
    assert out.info["iterations_done"] < 10_000


def test_periodic_checkpoints_are_written(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    _run("dkkt_dm", cfg=DistillConfig(iterations=5, checkpoint_every=2, real_batch=4), checkpoint_path=ck)
    state = torch.load(ck, weights_only=True)
    assert state["iteration"] == 5 and state["x"].shape == (C * 2, *SHAPE) and state["lambda"].shape == (C * 2,)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary files


def test_nan_raises_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}
    good = make_embed_factory(META, ARCH)

    def poisoned(gen: torch.Generator) -> nn.Module:
        calls["n"] += 1
        net = good(gen)
        if calls["n"] == 3:  # the third iteration's embedding network outputs NaN
            with torch.no_grad():
                net.features[0].weight.fill_(float("nan"))
        return net

    ck = tmp_path / "ck.pt"
    with pytest.raises(DistillationError) as err:
        _run("dkkt_dm", embed_factory=poisoned, checkpoint_path=ck,
             cfg=DistillConfig(iterations=6, checkpoint_every=1, real_batch=4))
    assert err.value.iteration == 3 and "dm" in err.value.terms
    assert "iteration 3" in str(err.value) and "dm" in str(err.value)
    state = torch.load(ck, weights_only=True)
    assert state["iteration"] == 2 and bool(torch.isfinite(state["x"]).all())
    assert "non-finite" in state["error"]


def test_one_image_optimizer_for_every_method_by_default_auto_splits() -> None:
    plain = DistillConfig(iterations=2, real_batch=4, log_every=1)
    assert {_run(m, cfg=plain).info["img_optimizer"] for m in ("dm", "dkkt_dm", "dsv")} == {"adam"}
    cfg = DistillConfig(iterations=2, real_batch=4, log_every=1, img_optimizer="auto")
    assert _run("dm", cfg=cfg).info["img_optimizer"] == "sgd"
    assert _run("dkkt_dm", cfg=cfg).info["img_optimizer"] == "adam"
    forced = DistillConfig(iterations=2, real_batch=4, log_every=1, img_optimizer="sgd")
    assert _run("dkkt_dm", cfg=forced).info["img_optimizer"] == "sgd"
    with pytest.raises(ValueError, match="DistillConfig.img_optimizer"):
        _run("dm", cfg=DistillConfig(img_optimizer="rmsprop"))


def test_dm_real_init_with_ipc_equal_pipc_has_zero_loss_and_does_not_move() -> None:
    # The DM reference property: with ipc = pipc, real initialisation and the siamese DSA
    # (one transform per class for the real and the synthetic images) the class means
    # coincide, so the loss is 0 at EVERY iteration and S stays the safe images.
    sx, sy = _safe(per_class=4)
    cfg = DistillConfig(iterations=6, real_batch=8, log_every=1, init="real", img_optimizer="sgd")
    out = synthesize("dm", ipc=4, num_classes=C, image_shape=SHAPE, pipc=4, safe_x=sx, safe_y=sy,
                     model=None, embed_factory=make_embed_factory(META, ARCH), config=cfg, seed=3,
                     device=torch.device("cpu"), progress=False)
    dm = [row["dm"] for row in out.info["loss_history"]]
    assert len(dm) == 6 and max(dm) < 1e-9
    for c in range(C):  # every synthetic image is still exactly one of its class's safe images
        d = torch.cdist(out.x[out.y == c].flatten(1), sx[sy == c].flatten(1))
        assert float(d.min(1).values.max()) < 1e-4


def test_trace_records_terms_lambda_and_gradient_shares() -> None:
    cfg = DistillConfig(iterations=4, real_batch=4, log_every=2, img_optimizer="adam")
    out = _run("dkkt_dm", cfg=cfg)
    hist = out.info["loss_history"]
    assert [r["iteration"] for r in hist] == [2, 4]
    for r in hist:
        shares = [r["gradshare_primal"], r["gradshare_stat"], r["gradshare_dm"]]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= v <= 1 for v in shares)
        assert r["stat_zero"] == pytest.approx(1.0)  # cosine: D(target, 0) = 1
        assert r["stat_ratio"] == pytest.approx(r["stat"] / r["stat_zero"])
        assert 0 < r["lambda_min"] <= r["lambda_mean"] <= r["lambda_max"] and r["lambda_zero"] == 0


def test_logged_gradient_equals_the_plain_backward() -> None:
    # Logging splits the backward pass into one per term; the step must be the same as without it.
    cfg = DistillConfig(iterations=3, real_batch=4, img_optimizer="adam")
    logged = _run("dkkt_dm", cfg=dataclasses.replace(cfg, log_every=1)).x
    plain = _run("dkkt_dm", cfg=dataclasses.replace(cfg, log_every=1000)).x
    assert torch.allclose(logged, plain, atol=1e-5)


def test_stationarity_term_moves_the_images_and_pulls_toward_the_target() -> None:
    # theta* = theta_0 + one gradient step on a few images: the target theta* - theta_0 is then a
    # non-negative combination of loss gradients, so the stationarity ratio must fall clearly;
    # with alpha = 0 the images follow the primal alone and end elsewhere.
    init = build_model(META, ARCH, seed=2)
    model = build_model(META, ARCH, seed=2)
    g = torch.Generator().manual_seed(9)
    xr, yr = torch.randn(12, *SHAPE, generator=g), torch.arange(C).repeat(4)
    torch.nn.functional.cross_entropy(model(xr), yr, reduction="sum").backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    cfg = DistillConfig(iterations=150, log_every=30, img_optimizer="adam", alpha=1.0, dsa=False)
    args = dict(ipc=4, num_classes=C, image_shape=SHAPE, pipc=0, safe_x=None, safe_y=None, model=model,
                embed_factory=None, seed=0, device=torch.device("cpu"), progress=False, init_model=init)
    with_stat = synthesize("dsv", config=cfg, **args)
    hist = with_stat.info["loss_history"]
    # measured 1.13 -> 0.80 (cosine distance: 1 = orthogonal, > 1 = pointing away)
    assert hist[-1]["stat_ratio"] < 0.85 and hist[-1]["stat_ratio"] < hist[0]["stat_ratio"] - 0.2
    without = synthesize("dsv", config=dataclasses.replace(cfg, alpha=0.0), **args)
    assert float((with_stat.x - without.x).abs().max()) > 1e-2
