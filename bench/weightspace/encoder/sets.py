"""Set functions over segments of a flat tensor: DeepSets and Set Transformer blocks.

Sets of very different sizes (a 64 x 64 conv has 4,160 elements, a bias-free BN layer 8) are
stored flat, ``x`` (N, h) with ``seg`` (N,) naming each row's set, so a batch needs no padding:

- ``EquivariantLayer``: DeepSets' permutation-equivariant layer, x + MLP([x, mean of its set]);
- ``InducedSetAttention``: the Set Transformer's ISAB, m learned inducing points attend to each
  set and each element attends back to them (linear in the set size);
- ``SetAttention``: the Set Transformer's SAB (full self-attention) for small sets, padded;
- ``AttentionPool``: PMA with one seed, a set-to-vector function.

None of them sees an element's place in the flat tensor, so each is equivariant (pooling:
invariant) to the order of the elements within a set, up to float rounding of the sums.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_zeros((n,) + tuple(x.shape[1:])).index_add_(0, seg, x)


def segment_counts(seg: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(seg, minlength=n).clamp_min(1)


def segment_mean(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    shape = (n,) + (1,) * (x.ndim - 1)
    return segment_sum(x, seg, n) / segment_counts(seg, n).to(x.dtype).reshape(shape)


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax over the rows of each set, separately for every column of ``scores`` (N, ...)."""
    flat = scores.reshape(len(scores), -1)
    # The shift only keeps exp() finite; softmax does not depend on it, so no gradient is needed.
    peak = flat.new_full((n, flat.shape[1]), -torch.inf).scatter_reduce(
        0, seg[:, None].expand_as(flat), flat.detach(), "amax", include_self=True)
    e = torch.exp(flat - peak[seg])
    return (e / segment_sum(e, seg, n)[seg]).reshape(scores.shape)


def _ffn(h: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))


class EquivariantLayer(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
        y = self.norm(x)
        return x + self.mlp(torch.cat([y, segment_mean(y, seg, n)[seg]], 1))


class _Heads(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        if h % heads:
            raise ValueError(f"hidden size {h} is not divisible by {heads} attention heads")
        self.heads, self.d = heads, h // heads

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.heads, self.d)


class InducedSetAttention(_Heads):
    def __init__(self, h: int, heads: int = 4, inducing: int = 8) -> None:
        super().__init__(h, heads)
        self.points = nn.Parameter(torch.randn(inducing, h) / math.sqrt(h))
        self.norm_x = nn.LayerNorm(h)
        self.q1, self.k1, self.v1 = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.q2, self.k2, self.v2 = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out1, self.out2 = nn.Linear(h, h), nn.Linear(h, h)
        self.ffn1, self.ffn2 = _ffn(h), _ffn(h)
        self.norm_h = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
        m = len(self.points)
        y = self.norm_x(x)
        q = self.split(self.q1(self.points))  # (m, H, d)
        k, v = self.split(self.k1(y)), self.split(self.v1(y))  # (N, H, d)
        scores = torch.einsum("nhd,mhd->nmh", k, q) / math.sqrt(self.d)  # (N, m, H)
        alpha = segment_softmax(scores, seg, n)
        summary = segment_sum(torch.einsum("nmh,nhd->nmhd", alpha, v), seg, n)  # (S, m, H, d)
        summary = self.out1(summary.reshape(n, m, -1)) + self.points
        summary = summary + self.ffn1(summary)  # (S, m, h): each set seen through m points
        s = self.norm_h(summary)
        q2 = self.split(self.q2(y))  # (N, H, d)
        k2, v2 = self.split(self.k2(s))[seg], self.split(self.v2(s))[seg]  # (N, m, H, d)
        att = torch.softmax(torch.einsum("nhd,nmhd->nmh", q2, k2) / math.sqrt(self.d), 1)
        x = x + self.out2(torch.einsum("nmh,nmhd->nhd", att, v2).reshape(len(x), -1))
        return x + self.ffn2(x)


class AttentionPool(_Heads):
    """PMA with one learned seed, next to the plain mean (DeepSets' pooling): one vector per set.

    Keys come from normalised rows, values from the rows themselves, so the pooled vector keeps
    the magnitudes a row normalisation would erase (the scale of the weights is the signal).
    """

    def __init__(self, h: int, heads: int = 4) -> None:
        super().__init__(h, heads)
        self.seed = nn.Parameter(torch.randn(h) / math.sqrt(h))
        self.norm = nn.LayerNorm(h)
        self.q, self.k, self.v, self.out = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.mean = nn.Linear(h, h)
        self.ffn = _ffn(h)

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
        q = self.split(self.q(self.seed))  # (H, d)
        k, v = self.split(self.k(self.norm(x))), self.split(self.v(x))
        alpha = segment_softmax((k * q).sum(-1) / math.sqrt(self.d), seg, n)  # (N, H)
        pooled = self.out(segment_sum(alpha[..., None] * v, seg, n).reshape(n, -1))
        pooled = pooled + self.mean(segment_mean(x, seg, n)) + self.seed
        return pooled + self.ffn(pooled)


def pad_segments(x: torch.Tensor, seg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, L, h) padded sets, the padding mask (True = empty) and each row's slot."""
    counts = torch.bincount(seg, minlength=n)
    order = torch.argsort(seg, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(seg)
    slot[order] = torch.arange(len(seg), device=seg.device) - starts[seg[order]]
    width = int(counts.max()) if len(seg) else 0
    padded = x.new_zeros(n, width, x.shape[1])
    padded[seg, slot] = x
    mask = torch.ones(n, width, dtype=torch.bool, device=x.device)
    mask[seg, slot] = False
    return padded, mask, slot


class SetAttention(nn.Module):
    """SAB: full multi-head self-attention within each (small) set."""

    def __init__(self, h: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, heads, batch_first=True)
        self.ffn = _ffn(h)

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
        padded, mask, slot = pad_segments(self.norm(x), seg, n)
        out, _ = self.attn(padded, padded, padded, key_padding_mask=mask, need_weights=False)
        x = x + out[seg, slot]
        return x + self.ffn(x)
