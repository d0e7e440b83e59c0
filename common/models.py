"""ConvNet used throughout fedpdd (federated model, DM embedder, evaluation model).

Mirrors the ConvNet of the DC/DM reference code: ``depth`` blocks of
[conv 3x3 -> norm -> activation -> pool 2x2] followed by a linear classifier on
the flattened features. ``embed`` returns those flattened features (what DM
matches). For 1-channel 28x28 inputs the first conv is padded by 3 so the maps
are 32x32 and the network has the same feature size as on CIFAR.

The forward pass is purely functional (no in-place ops on inputs, no Python
state mutated), so it works with ``torch.func.functional_call`` / ``vmap``
(except "batchnorm", which by nature updates running-stat buffers in training).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "ConvNet",
    "build_model",
    "count_parameters",
    "NORMS",
    "ACTIVATIONS",
    "POOLINGS",
    "ARCH_KEYS",
    "MetaLike",
]

NORMS: tuple[str, ...] = ("instancenorm", "batchnorm", "layernorm", "none")
ACTIVATIONS: tuple[str, ...] = ("relu", "leakyrelu", "sigmoid")
POOLINGS: tuple[str, ...] = ("avgpooling", "maxpooling", "none")
ARCH_KEYS: tuple[str, ...] = ("width", "depth", "norm", "activation", "pooling")


class MetaLike(Protocol):
    """What build_model needs from a dataset description (e.g. DatasetMeta)."""

    # read-only properties so frozen dataclasses (DatasetMeta) satisfy it
    @property
    def channels(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def num_classes(self) -> int: ...


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value.lower()


def _make_norm(norm: str, width: int) -> nn.Module:
    if norm == "instancenorm":
        # GroupNorm with one group per channel == instance norm with affine params
        # (this is what the reference uses; it also avoids running stats).
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(width, affine=True)
    if norm == "layernorm":
        return nn.GroupNorm(1, width, affine=True)
    return nn.Identity()


def _make_activation(activation: str) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    return nn.Sigmoid()


def _make_pool(pooling: str) -> nn.Module:
    if pooling == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pooling == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-`depth` of the DC/DM reference.

    Args:
        channels: input channels (3 for CIFAR, 1 for Fashion-MNIST).
        num_classes: output logits.
        im_size: input (height, width); an int means square.
        width: conv channels per block.
        depth: number of conv blocks.
        norm: "instancenorm" | "batchnorm" | "layernorm" | "none".
        activation: "relu" | "leakyrelu" | "sigmoid".
        pooling: "avgpooling" | "maxpooling" | "none".
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: tuple[int, int] | int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        activation: str = "relu",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        if isinstance(im_size, int):
            im_size = (im_size, im_size)
        h, w = (int(s) for s in im_size)
        for name, val in (("channels", channels), ("num_classes", num_classes),
                          ("width", width), ("depth", depth), ("im_size[0]", h), ("im_size[1]", w)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        norm = _check_choice("norm", norm, NORMS)
        activation = _check_choice("activation", activation, ACTIVATIONS)
        pooling = _check_choice("pooling", pooling, POOLINGS)

        self.channels = channels
        self.num_classes = num_classes
        self.im_size = (h, w)
        self.net_width = width
        self.depth = depth
        self.norm = norm
        self.activation = activation
        self.pooling = pooling

        layers: list[nn.Module] = []
        in_ch = channels
        fh, fw = h, w
        for d in range(depth):
            # Reference trick: pad 28x28 grayscale by 3 in the first conv -> 32x32 maps.
            pad = 3 if (d == 0 and channels == 1 and (h, w) == (28, 28)) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            fh, fw = fh + 2 * pad - 2, fw + 2 * pad - 2
            layers.append(_make_norm(norm, width))
            layers.append(_make_activation(activation))
            if pooling != "none":
                layers.append(_make_pool(pooling))
                fh, fw = fh // 2, fw // 2
            if fh < 1 or fw < 1:
                raise ValueError(
                    f"depth={depth} with pooling={pooling!r} shrinks im_size={self.im_size} to nothing"
                )
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.feat_shape = (width, fh, fw)
        self.feat_dim = width * fh * fw
        self.classifier = nn.Linear(self.feat_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features before the classifier, N x feat_dim."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_classes={self.num_classes}, im_size={self.im_size}, "
                f"width={self.net_width}, depth={self.depth}, norm={self.norm!r}, "
                f"activation={self.activation!r}, pooling={self.pooling!r}")


def build_model(meta: MetaLike, arch: Mapping[str, Any] | None = None, seed: int | None = None) -> ConvNet:
    """Build a ConvNet for a dataset.

    ``meta`` is any object with ``channels``, ``height``, ``width`` and ``num_classes``
    (e.g. ``common.datasets.DatasetMeta``). ``arch`` is the scenario's model section
    (keys width/depth/norm/activation/pooling; missing keys take ConvNet defaults,
    ``None`` values are ignored). With ``seed`` the initialization is deterministic and
    the caller's global RNG state is left untouched. The model is returned on CPU.
    """
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"arch has unknown keys {unknown}; valid keys are {list(ARCH_KEYS)}")
    kwargs = {k: v for k, v in arch.items() if v is not None}

    def make() -> ConvNet:
        return ConvNet(
            channels=int(meta.channels),
            num_classes=int(meta.num_classes),
            im_size=(int(meta.height), int(meta.width)),
            **kwargs,
        )

    if seed is None:
        return make()
    # Init happens on CPU, so forking only the CPU RNG suffices (devices=[] avoids
    # touching / initialising CUDA).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return make()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
