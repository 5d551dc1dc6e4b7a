"""Per-row sums over the samples of a padded (rows, samples, dim) batch, the same for a row
whatever other rows share its batch.

Grids batch the classes of many episodes into one tensor, and a head built in a grid must
equal the head built alone, so nothing computed for one row may depend on the batch around it.
"""

from __future__ import annotations

import torch


def row_sums(x: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D): each row's sum over its real samples (``mask`` (B, S)), or its ``weights``
    (B, S, zero on padding) times its samples.

    On CPU a reduction over the samples adds each row's values on their own, so a row's sum
    has the same bits in any batch and on any thread count. The obvious batched (1 x S) @
    (S x D) product does not: MKL picks its kernel by batch size, and 146 of 300 random shapes
    gave a row other bits in a sub-batch. CUDA keeps that product, the form checked there for
    grid-equals-alone (on an H200, 440 heads).
    """
    if weights is None and mask is not None and x.device.type != "cpu":
        weights = mask.to(x.dtype)
    if weights is not None and x.device.type != "cpu":
        return (weights[:, None, :] @ x)[:, 0]
    if weights is not None:
        return (x * weights[..., None]).sum(1)
    if mask is not None and not bool(mask.all()):
        x = x.masked_fill(~mask[..., None], 0)
    return x.sum(1)
