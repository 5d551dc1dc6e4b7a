"""ImprintedHead: a classifier built from support embeddings by one method spec, no gradients."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench.errors import BenchError
from bench.imprint import agg as agg_mod
from bench.imprint import gen as gen_mod
from bench.imprint import norm as norm_mod
from bench.imprint.presets import resolve
from bench.imprint.spec import MethodSpec

# Generators whose proxies depend on every class of the episode: never batched across episodes.
COUPLED_GENS = frozenset({"ls"})


def check_embeddings(x: torch.Tensor, what: str, dim: int | None = None) -> None:
    """Stop on the embedding problems that would otherwise give silently wrong heads."""
    if x.ndim != 2:
        raise BenchError(f"{what} must be a 2-D (samples, dim) tensor, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise BenchError(f"{what} is empty; the episode selected no samples")
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


@dataclass
class SupportSet:
    """One episode's support: what a head is imprinted from."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    seed: int = 0
    classes: torch.Tensor | None = None
    reference_mean: torch.Tensor | None = None


def _prepare(spec: MethodSpec, ep: SupportSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    check_embeddings(ep.embeddings, "support embeddings")
    x = ep.embeddings
    labels = torch.as_tensor(ep.labels, device=x.device).long()
    if labels.shape != (len(x),):
        raise BenchError(f"support labels have shape {tuple(labels.shape)}; expected ({len(x)},)")
    classes = torch.unique(labels) if ep.classes is None else torch.unique(torch.as_tensor(ep.classes))
    center = None
    if "center-l2" in (spec.norm_pre.name, spec.norm_inf.name):
        center = x.mean(0) if ep.reference_mean is None else ep.reference_mean.to(x)
        if center.shape != (x.shape[1],):
            raise BenchError(
                f"reference_mean has shape {tuple(center.shape)}; expected ({x.shape[1]},)"
            )
    return labels, classes.to(x.device), center


def build_heads(
    spec: MethodSpec | str,
    episodes: Sequence[SupportSet],
    *,
    reference_weights: torch.Tensor | None = None,
    max_batch_elements: int = 4_000_000,
) -> list[ImprintedHead]:
    """Imprint one head per episode with one spec, batching episodes' classes together.

    Every head equals the head :meth:`ImprintedHead.build` makes alone from the same episode
    and seed; batching only removes per-episode overhead. Episodes are batched while the
    padded batch stays under ``max_batch_elements`` values: beyond that, per-op overhead is
    already amortised and a larger batch only costs fresh memory. ``gen_time_s`` in each
    head's meta is the total time divided by the number of episodes.
    """
    spec = resolve(spec)
    if not episodes:
        return []
    prepared = [_prepare(spec, ep) for ep in episodes]
    dims = {ep.embeddings.shape[1] for ep in episodes}
    if len(dims) > 1:
        raise BenchError(f"episodes in one batch have different embedding sizes {sorted(dims)}")
    device = episodes[0].embeddings.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    grouped = []
    for ep, (labels, classes, center) in zip(episodes, prepared):
        x = norm_mod.apply_vector_norm(spec.norm_pre.name, ep.embeddings, center)
        grouped.append(gen_mod.group_by_class(x, labels, classes))
    opts = dict(spec.gen.options)
    if spec.gen.name in COUPLED_GENS or len(grouped) == 1:
        results = [
            gen_mod.generate(spec.gen.name, b, m, gen_mod.RowRandom.of(ep.seed, len(b)), **opts)
            for (b, m), ep in zip(grouped, episodes)
        ]
    else:
        results = []
        for chunk in _chunks(grouped, max_batch_elements):
            results += _generate_batched(
                spec.gen.name, [grouped[i] for i in chunk], [episodes[i].seed for i in chunk], opts
            )
    heads = []
    for ep, (labels, classes, center), res in zip(episodes, prepared, results):
        proxies = res.proxies[res.mask]
        slots = torch.arange(len(classes), device=device)[:, None]
        proxy_labels = slots.expand_as(res.mask)[res.mask]
        proxies = norm_mod.apply_proxy_norm(spec.norm_post.name, proxies, reference_weights)
        eff = res.effective_k.tolist()
        meta = {
            "seed": int(ep.seed),
            "effective_k": eff,
            "effective_k_min": min(eff),
            "effective_k_max": max(eff),
            "num_proxies": len(proxies),
            "center": None
            if center is None
            else ("support" if ep.reference_mean is None else "reference"),
            "quantile_reference": None
            if spec.norm_post.name != "quantile"
            else ("proxies" if reference_weights is None else "reference"),
        }
        heads.append(ImprintedHead(spec, proxies, proxy_labels, classes, center, meta))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_head = (time.perf_counter() - start) / len(heads)
    for head in heads:
        head.meta["gen_time_s"] = per_head
        head.meta["batched_episodes"] = len(heads)
    return heads


def _chunks(grouped, max_elements: int) -> list[list[int]]:
    """Consecutive runs of episodes whose padded batch stays under ``max_elements``."""
    chunks: list[list[int]] = []
    rows = width = 0
    for i, (b, _) in enumerate(grouped):
        new_rows, new_width = rows + b.shape[0], max(width, b.shape[1])
        if chunks and new_rows * new_width * b.shape[2] > max_elements:
            chunks.append([i])
            rows, width = b.shape[0], b.shape[1]
        else:
            if not chunks:
                chunks.append([])
            chunks[-1].append(i)
            rows, width = new_rows, new_width
    return chunks


def _generate_batched(name, grouped, seeds, opts) -> list[gen_mod.GenResult]:
    """One GEN call over every episode's classes: pad samples to a common size and concat."""
    if len(grouped) == 1:
        b, m = grouped[0]
        return [gen_mod.generate(name, b, m, gen_mod.RowRandom.of(seeds[0], len(b)), **opts)]
    s_max = max(b.shape[1] for b, _ in grouped)
    xs, ms = [], []
    for b, m in grouped:
        pad = s_max - b.shape[1]
        xs.append(torch.nn.functional.pad(b, (0, 0, 0, pad)))
        ms.append(torch.nn.functional.pad(m, (0, pad)))
    rng = gen_mod.RowRandom([(seed, len(b)) for seed, (b, _) in zip(seeds, grouped)])
    res = gen_mod.generate(name, torch.cat(xs), torch.cat(ms), rng, **opts)
    out, start = [], 0
    for b, m in grouped:
        stop = start + len(b)
        # Trim proxy slots that only exist because a larger episode shares the batch.
        k = min(res.proxies.shape[1], b.shape[1]) if name == "all" else res.proxies.shape[1]
        out.append(
            gen_mod.GenResult(res.proxies[start:stop, :k], res.mask[start:stop, :k], res.effective_k[start:stop])
        )
        start = stop
    return out


class ImprintedHead(nn.Module):
    """Proxies and their classes as buffers; ``forward(queries) -> (N, C)`` class scores.

    Column j of the scores belongs to ``classes[j]`` (the original label values, sorted).
    """

    def __init__(
        self,
        spec: MethodSpec | str,
        proxies: torch.Tensor,
        proxy_labels: torch.Tensor,
        classes: torch.Tensor,
        center: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = resolve(spec)
        self.register_buffer("proxies", proxies)
        self.register_buffer("proxy_labels", proxy_labels.long())
        self.register_buffer("classes", classes.long())
        self.register_buffer("center", center if center is not None else proxies.new_zeros(0))
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def build(
        cls,
        spec: MethodSpec | str,
        support: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: torch.Tensor | None = None,
        reference_mean: torch.Tensor | None = None,
        reference_weights: torch.Tensor | None = None,
        seed: int = 0,
    ) -> ImprintedHead:
        """Imprint a head.

        ``reference_mean`` is the centre for center-l2 (e.g. the base-class mean); without it
        the support mean is used. ``reference_weights`` is the reference for quantile
        normalisation; without it the head's own proxies are used.
        """
        episode = SupportSet(support, labels, seed, classes, reference_mean)
        return build_heads(spec, [episode], reference_weights=reference_weights)[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return self.proxies.shape[1]

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        check_embeddings(queries, "query embeddings", self.dim)
        center = self.center if self.center.numel() else None
        q = norm_mod.apply_vector_norm(self.spec.norm_inf.name, queries, center)
        p = self.proxies.to(q.dtype)
        return agg_mod.aggregate(
            self.spec.agg.name, q, p, self.proxy_labels, self.num_classes, **dict(self.spec.agg.options)
        )

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Original labels as score columns (0..C-1); labels the head lacks are an error."""
        return gen_mod.class_positions(self.classes, labels, "query labels")

    def summary(self) -> dict[str, float | int]:
        """What result tables record about how the head was built."""
        return {
            "gen_time_s": float(self.meta.get("gen_time_s", float("nan"))),
            "num_proxies": int(self.meta.get("num_proxies", len(self.proxies))),
            "effective_k_min": int(self.meta.get("effective_k_min", 0)),
            "effective_k_max": int(self.meta.get("effective_k_max", 0)),
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
        spec = MethodSpec.parse(metadata["spec"], label=metadata.get("label") or None)
        center = tensors["center"] if tensors["center"].numel() else None
        return cls(
            spec,
            tensors["proxies"],
            tensors["proxy_labels"],
            tensors["classes"],
            center,
            json.loads(metadata.get("meta", "{}")),
        )
