"""A user's own backbone family, registered from outside the package (see the README, "Your own
backbone").

    bench run plugins='[configs/examples/my_backbones.py]' backbone=pixels:8
"""

import torch

from bench.backbones import frozen_backbone, register_backbone


@register_backbone("pixels", form="pixels:<size>", summary="raw pixels, flattened")
def pixels(size: str, transform: dict | None = None):
    side = int(size or 8)
    return frozen_backbone(f"pixels:{side}", torch.nn.Flatten(), transform or {"size": side, "channels": 1},
                           side * side, "pixels")
