"""Tests for common/distill/dm.py (DM loss, Eq. 2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.augment import DSAParams, apply_dsa, sample_dsa_params
from common.models import build_model
from common.distill.dm import class_indices, dm_loss, sample_real_batches




META = SimpleNamespace(channels=1, height=16, width=16, num_classes=3)


def _net(seed: int = 0) -> nn.Module:
    net = build_model(META, {"width": 8, "depth": 2}, seed=seed)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _batches(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for n in sizes]


def test_zero_for_identical_sets_with_shared_dsa() -> None:
    net = _net()
    real = _batches(1, [4, 4, 4])
    syn = [r.clone().requires_grad_(True) for r in real]
    g = torch.Generator().manual_seed(7)
    params = [sample_dsa_params(g) for _ in real]
    loss = dm_loss(net.embed, real, syn, params)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_positive_for_different_sets_and_grad_reaches_syn_only() -> None:
    net = _net()
    real = _batches(1, [6, 5, 4])
    syn = [s.requires_grad_(True) for s in _batches(2, [2, 2, 2])]
    g = torch.Generator().manual_seed(3)
    loss = dm_loss(net.embed, real, syn, [sample_dsa_params(g) for _ in real])
    assert loss.item() > 1e-6
    loss.backward()
    assert all(s.grad is not None and float(s.grad.abs().sum()) > 0 for s in syn)
    assert all(r.grad is None for r in real)


def test_matches_hand_computation_on_linear_embed() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=True).double()
    embed = lambda x: lin(x.flatten(1))  # noqa: E731
    real = [torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)]
    syn = [torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64)]
    W, b = lin.weight.detach(), lin.bias.detach()
    expected = 0.0
    for r, s in zip(real, syn):
        mr = sum(W @ r[i].flatten() + b for i in range(r.shape[0])) / r.shape[0]
        ms = sum(W @ s[i].flatten() + b for i in range(s.shape[0])) / s.shape[0]
        expected += float(((mr - ms) ** 2).sum())
    assert dm_loss(embed, real, syn).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_siamese_every_op_real_batch_larger_than_syn(op: str) -> None:
    # Real batch = [the synthetic images, then more]; DSA is siamese on the LEADING samples,
    # so matching against the leading part only must give exactly 0 for every op.
    net = _net()
    syn = _batches(4, [2])
    real_big = torch.cat([syn[0], _batches(5, [3])[0]])
    params = DSAParams(op, 123)
    emb_big = net.embed(apply_dsa(real_big, params))[:2]
    emb_syn = net.embed(apply_dsa(syn[0], params))
    assert torch.allclose(emb_big, emb_syn, atol=1e-6)
    assert float(dm_loss(net.embed, [syn[0].clone()], syn, [params])) == pytest.approx(0.0, abs=1e-10)


def test_bad_inputs_raise() -> None:
    net = _net()
    with pytest.raises(ValueError, match="2 real class batches but 1"):
        dm_loss(net.embed, _batches(0, [2, 2]), _batches(0, [2]))
    with pytest.raises(ValueError, match="slot 0"):
        dm_loss(net.embed, [torch.zeros(0, 1, 16, 16)], _batches(0, [2]))


def test_sample_real_batches_caps_and_is_seeded() -> None:
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    idx = class_indices(y, 3)
    a = sample_real_batches(x, idx, 4, torch.Generator().manual_seed(0))
    b = sample_real_batches(x, idx, 4, torch.Generator().manual_seed(0))
    assert [t.shape[0] for t in a] == [4, 2, 2]  # up to 4; all of a smaller class
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert set(a[0].flatten().tolist()) <= {0, 1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="class 1 has no real"):
        sample_real_batches(x, [idx[0], torch.zeros(0, dtype=torch.int64)], 4, torch.Generator())


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_siamese_params_give_one_transform_for_the_whole_batch(op: str) -> None:
    # The reference's seeded DiffAugment: every image gets sample 0's values, so a batch of
    # copies of one image stays a batch of identical images; per-sample draws do not.
    x = _batches(8, [1])[0].repeat(16, 1, 1, 1)
    shared = apply_dsa(x, DSAParams(op, 99, siamese=True))
    assert torch.equal(shared, shared[:1].expand_as(shared))
    if op != "flip":  # a flip coin can land the same for 16 samples only with prob 2^-15
        own = apply_dsa(x, DSAParams(op, 99, siamese=False))
        assert not torch.equal(own, own[:1].expand_as(own))


def test_siamese_mean_matching_is_exact_for_any_subset_order() -> None:
    # One transform per class: the synthetic set = the real batch in another order gives
    # loss 0 (up to float summation order), which per-sample values would not.
    net = _net()
    real = _batches(3, [6, 6, 6])
    syn = [r[torch.randperm(6, generator=torch.Generator().manual_seed(c))] for c, r in enumerate(real)]
    g = torch.Generator().manual_seed(5)
    shared = [sample_dsa_params(g, siamese=True) for _ in real]
    assert float(dm_loss(net.embed, real, syn, shared)) < 1e-9
    own = [DSAParams(p.op if p.op != "flip" else "rotate", p.seed, siamese=False) for p in shared]
    assert float(dm_loss(net.embed, real, syn, own)) > 1e-4
