"""Geometric complexity of an embedding map: the mean over inputs of ||J_f(x)||_F^2.

Estimated with random projections: for probe directions v_1..v_P in the embedding space,
||J||_F^2 = (D / P) sum_k ||v_k^T J||^2 when the probes are rows of random orthonormal frames,
one vector-Jacobian product per probe, batched over inputs. With P a multiple of the embedding
size D the frames are complete and the estimate is exact for any map; with fewer probes it is
unbiased. The result names the input space (the tensor the backbone receives, after its
transform) and the number of probes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from bench.errors import BenchError


def _probes(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` unit probes built from random orthonormal frames of R^dim."""
    frames = []
    while sum(len(f) for f in frames) < count:
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        frames.append(q.T)
    return torch.cat(frames)[:count]


def jacobian_sq_norms(model: nn.Module, x: torch.Tensor, probes: int = 16, seed: int = 0) -> torch.Tensor:
    """Per-input estimates of ||J_f(x)||_F^2 for a batch ``x`` (B, ...). Samples must not
    interact inside the model (eval mode), so one backward pass gives every input's VJP."""
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x).flatten(1)
        if not out.requires_grad:
            raise BenchError(
                "the backbone's output does not depend differentiably on its input (no autograd "
                "graph), so geometric complexity cannot be computed for it"
            )
        d = out.shape[1]
        vs = _probes(d, probes, torch.Generator().manual_seed(seed)).to(out)
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for k, v in enumerate(vs):
            (grad,) = torch.autograd.grad(out, x, grad_outputs=v.expand_as(out), retain_graph=k + 1 < len(vs),
                                          allow_unused=True)
            if grad is None:
                raise BenchError("the backbone's output does not depend on its input; no Jacobian")
            total += grad.flatten(1).double().pow(2).sum(1)
    return total * (d / len(vs))


def geometric_complexity(
    model: nn.Module, batches: Iterable[torch.Tensor], probes: int = 16, seed: int = 0,
    input_space: str = "backbone input tensor",
) -> dict[str, Any]:
    """GC raw and normalised by the embeddings' total variance (so scale cancels)."""
    values, embs = [], []
    for i, x in enumerate(batches):
        values.append(jacobian_sq_norms(model, x, probes, seed + i))
        with torch.no_grad():
            embs.append(model(x).flatten(1).double())
    if not values:
        raise BenchError("geometric complexity needs at least one batch of inputs")
    gc = torch.cat(values)
    emb = torch.cat(embs)
    variance = float(emb.var(0, unbiased=True).sum()) if len(emb) > 1 else float("nan")
    return {
        "gc": float(gc.mean()),
        "gc_normalized": float(gc.mean()) / variance if variance and not math.isnan(variance) else float("nan"),
        "gc_std": float(gc.std()) if len(gc) > 1 else 0.0,
        "embedding_variance": variance,
        "probes": probes,
        "num_inputs": len(gc),
        "input_space": input_space,
        "exact": probes % emb.shape[1] == 0,
    }


def exact_jacobian_sq_norm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """||J_f(x)||_F^2 per input from the full Jacobian (for tests and small models)."""
    from torch.func import jacrev, vmap

    model.eval()
    jac = vmap(jacrev(lambda xi: model(xi[None]).flatten()))(x)
    return jac.flatten(1).double().pow(2).sum(1)
