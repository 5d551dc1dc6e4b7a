import os

import pytest
import torch

# W&B never reaches the network from tests, and never asks for a login.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def blobs():
    """Two well separated classes per dimension, small enough to reason about."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    x = centres.repeat_interleave(10, 0) + 0.3 * torch.randn(30, 3, generator=g)
    y = torch.arange(3).repeat_interleave(10)
    return x, y
