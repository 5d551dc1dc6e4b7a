"""The small networks of the network zoo, and the same networks as an ordered list of layers.

A network is described by a :class:`NetSpec` (conv or MLP, depth, width, kernel, BatchNorm) and
built as a plain ``nn.Sequential``. Encoders never see the module: they read
``network_layers(spec, state)``, a list of :class:`Layer` in depth order (conv, linear and
batch-norm layers with their tensors), which is all any weight-space predictor gets.

Conv nets end in global average pooling, so the classifier's input units are the last conv's
channels: permuting a hidden layer's output units and the next layer's input units the same way
(``permute_hidden_units``) gives a network that computes exactly the same function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from bench.errors import BenchError

KINDS = ("conv", "mlp")
WEIGHT_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class NetSpec:
    """One architecture. ``depth`` counts conv layers (conv) or hidden layers (mlp)."""

    kind: str = "conv"
    depth: int = 2
    width: int = 16
    kernel: int = 3
    batchnorm: bool = False
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BenchError(f"network kind '{self.kind}' is not one of {KINDS}")
        if self.depth < 1 or self.width < 1:
            raise BenchError(f"network depth and width must be >= 1, got depth={self.depth} width={self.width}")
        if self.kind == "conv" and self.kernel % 2 == 0:
            raise BenchError(f"conv kernel must be odd (same padding), got {self.kernel}")

    @property
    def family(self) -> str:
        """The architecture family the cross-architecture split holds out: kind, depth, BN."""
        return f"{self.kind}{self.depth}{'-bn' if self.batchnorm else ''}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BenchError(f"unknown architecture key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def __str__(self) -> str:
        if self.kind == "conv":
            return f"{self.family} w={self.width} k={self.kernel}"
        return f"{self.family} w={self.width}"


def build_network(spec: NetSpec) -> nn.Sequential:
    """conv: [conv, (bn), relu, (maxpool on the first two)] x depth, global average pool, linear.
    mlp: flatten, [linear, (bn), relu] x depth, linear."""
    mods: list[nn.Module] = []
    if spec.kind == "conv":
        channels, size = spec.in_channels, spec.image_size
        for i in range(spec.depth):
            mods.append(nn.Conv2d(channels, spec.width, spec.kernel, padding=spec.kernel // 2))
            if spec.batchnorm:
                mods.append(nn.BatchNorm2d(spec.width))
            mods.append(nn.ReLU())
            if i < 2 and size >= 4:  # 8x8 digits: pool twice, to 2x2, keeps deep nets cheap
                mods.append(nn.MaxPool2d(2))
                size //= 2
            channels = spec.width
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, spec.num_classes)]
    else:
        features = spec.in_channels * spec.image_size**2
        mods.append(nn.Flatten())
        for _ in range(spec.depth):
            mods.append(nn.Linear(features, spec.width))
            if spec.batchnorm:
                mods.append(nn.BatchNorm1d(spec.width))
            mods.append(nn.ReLU())
            features = spec.width
        mods.append(nn.Linear(features, spec.num_classes))
    return nn.Sequential(*mods)


@dataclass
class Layer:
    """One layer's tensors. conv: weight (out, in, k, k); linear: weight (out, in); bn: weight is
    (C, 4) = [gamma, beta, running mean, running var] per channel. ``names`` maps each tensor
    back to its state-dict key."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    names: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def out_units(self) -> int:
        return self.weight.shape[0]


def network_layers(spec: NetSpec, state: dict[str, torch.Tensor]) -> list[Layer]:
    """The network's layers in depth order, read from its state dict."""
    model = build_network(spec)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    if missing:
        raise BenchError(f"weights do not match architecture '{spec}': missing {missing[:4]}")
    layers = []
    for name, mod in model.named_children():
        p = f"{name}."
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            w, b = state[p + "weight"], state[p + "bias"]
            if tuple(w.shape) != tuple(mod.weight.shape):
                raise BenchError(f"weight {p}weight has shape {tuple(w.shape)}, architecture '{spec}' "
                                 f"needs {tuple(mod.weight.shape)}")
            layers.append(Layer(kind, w.float(), b.float(), {"weight": p + "weight", "bias": p + "bias"}))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            keys = ("weight", "bias", "running_mean", "running_var")
            w = torch.stack([state[p + k].float() for k in keys], 1)
            layers.append(Layer("bn", w, None, {k: p + k for k in keys}))
    return layers


def permute_hidden_units(layers: list[Layer], generator: torch.Generator) -> list[Layer]:
    """The same network with every hidden layer's units in a random order.

    For each conv/linear layer but the last, one permutation reorders its output units (weight
    rows, bias), the batch-norm channels that follow it and the next conv/linear layer's input
    units. The network computes the same function (for conv nets because they end in global
    average pooling, so the classifier's inputs are channels).
    """
    out = [replace(layer) for layer in layers]
    weight_idx = [i for i, layer in enumerate(out) if layer.kind in WEIGHT_KINDS]
    for a, b in zip(weight_idx[:-1], weight_idx[1:]):
        n = out[a].out_units
        if out[b].weight.shape[1] != n:
            raise BenchError(
                f"layer {b} ({out[b].kind}) takes {out[b].weight.shape[1]} inputs but layer {a} has {n} "
                "outputs; hidden-unit permutations need each layer to read the previous one's units"
            )
        perm = torch.randperm(n, generator=generator)
        out[a].weight, out[a].bias = out[a].weight[perm], out[a].bias[perm]
        for i in range(a + 1, b):
            if out[i].kind == "bn":
                out[i].weight = out[i].weight[perm]
        out[b].weight = out[b].weight[:, perm]
    return out
