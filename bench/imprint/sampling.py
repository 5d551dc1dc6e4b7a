"""Random numbers for batches of rows that belong to independent episodes.

Every draw comes from CPU generators, one per episode, and is moved to the data's device, so a
seed picks the same samples on CPU and GPU, on any number of processes, and whether a head is
built alone or batched with other episodes.
"""

from __future__ import annotations

import torch


class RowRandom:
    """Random numbers for a batch whose row blocks belong to independent episodes.

    ``blocks`` is a list of (seed, rows). Each block draws from its own CPU generator, so its
    numbers do not depend on which other blocks share the batch.
    """

    def __init__(self, blocks: list[tuple[int, int]], _generators=None) -> None:
        self.blocks = list(blocks)
        self.generators = _generators or [torch.Generator().manual_seed(int(s)) for s, _ in blocks]

    @classmethod
    def of(cls, rng: RowRandom | int, rows: int) -> RowRandom:
        """Accept a plain int seed for a single-episode batch."""
        return rng if isinstance(rng, RowRandom) else cls([(int(rng), rows)])

    def repeat(self, n: int) -> RowRandom:
        """The same generators for a batch whose rows were ``repeat_interleave``d n times."""
        return RowRandom([(s, r * n) for s, r in self.blocks], self.generators)

    def _draw(self, fn, tail: tuple[int, ...], device) -> torch.Tensor:
        parts = [fn((r, *tail), generator=g, dtype=torch.float64) for (_, r), g in zip(self.blocks, self.generators)]
        return torch.cat(parts).to(device)

    def rand(self, tail: tuple[int, ...], device) -> torch.Tensor:
        return self._draw(torch.rand, tail, device)

    def randn(self, tail: tuple[int, ...], device) -> torch.Tensor:
        return self._draw(torch.randn, tail, device)


def sample_weighted(weights: torch.Tensor, n: int, rng: RowRandom) -> torch.Tensor:
    """Draw ``n`` indices per row with probability proportional to ``weights`` (B, S)."""
    return inverse_cdf(weights, rng.rand((n,), weights.device))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn with probability proportional to ``weights`` (B, S) from uniforms (B, n).

    Inverse-CDF sampling with CPU uniforms keeps draws identical across devices. Rows whose
    weights are all zero (every sample already a centre) fall back to the last index;
    callers only hit that when the class has fewer samples than centres, a case handled
    separately.
    """
    cdf = weights.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)
    return idx.clamp(max=weights.shape[1] - 1)
