"""Every speed-up gives the plain path's results (tiny inputs, float tolerance).

- parallel evaluation (``train_models_parallel`` / ``EvalConfig.parallel_models``) vs one
  ``train_model`` after the other: same weights, same accuracies, same seeds;
- DM over classes packed into fewer forwards (``dm_loss(max_batch=...)``) vs per class;
- the distillation backward restricted to S and lambda (``backward(inputs=...)``) vs a
  plain ``backward()``;
- the CPU allocator setting (``common.perf``) vs glibc's default: bit-identical results.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.augment import DSAParams, sample_dsa_params
from common.models import build_model
from common.perf import cpu_allocator_tuned, reset_cpu_allocator, tune_cpu_allocator
from common.distill.dkkt import dkkt_loss
from common.distill.dm import dm_loss, pack_classes
from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize
from common.evaluate import EvalConfig, derive_seeds, evaluate_synthetic, train_model
from common.evaluate_parallel import can_train_in_parallel, train_models_parallel

META = SimpleNamespace(channels=1, height=8, width=8, num_classes=3)
ARCH = {"width": 8, "depth": 2}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, q = (0, 0) if c == 0 else (0, 4) if c == 1 else (4, 2)
        x[i, 0, r:r + 4, q:q + 4] += 2.0
    return x, y


def _factory(seed: int) -> nn.Module:
    return build_model(META, ARCH, seed=seed)


# ------------------------------------------------------------------ parallel evaluation


@pytest.mark.parametrize("optimizer", ["sam", "sgd"])
def test_parallel_training_equals_sequential(optimizer: str) -> None:
    x, y = _data(10, 0)  # batch 4 -> 3 steps per epoch, the last one ragged
    cfg = EvalConfig(optimizer=optimizer, epochs=4, batch_size=4, dsa=True, num_models=3)
    seeds = derive_seeds(5, 3)
    seq = [train_model(_factory(s), x, y, cfg, s, "cpu") for s in seeds]
    seen: list[tuple[int, list[float]]] = []
    par = train_models_parallel([_factory(s) for s in seeds], x, y, cfg, seeds, "cpu",
                                on_epoch=lambda e, losses: seen.append((e, losses)))
    assert [e for e, _ in seen] == [1, 2, 3, 4] and all(len(v) == 3 for _, v in seen)
    for a, b in zip(seq, par):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"parameter {na}")
    # and the models differ from each other (per-model seeds, batch orders, DSA draws)
    assert not torch.allclose(par[0].classifier.weight, par[1].classifier.weight)


def test_evaluate_parallel_models_same_accuracies() -> None:
    sx, sy = _data(9, 0)
    tx, ty = _data(60, 1)
    base = dict(optimizer="sam", epochs=5, num_models=3, batch_size=4, dsa=True)
    r_seq = evaluate_synthetic(sx, sy, tx, ty, _factory, EvalConfig(**base, parallel_models=False), seed=3,
                               device="cpu", progress=False)
    r_par = evaluate_synthetic(sx, sy, tx, ty, _factory, EvalConfig(**base, parallel_models=True), seed=3,
                               device="cpu", progress=False)
    assert r_par.seeds == r_seq.seeds
    assert r_par.accuracies == r_seq.accuracies
    assert r_par.test_losses == pytest.approx(r_seq.test_losses, rel=1e-4, abs=1e-6)


def test_parallel_falls_back_for_batchnorm() -> None:
    def bn_factory(seed: int) -> nn.Module:
        return build_model(META, {**ARCH, "norm": "batchnorm"}, seed=seed)

    assert not can_train_in_parallel([bn_factory(0), bn_factory(1)])
    assert can_train_in_parallel([_factory(0), _factory(1)])
    assert not can_train_in_parallel([_factory(0), build_model(META, {"width": 4, "depth": 2}, seed=1)])
    sx, sy = _data(6, 0)
    base = dict(optimizer="sgd", epochs=2, num_models=2, batch_size=6, dsa=False)
    r_par = evaluate_synthetic(sx, sy, sx, sy, bn_factory, EvalConfig(**base, parallel_models=True), 0, "cpu",
                               progress=False)
    r_seq = evaluate_synthetic(sx, sy, sx, sy, bn_factory, EvalConfig(**base), 0, "cpu", progress=False)
    assert r_par.accuracies == r_seq.accuracies
    with pytest.raises(ValueError, match="parallel_models"):
        EvalConfig(parallel_models="yes").validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------ DM packing


def test_pack_classes() -> None:
    assert pack_classes([3, 3, 3], None) == [range(0, 3)]
    assert pack_classes([3, 3, 3], 0) == [range(0, 3)]
    assert pack_classes([3, 3, 3], 1) == [range(0, 1), range(1, 2), range(2, 3)]
    assert pack_classes([3, 3, 3], 6) == [range(0, 2), range(2, 3)]
    assert pack_classes([2, 9, 1, 1], 4) == [range(0, 1), range(1, 2), range(2, 4)]


@pytest.mark.parametrize("max_batch", [1, 5, 12])
def test_dm_loss_packing_matches_single_forward(max_batch: int) -> None:
    net = build_model(META, ARCH, seed=0).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(k, 1, 8, 8, generator=g) for k in (4, 6, 5)]
    syn_x = torch.randn(6, 1, 8, 8, generator=g, requires_grad=True)
    params = [sample_dsa_params(g) for _ in range(3)]

    def loss_and_grad(mb: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        syn_x.grad = None
        loss = dm_loss(net.embed, real, list(syn_x.split(2)), params, max_batch=mb)
        loss.backward()
        return loss.detach(), syn_x.grad.clone()

    l0, g0 = loss_and_grad(None)
    l1, g1 = loss_and_grad(max_batch)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch"):
        dm_loss(net.embed, real, list(syn_x.split(2)), params, max_batch=-1)


# ------------------------------------------------------------------ DKKT backward restricted to S, lambda


def test_dkkt_backward_inputs_equals_plain_backward() -> None:
    model = build_model(META, ARCH, seed=2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.arange(6) % 3
    lam0 = torch.rand(6, generator=g) + 0.5
    grads = []
    for restricted in (False, True):
        x = x0.clone().requires_grad_(True)
        lam = lam0.clone().requires_grad_(True)
        loss, _ = dkkt_loss(model, x, y, lam, alpha=0.1, dsa_params=DSAParams("rotate", 7))
        loss.backward(inputs=[x, lam]) if restricted else loss.backward()
        grads.append((x.grad.clone(), lam.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ CPU allocator setting


def _tiny_distill(method: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    safe_x = torch.randn(12, 1, 8, 8, generator=g)
    safe_y = torch.arange(12) % 3
    s = synthesize(method, ipc=2, num_classes=3, image_shape=(1, 8, 8), pipc=4, safe_x=safe_x, safe_y=safe_y,
                   model=build_model(META, ARCH, seed=1), embed_factory=make_embed_factory(META, ARCH),
                   config=DistillConfig(iterations=3, real_batch=4), seed=0, device="cpu", progress=False,
                   init_model=build_model(META, ARCH, seed=2))
    return s.x


def test_allocator_setting_changes_nothing_numerically(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.threads import setup_process

    was = cpu_allocator_tuned()
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("FEDPDD_MALLOC_TUNE", "0")
        reset_cpu_allocator()
        setup_process("server")
        assert not cpu_allocator_tuned()  # the opt-out is honoured by the entry points' runtime setup
        plain = _tiny_distill("dkkt_dm")
        assert not cpu_allocator_tuned()  # and the engine never tunes the process itself
        monkeypatch.delenv("FEDPDD_MALLOC_TUNE")
        setup_process("server")
        tuned = _tiny_distill("dkkt_dm")
        if tune_cpu_allocator():  # Linux/glibc: the setting was active for the second run
            assert cpu_allocator_tuned()
        assert torch.equal(plain, tuned)
    finally:
        torch.set_num_threads(threads)
        if was:
            tune_cpu_allocator(force=True)
