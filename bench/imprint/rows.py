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
    gave a row other bits in a sub-batch. On CUDA neither does: cuBLAS and torch's reduction
    kernels split the samples by the whole tensor's shape (on an H200, 904 and 18 of 1,200
    sub-batches gave a row other bits), so there the samples are added pairwise
    (:func:`pairwise_sums`).
    """
    if x.device.type != "cpu":
        # half precision adds in float32, as the product and torch's sum did: a float16 partial sum
        # of many samples would lose digits or overflow
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if weights is None and mask is not None:
            weights = mask
        return pairwise_sums(wide if weights is None else wide * weights[..., None].to(wide.dtype)).to(x.dtype)
    if weights is not None:
        return (x * weights[..., None]).sum(1)
    if mask is not None and not bool(mask.all()):
        x = x.masked_fill(~mask[..., None], 0)
    return x.sum(1)


def pairwise_sums(x: torch.Tensor) -> torch.Tensor:
    """(B, D) sums of a (B, S, D) batch over S, in a fixed pairwise order: sample i + S/2 is added
    to sample i until one is left. Only elementwise additions, each output from its two inputs
    alone, so a row's sum has the same bits in any batch on any device, in log2(S) steps
    (a kernel per row would take B).
    """
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        pairs = x[:, :half] + x[:, half:2 * half]
        x = torch.cat([pairs, x[:, 2 * half:]], 1) if x.shape[1] % 2 else pairs
    return x[:, 0] if x.shape[1] else x.new_zeros(x.shape[0], x.shape[2])
