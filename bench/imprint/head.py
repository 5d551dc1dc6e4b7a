"""ImprintedHead: a classifier built from support embeddings by one method spec, no gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench.errors import BenchError
from bench.imprint import agg as agg_mod
from bench.imprint import norm as norm_mod
from bench.imprint.gen import class_positions
from bench.imprint.presets import resolve
from bench.imprint.spec import MethodSpec


def check_embeddings(x: torch.Tensor, what: str, dim: int | None = None) -> None:
    """Stop on the embedding problems that would otherwise give silently wrong heads."""
    if x.ndim != 2:
        raise BenchError(f"{what} must be a 2-D (samples, dim) tensor, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise BenchError(f"{what} is empty; the episode selected no samples")
    if x.shape[1] == 0:
        raise BenchError(f"{what} have no dimensions (shape {tuple(x.shape)}); check the backbone's output")
    if dim is not None and x.shape[1] != dim:
        raise BenchError(
            f"{what} have {x.shape[1]} dims but the head was built on {dim}-dim embeddings; "
            "use embeddings from the same backbone and layer for support and queries"
        )
    # A row sum is non-finite whenever the row holds NaN/Inf; checking sums first is ~10x
    # cheaper than an elementwise pass, which then runs only to confirm and locate.
    if not torch.isfinite(x.sum(1)).all():
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten()
        if len(bad) == 0:  # finite values whose sum overflowed
            return
        raise BenchError(
            f"{what} contain NaN or Inf in {len(bad)} row(s) (first: {bad[:5].tolist()}); "
            "check the backbone's precision (try float32) or drop the broken samples"
        )


class ImprintedHead(nn.Module):
    """Proxies and their classes as buffers; ``forward(queries) -> (N, C)`` class scores.

    Column j of the scores belongs to ``classes[j]`` (the original label values, sorted).
    Build heads with :func:`bench.imprint.build_head` (one) or
    :func:`bench.imprint.build_head_grid` (many, sharing work); ``bias`` (one value per proxy)
    exists only for generators that produce linear classifiers.
    """

    def __init__(
        self,
        spec: MethodSpec | str,
        proxies: torch.Tensor,
        proxy_labels: torch.Tensor,
        classes: torch.Tensor,
        center: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = resolve(spec)
        # Buffers set directly rather than by register_buffer, whose checks of names made for us
        # cost more than the rest of building a head when a grid builds thousands of them.
        empty = proxies.new_zeros(0)
        self._buffers.update(proxies=proxies, proxy_labels=proxy_labels.long(), classes=classes.long(),
                             center=center if center is not None else empty, bias=bias if bias is not None else empty)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return self.proxies.shape[1]

    @property
    def unit_inputs(self) -> bool:
        """Whether both queries (after NORM_inf) and proxies are l2-normalised rows."""
        return bool(self.meta.get("unit_proxies")) and self.spec.norm_inf.name in ("l2", "center-l2")

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        check_embeddings(queries, "query embeddings", self.dim)
        center = self.center if self.center.numel() else None
        q = norm_mod.apply_vector_norm(self.spec.norm_inf.name, queries, center,
                                       **self.spec.norm_inf.kwargs("norm_inf"))
        p = self.proxies.to(q.dtype)
        bias = self.bias.to(q.dtype) if self.bias.numel() else None
        return agg_mod.aggregate(self.spec.agg, q, p, self.proxy_labels, self.num_classes, self.unit_inputs, bias)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Original labels as score columns (0..C-1); labels the head lacks are an error."""
        return class_positions(self.classes, labels, "query labels")

    def summary(self) -> dict[str, float | int | str]:
        """What result tables record about how the head was built."""
        return {
            "gen_time_s": float(self.meta.get("gen_time_s", float("nan"))),
            "num_proxies": int(self.meta.get("num_proxies", len(self.proxies))),
            "effective_k_min": int(self.meta.get("effective_k_min", 0)),
            "effective_k_max": int(self.meta.get("effective_k_max", 0)),
            # what a GEN chose itself per episode, e.g. logreg's c on the validation part ("" if nothing)
            "chosen": ",".join(f"{k}={v:g}" for k, v in (self.meta.get("chosen") or {}).items()),
        }

    @torch.no_grad()
    def predict(self, queries: torch.Tensor) -> torch.Tensor:
        """Predicted labels in the original label space."""
        return self.classes[self(queries).argmax(1)]

    def save(self, path: str | Path) -> None:
        """Write the head as safetensors; spec and meta travel in the header metadata."""
        tensors = {
            "proxies": self.proxies.contiguous().cpu(),
            "proxy_labels": self.proxy_labels.cpu(),
            "classes": self.classes.cpu(),
            "center": self.center.contiguous().cpu(),
        }
        if self.bias.numel():  # only linear heads have one; other heads' files stay as they were
            tensors["bias"] = self.bias.contiguous().cpu()
        metadata = {
            "spec": str(self.spec),
            "label": self.spec.label or "",
            "meta": json.dumps(self.meta),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ImprintedHead:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, Exception) as err:  # safetensors raises its own error types
            raise BenchError(f"cannot read head file {path}: {err}") from err
        missing = {"proxies", "proxy_labels", "classes", "center"} - tensors.keys()
        if missing or "spec" not in metadata:
            raise BenchError(
                f"{path} is not a saved ImprintedHead (missing {sorted(missing) or 'spec'}); "
                "write heads with ImprintedHead.save"
            )
        for name in ("proxies", "center", "bias"):
            if name in tensors and not torch.isfinite(tensors[name]).all():
                raise BenchError(
                    f"{path}: the head's {name} hold NaN or Inf, so every score would be meaningless; "
                    "rebuild the head from finite embeddings"
                )
        spec = MethodSpec.parse(metadata["spec"], label=metadata.get("label") or None)
        center = tensors["center"] if tensors["center"].numel() else None
        return cls(spec, tensors["proxies"], tensors["proxy_labels"], tensors["classes"], center,
                   json.loads(metadata.get("meta", "{}")), tensors.get("bias"))
