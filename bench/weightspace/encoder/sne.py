"""SNE, the set-based neural network encoder (Andreis et al. 2023, arXiv 2305.16625).

Networks: chunked layer elements (``chunking.py``) with positional encodings of their layer
(relative depth, index, type) and of their place in the layer (row, column) -> set-to-set
functions within each layer (DeepSets equivariant layers; ``attention=True`` adds a Set
Transformer ISAB after each, about 4x slower on CPU) -> one vector per layer (attention pooling
next to the mean) -> the layer vectors, with encodings of their depth and type,
combined in depth order (``combine="set"``: set attention + pooling over depth-encoded layers,
as in the paper; ``combine="gru"``: a GRU reading the layers from input to output) -> a
network vector -> a small MLP predicts the property.

Heads: proxy chunks (the proxy's direction, with the chunk's place along the embedding
dimension and the proxy's log-norm) -> set functions and pooling per proxy -> per class -> per
head. Proxies and classes get no positional encoding, so
the head's encoding cannot depend on class order or on proxy order within a class.

SNE does not hard-wire the networks' neuron-permutation symmetry (its positional encodings
break it); ``logit_invariance_loss`` is the paper's regulariser: the prediction for a network
and for a copy with its hidden units permuted should be equal.
"""

from __future__ import annotations

import math
from typing import Annotated, Callable, Literal, Sequence

import torch
from pydantic import PositiveInt, StrictBool, model_validator
from torch import nn

from bench.config import Section, _desc
from bench.errors import BenchError
from bench.weightspace.encoder.chunking import ELEMENT_DIM, ELEMENT_TYPES, LAYER_TYPES, SetBatch
from bench.weightspace.encoder.sets import (
    AttentionPool,
    EquivariantLayer,
    InducedSetAttention,
    SetAttention,
    pad_segments,
)
from bench.weightspace.zoo.architectures import Layer, permute_hidden_units

COMBINES = ("set", "gru")


class SNEConfig(Section):
    """The encoder's architecture. ``kind`` and ``element_dim`` follow what it reads (a fit sets
    them from its source)."""

    kind: Annotated[Literal["network", "head"], _desc("network or head (set from the source)")] = "network"
    element_dim: Annotated[PositiveInt, _desc("a positive int (values per chunk)")] = ELEMENT_DIM
    hidden: Annotated[PositiveInt, _desc("a positive int divisible by model.heads")] = 32
    heads: Annotated[PositiveInt, _desc("a positive int (attention heads)")] = 4
    inducing: Annotated[PositiveInt, _desc("a positive int (inducing points of an ISAB)")] = 8
    blocks: Annotated[PositiveInt, _desc("a positive int (set-to-set blocks per level)")] = 1
    # large sets: DeepSets layers only (false) or each followed by an ISAB
    attention: Annotated[StrictBool, _desc("true or false")] = False
    freqs: Annotated[PositiveInt, _desc("a positive int (sine/cosine pairs per encoded position)")] = 4
    combine: Annotated[Literal[COMBINES], _desc("how layers combine in depth order: set or gru")] = "set"

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> SNEConfig:
        if self.hidden % self.heads:
            raise ValueError(f"SNE hidden={self.hidden} must be divisible by heads={self.heads}")
        return self


def fourier(t: torch.Tensor, freqs: int) -> torch.Tensor:
    """sin/cos of pi * 2^k * t for k < freqs, per column of t (..., c) -> (..., 2 * c * freqs)."""
    scales = math.pi * 2.0 ** torch.arange(freqs, device=t.device, dtype=t.dtype)
    angles = t[..., None] * scales
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def _scaled_positions(positions: torch.Tensor, absolute: Sequence[int]) -> torch.Tensor:
    """Relative positions stay in [0, 1]; absolute indices are divided by 16 (a few periods)."""
    out = positions.clone()
    for c in absolute:
        out[:, c] = out[:, c] / 16.0
    return out


class Level(nn.Module):
    """Set-to-set blocks within each set, then one vector per set."""

    def __init__(self, cfg: SNEConfig, small: bool = False) -> None:
        super().__init__()
        h = cfg.hidden
        blocks: list[nn.Module] = []
        for _ in range(cfg.blocks):
            if small:
                blocks.append(SetAttention(h, cfg.heads))
            else:
                blocks.append(EquivariantLayer(h))
                if cfg.attention:
                    blocks.append(InducedSetAttention(h, cfg.heads, cfg.inducing))
        self.blocks = nn.ModuleList(blocks)
        self.pool = AttentionPool(h, cfg.heads)

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, seg, n)
        return self.pool(x, seg, n)


class SNE(nn.Module):
    """``forward(batch) -> (B,)`` predictions; ``encode(batch) -> (B, hidden)`` embeddings."""

    def __init__(self, cfg: SNEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, f = cfg.hidden, cfg.freqs
        n_pos = 4 if cfg.kind == "network" else 2
        n_scalars = 0 if cfg.kind == "network" else 1  # a head chunk's proxy log-norm
        self.element_in = nn.Sequential(nn.Linear(cfg.element_dim + 2 * f * n_pos + n_scalars, h), nn.GELU(),
                                        nn.Linear(h, h))
        self.element_type = nn.Embedding(len(ELEMENT_TYPES), h)
        # 1 / typical magnitude of each element type's values, set from the training items
        # (``set_value_scale``): raw weights, running variances and embeddings differ by orders
        self.register_buffer("value_scale", torch.ones(len(ELEMENT_TYPES)))
        if cfg.kind == "network":
            self.levels = nn.ModuleList([Level(cfg)])
            self.layer_in = nn.Sequential(nn.Linear(h + 2 * f * 2, h), nn.GELU(), nn.Linear(h, h))
            self.layer_type = nn.Embedding(len(LAYER_TYPES), h)
            if cfg.combine == "gru":
                self.depth = nn.GRU(h, h, batch_first=True)
            else:
                self.depth = Level(cfg, small=True)
        else:  # proxies within a proxy's chunks, proxies within a class, classes within a head
            self.levels = nn.ModuleList([Level(cfg), Level(cfg), Level(cfg, small=True)])
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def encode(self, batch: SetBatch) -> torch.Tensor:
        if batch.kind != self.cfg.kind:
            raise BenchError(f"this SNE reads {self.cfg.kind}s, not {batch.kind}s")
        if batch.values.shape[1] != self.cfg.element_dim:
            raise BenchError(f"elements have {batch.values.shape[1]} values, this SNE expects "
                             f"{self.cfg.element_dim}; chunk with element_dim={self.cfg.element_dim}")
        f, dtype = self.cfg.freqs, self.element_in[0].weight.dtype
        pos = fourier(_scaled_positions(batch.positions.to(dtype), (1,)), f)  # column 1 is an index
        # asinh keeps small weights linear and tames large running variances and raw embeddings
        values = torch.asinh(batch.values.to(dtype) * self.value_scale[batch.types][:, None])
        parts = [values, pos] + ([batch.scalars.to(dtype)] if self.cfg.kind == "head" else [])
        x = self.element_in(torch.cat(parts, 1)) + self.element_type(batch.types)
        if self.cfg.kind == "head":
            for level, seg, n in zip(self.levels, batch.segments, batch.sizes):
                x = level(x, seg, n)
            return x
        x = self.levels[0](x, batch.segments[0], batch.sizes[0])  # one vector per layer
        depth = fourier(_scaled_positions(batch.group_positions.to(dtype), (1,)), f)
        x = self.layer_in(torch.cat([x, depth], 1)) + self.layer_type(batch.group_types)
        seg, n = batch.segments[1], batch.sizes[1]
        if self.cfg.combine == "gru":
            padded, mask, _ = pad_segments(x, seg, n)  # layers are stored in depth order
            lengths = (~mask).sum(1)
            packed = nn.utils.rnn.pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, last = self.depth(packed)
            return last[0]
        return self.depth(x, seg, n)

    def forward(self, batch: SetBatch) -> torch.Tensor:
        return self.head(self.encode(batch)).squeeze(1)

    @torch.no_grad()
    def set_value_scale(self, batch: SetBatch) -> None:
        """Scale each element type's values to unit root-mean-square (over non-zero values:
        padding is not data)."""
        for t in range(len(self.value_scale)):
            v = batch.values[batch.types == t]
            v = v[v != 0]
            if v.numel():
                self.value_scale[t] = 1.0 / v.double().pow(2).mean().sqrt().clamp_min(1e-8).item()


def logit_invariance_loss(
    predict: Callable[[list[list[Layer]]], torch.Tensor],
    networks: list[list[Layer]],
    generator: torch.Generator,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared difference between the predictions for the networks and for copies with
    randomly permuted hidden units (the paper's logit-invariance regulariser). ``reference``
    reuses predictions already computed for the unpermuted networks."""
    if reference is None:
        reference = predict(networks)
    permuted = predict([permute_hidden_units(layers, generator) for layers in networks])
    return torch.mean((reference - permuted) ** 2)
