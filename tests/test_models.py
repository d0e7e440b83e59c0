"""Tests for common/models.py (ConvNet, build_model, count_parameters)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.models import ACTIVATIONS, NORMS, POOLINGS, ConvNet, build_model, count_parameters


def _meta(channels: int, size: int, num_classes: int = 10) -> SimpleNamespace:
    return SimpleNamespace(channels=channels, height=size, width=size, num_classes=num_classes)


CIFAR = _meta(3, 32)
FMNIST = _meta(1, 28)


def test_parameter_counts_match_reference() -> None:
    assert count_parameters(ConvNet(3, 10, (32, 32))) == 320_010
    assert count_parameters(ConvNet(1, 10, (28, 28))) == 317_706
    assert count_parameters(build_model(CIFAR)) == 320_010
    assert count_parameters(build_model(FMNIST)) == 317_706


def test_count_parameters_trainable_only() -> None:
    m = ConvNet(3, 10, (32, 32))
    m.classifier.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 320_010 - (2048 * 10 + 10)
    assert count_parameters(m) == 320_010


@pytest.mark.parametrize("meta", [CIFAR, FMNIST], ids=["cifar", "fmnist"])
def test_embed_and_forward_shapes(meta: SimpleNamespace) -> None:
    m = build_model(meta, seed=0)
    x = torch.randn(5, meta.channels, meta.height, meta.width)
    emb = m.embed(x)
    assert emb.shape == (5, 2048) and m.feat_dim == 2048
    logits = m(x)
    assert logits.shape == (5, 10)
    # forward == classifier(embed)
    torch.testing.assert_close(logits, m.classifier(emb))
    assert torch.isfinite(logits).all()


def test_fmnist_first_conv_padding() -> None:
    m = ConvNet(1, 10, (28, 28))
    assert m.features[0].padding == (3, 3)
    assert m.features[4].padding == (1, 1)
    # 3-channel and non-28 grayscale inputs keep padding 1
    assert ConvNet(3, 10, (28, 28)).features[0].padding == (1, 1)
    assert ConvNet(1, 10, (32, 32)).features[0].padding == (1, 1)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_norm_activation_variants(norm: str, activation: str) -> None:
    m = ConvNet(3, 4, (16, 16), width=8, depth=2, norm=norm, activation=activation)
    out = m(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_variants(pooling: str) -> None:
    m = ConvNet(3, 10, (32, 32), width=8, depth=3, pooling=pooling)
    side = 32 if pooling == "none" else 4
    assert m.embed(torch.randn(2, 3, 32, 32)).shape == (2, 8 * side * side)


def test_instancenorm_is_groupnorm_per_channel() -> None:
    m = ConvNet(3, 10, (32, 32))
    gn = m.features[1]
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 128 and gn.affine
    ln = ConvNet(3, 10, (32, 32), norm="layernorm").features[1]
    assert isinstance(ln, torch.nn.GroupNorm) and ln.num_groups == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"norm": "groupnorm"}, "norm"),
        ({"activation": "tanh"}, "activation"),
        ({"pooling": "median"}, "pooling"),
        ({"width": 0}, "width"),
        ({"depth": -1}, "depth"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ConvNet(3, 10, (32, 32), **kwargs)


def test_too_deep_raises() -> None:
    with pytest.raises(ValueError, match="depth"):
        ConvNet(3, 10, (8, 8), depth=5)


def test_build_model_arch_and_unknown_key() -> None:
    m = build_model(CIFAR, {"width": 16, "depth": 2, "norm": "none", "activation": "sigmoid",
                            "pooling": "maxpooling"})
    assert m.embed(torch.randn(1, 3, 32, 32)).shape == (1, 16 * 8 * 8)
    assert m.norm == "none" and m.activation == "sigmoid" and m.pooling == "maxpooling"
    with pytest.raises(ValueError, match="wdith"):
        build_model(CIFAR, {"wdith": 16})


def test_build_model_seed_deterministic_and_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = build_model(CIFAR, seed=7)
    b = build_model(CIFAR, seed=7)
    c = build_model(CIFAR, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                          c.named_parameters()):
        assert torch.equal(pa, pb), na
        if pa.dim() > 1:  # weights are random; GroupNorm / bias init may be constant
            assert not torch.equal(pa, pc), na
    # unseeded construction draws from (and advances) the global RNG as usual
    build_model(CIFAR)
    assert not torch.equal(torch.get_rng_state(), state)


def test_functional_call_and_grad_wrt_input() -> None:
    m = build_model(CIFAR, {"width": 16}, seed=0)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(4, 3, 32, 32)

    def loss(p: dict, inp: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, p, (inp,)).square().mean()

    gx = torch.func.grad(loss, argnums=1)(params, x)
    assert gx.shape == x.shape and torch.isfinite(gx).all() and gx.abs().sum() > 0
    # vmap over an ensemble of parameter sets (DM-style fresh networks)
    stacked = {k: torch.stack([v, v * 0.5]) for k, v in params.items()}
    out = torch.func.vmap(lambda p: torch.func.functional_call(m, p, (x,)))(stacked)
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(out[0], m(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu() -> None:
    m = build_model(CIFAR, seed=3)
    x = torch.randn(8, 3, 32, 32)
    ref = m(x)
    out = m.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
