"""The embedded default backbone: a tiny CNN for 8x8 grey digits.

It is pretrained by ``scripts/build_tiny_backbone.py`` on digits classes 0-4 only and shipped
as ``bench/assets/tiny_digits.safetensors``, so the quickstart can imprint heads for classes the
backbone has seen (0-4) and classes it has never seen (5-9) with no network.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-conv-pool-conv, global average pooling: one ``width * 4``-dim embedding per image."""

    def __init__(self, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    @property
    def dim(self) -> int:
        return 4 * self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
