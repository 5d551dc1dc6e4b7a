"""Generated embeddings with a known structure, for tests and the method benchmark."""

from __future__ import annotations

import torch


def gaussian_mixture(
    num_classes: int = 10,
    dim: int = 512,
    per_class: int = 600,
    modes: int = 4,
    class_spread: float = 0.05,
    mode_spread: float = 1.0,
    noise: float = 2.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes made of several Gaussian modes each, so one mean per class underfits.

    Each class has a centre (std ``class_spread`` per dimension); its ``modes`` mode centres scatter around it with std
    ``mode_spread`` per dimension (scaled by 1/sqrt(dim) so distances do not grow with the
    dimension), and samples scatter around a uniformly chosen mode with std ``noise``
    (same scaling). Returns (embeddings (C * per_class, dim), labels), grouped by class.
    """
    g = torch.Generator().manual_seed(seed)
    scale = dim**-0.5
    centres = class_spread * torch.randn(num_classes, dim, generator=g)
    mode_c = centres[:, None] + mode_spread * torch.randn(num_classes, modes, dim, generator=g)
    which = torch.randint(modes, (num_classes, per_class), generator=g)
    x = torch.gather(mode_c, 1, which[..., None].expand(-1, -1, dim))
    x = x + noise * torch.randn(num_classes, per_class, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return (x * scale).reshape(-1, dim), labels
