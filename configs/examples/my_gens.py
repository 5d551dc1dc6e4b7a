"""A user's own GEN, registered from outside the package (see the README, "Your own method").

    bench run plugins='[configs/examples/my_gens.py]' methods='[qi2018,l2/trimmed:cut=[0.1,0.2]/l2/l2/max]'
"""

import torch

from bench.imprint import Option, register_gen
from bench.imprint.gen import GenResult


@register_gen("trimmed", options={"cut": Option(float, 0.1, minimum=0.0, maximum=0.49)},
              single_proxy=True, one_sample_identity=True, summary="per-coordinate trimmed mean")
def trimmed(x, mask, *, cut=0.1):
    """x: (classes, samples, dim) support, mask: (classes, samples) real samples."""
    values = x.masked_fill(~mask[..., None], float("nan")).sort(dim=1).values
    n = mask.sum(1)
    drop = (n * cut).long()
    rank = torch.arange(x.shape[1], device=x.device)[None, :, None]
    keep = (rank >= drop[:, None, None]) & (rank < (n - drop)[:, None, None])
    proxy = torch.where(keep, values, 0).sum(1) / keep.sum(1)
    one = torch.ones(len(x), 1, dtype=torch.bool, device=x.device)
    return GenResult(proxy[:, None], one, one.sum(1))
