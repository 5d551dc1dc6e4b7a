"""Building and scoring many heads at once, computing each shared stage once.

A grid of method specs over a set of episodes repeats a lot of work when every head is
built alone: most specs share NORM_pre, many share their proxies (k-means with k at least
the shot count is ``all``, k-means with k = 1 is the mean, l2 after l2-normalised support
samples changes nothing), and heads with the same proxies and query normalisation read the
same query-proxy similarity matrix. :func:`build_head_grid` and :func:`score_heads` find
these shared stages from the specs and the episodes' class sizes, compute each once, and
batch episodes together within a stage. Episodes whose support is identical (same
embeddings, labels, classes and reference mean; e.g. every seed of ``shots=all``) also share
every stage that does not draw random numbers, so only seeded generators run once per seed.

Sharing never changes a number: a head from a grid equals the head built alone (alone is a
grid of one), because both run the same stage functions on the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from bench.errors import BenchError
from bench.imprint import agg as agg_mod
from bench.imprint import gen as gen_mod
from bench.imprint import norm as norm_mod
from bench.imprint.head import ImprintedHead, SupportSet, check_embeddings
from bench.imprint.presets import resolve
from bench.imprint.spec import MethodSpec

# Generators whose proxies depend on every class of the episode: never batched across episodes.
COUPLED_GENS = frozenset({"ls"})
UNIT_NORMS = frozenset({"l2", "center-l2"})


@dataclass
class _Episode:
    """One episode's inputs, checked once, and the stage outputs computed from them."""

    support: SupportSet
    labels: torch.Tensor
    classes: torch.Tensor
    center: torch.Tensor | None
    max_count: int
    grouped: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    seconds: dict[tuple, float] = field(default_factory=dict)  # stage key -> time it took
    same_as: int = -1  # index of the first episode with identical inputs (itself if none)


def _prepare(ep: SupportSet, need_center: bool) -> _Episode:
    check_embeddings(ep.embeddings, "support embeddings")
    x = ep.embeddings
    labels = torch.as_tensor(ep.labels, device=x.device).long()
    if labels.shape != (len(x),):
        raise BenchError(f"support labels have shape {tuple(labels.shape)}; expected ({len(x)},)")
    classes = torch.unique(labels) if ep.classes is None else torch.unique(torch.as_tensor(ep.classes))
    center = None
    if need_center:
        center = x.mean(0) if ep.reference_mean is None else ep.reference_mean.to(x)
        if center.shape != (x.shape[1],):
            raise BenchError(
                f"reference_mean has shape {tuple(center.shape)}; expected ({x.shape[1]},)"
            )
    counts = torch.bincount(gen_mod.class_positions(classes.to(x.device), labels, "support labels"),
                            minlength=len(classes))
    return _Episode(ep, labels, classes.to(x.device), center, int(counts.max()))


def _gen_key(spec: MethodSpec, ep: _Episode) -> tuple[str, str, tuple]:
    name, opts = gen_mod.effective_gen(spec.gen.name, dict(spec.gen.options), ep.max_count)
    return spec.norm_pre.name, name, tuple(sorted(opts.items()))


def build_head_grid(
    specs: Sequence[MethodSpec | str],
    episodes: Sequence[SupportSet],
    *,
    reference_weights: torch.Tensor | None = None,
    max_batch_elements: int = 4_000_000,
) -> list[list[ImprintedHead]]:
    """Imprint every spec on every episode: ``result[i][j]`` is spec i's head for episode j.

    Episodes are batched within a GEN stage while the padded batch stays under
    ``max_batch_elements`` values: beyond that, per-op overhead is already amortised and a
    larger batch only costs fresh memory. Each head's ``gen_time_s`` is what building it
    alone took: the time of every stage it used (stages batched over n episodes count 1/n).
    """
    specs = [resolve(s) for s in specs]
    if not episodes or not specs:
        return [[] for _ in specs]
    dims = {ep.embeddings.shape[1] for ep in episodes}
    if len(dims) > 1:
        raise BenchError(f"episodes in one batch have different embedding sizes {sorted(dims)}")
    need_center = any("center-l2" in (s.norm_pre.name, s.norm_inf.name) for s in specs)
    device = episodes[0].embeddings.device
    eps = [_prepare(ep, need_center) for ep in episodes]
    _link_identical(eps)

    gens: dict[tuple, dict[int, gen_mod.GenResult]] = {}  # GEN key -> episode -> result
    for spec in specs:
        _ensure_grouped(spec.norm_pre.name, eps, device)
        for j, ep in enumerate(eps):
            key = _gen_key(spec, ep)
            gens.setdefault(key, {}).setdefault(_gen_owner(key, j, eps), None)
    stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (NORM_pre, episodes) -> batch
    # One NORM_pre at a time, so only that NORM_pre's support batches are held.
    for key, done in sorted(gens.items(), key=lambda item: item[0][0]):
        if stacks and next(iter(stacks))[0] != key[0]:
            stacks.clear()
        todo = [j for j, res in done.items() if res is None]
        done.update(zip(todo, _generate(key, eps, todo, stacks, max_batch_elements, device)))

    out: list[list[ImprintedHead]] = []
    proxies_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs:
        row = []
        for j, ep in enumerate(eps):
            key = _gen_key(spec, ep)
            owner = _gen_owner(key, j, eps)  # the episode whose GEN result this head reuses
            res = gens[key][owner]
            # Support samples that NORM_pre l2-normalised are unit rows: a second l2 is skipped.
            unit_samples = spec.norm_pre.name in UNIT_NORMS and key[1] in gen_mod.SAMPLE_GENS
            post = "none" if spec.norm_post.name == "l2" and unit_samples else spec.norm_post.name
            unit = spec.norm_post.name == "l2" or (post == "none" and unit_samples)
            pkey = (key, post, owner)
            if pkey not in proxies_cache:
                start = _tick(device)
                flat = res.proxies[res.mask]
                slots = torch.arange(len(ep.classes), device=device)[:, None]
                labels = slots.expand_as(res.mask)[res.mask]
                proxies_cache[pkey] = (norm_mod.apply_proxy_norm(post, flat, reference_weights), labels)
                eps[owner].seconds[("post", pkey)] = _tick(device) - start
            proxies, labels = proxies_cache[pkey]
            eff = res.effective_k.tolist()
            pre_s = eps[ep.same_as].seconds[("pre", spec.norm_pre.name)]
            gen_s = eps[owner].seconds[("gen", key)] + eps[owner].seconds[("post", pkey)]
            meta = {
                "seed": int(ep.support.seed),
                "effective_k": eff,
                "effective_k_min": min(eff),
                "effective_k_max": max(eff),
                "num_proxies": len(proxies),
                "unit_proxies": unit,
                "center": None
                if ep.center is None or "center-l2" not in (spec.norm_pre.name, spec.norm_inf.name)
                else ("support" if ep.support.reference_mean is None else "reference"),
                "quantile_reference": None
                if spec.norm_post.name != "quantile"
                else ("proxies" if reference_weights is None else "reference"),
                "gen_time_s": pre_s + gen_s,
                "batched_episodes": len(eps),
            }
            center = ep.center if meta["center"] is not None else None
            row.append(ImprintedHead(spec, proxies, labels, ep.classes, center, meta))
        out.append(row)
    return out


def build_heads(
    spec: MethodSpec | str,
    episodes: Sequence[SupportSet],
    *,
    reference_weights: torch.Tensor | None = None,
    max_batch_elements: int = 4_000_000,
) -> list[ImprintedHead]:
    """One head per episode for one spec (see :func:`build_head_grid`)."""
    return build_head_grid(
        [spec], episodes, reference_weights=reference_weights, max_batch_elements=max_batch_elements
    )[0]


def _tick(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _link_identical(eps: list[_Episode]) -> None:
    """Point each episode at the first one with identical inputs, sharing its centre.

    A sum per episode narrows the candidates, so only likely twins are compared in full and
    the cost stays one pass over each episode's embeddings, far less than any stage it saves.
    """
    first: dict[tuple, list[int]] = {}  # fingerprint -> episodes that head a twin group
    for j, ep in enumerate(eps):
        ep.same_as = j
        emb = ep.support.embeddings
        fingerprint = (tuple(emb.shape), float(emb.sum(dtype=torch.float64)))
        heads = first.setdefault(fingerprint, [])
        twin = next((i for i in heads if _same_inputs(eps[i], ep)), None)
        if twin is None:
            heads.append(j)
        else:
            ep.same_as, ep.center, ep.grouped = twin, eps[twin].center, eps[twin].grouped


def _same_inputs(a: _Episode, b: _Episode) -> bool:
    sa, sb = a.support, b.support
    if not torch.equal(a.classes, b.classes):
        return False
    if (sa.reference_mean is None) != (sb.reference_mean is None):
        return False
    if sa.reference_mean is not None and not torch.equal(sa.reference_mean, sb.reference_mean):
        return False
    return torch.equal(a.labels, b.labels) and torch.equal(sa.embeddings, sb.embeddings)


def _gen_owner(key: tuple, j: int, eps: list[_Episode]) -> int:
    """The episode whose GEN result episode ``j`` uses: its own for seeded generators, else
    the first identical episode's."""
    return j if key[1] in gen_mod.SEEDED_GENS else eps[j].same_as


def _ensure_grouped(norm_pre: str, eps: list[_Episode], device) -> None:
    for ep in eps:  # identical episodes share one ``grouped`` dict, so they group once
        if norm_pre not in ep.grouped:
            start = _tick(device)
            x = norm_mod.apply_vector_norm(norm_pre, ep.support.embeddings, ep.center)
            ep.grouped[norm_pre] = gen_mod.group_by_class(x, ep.labels, ep.classes)
            ep.seconds[("pre", norm_pre)] = _tick(device) - start


def _generate(
    key, eps: list[_Episode], ids: list[int], stacks: dict, max_elements: int, device
) -> list[gen_mod.GenResult]:
    """Run one GEN stage for episodes ``ids``, batching them unless the generator couples
    classes. ``stacks`` caches each padded batch of support, so GEN stages with the same
    NORM_pre and episodes share one copy instead of each concatenating its own."""
    norm_pre, name, opts = key
    grouped = [eps[j].grouped[norm_pre] for j in ids]
    chunks = [[i] for i in range(len(ids))] if name in COUPLED_GENS else _chunks(grouped, max_elements)
    results: list[gen_mod.GenResult] = []
    for chunk in chunks:
        start = _tick(device)
        skey = (norm_pre, tuple(ids[i] for i in chunk))
        if skey not in stacks:
            stacks[skey] = _stack([grouped[i] for i in chunk])
        seeds = [eps[ids[i]].support.seed for i in chunk]
        results += _generate_batched(name, stacks[skey], [grouped[i] for i in chunk], seeds, dict(opts))
        per_episode = (_tick(device) - start) / len(chunk)
        for i in chunk:
            eps[ids[i]].seconds[("gen", key)] = per_episode
    return results


def _stack(grouped) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes' (classes, samples, dim) support padded to one sample count and concatenated."""
    if len(grouped) == 1:
        return grouped[0]
    s_max = max(b.shape[1] for b, _ in grouped)
    xs, ms = [], []
    for b, m in grouped:
        pad = s_max - b.shape[1]
        xs.append(torch.nn.functional.pad(b, (0, 0, 0, pad)) if pad else b)
        ms.append(torch.nn.functional.pad(m, (0, pad)) if pad else m)
    return torch.cat(xs), torch.cat(ms)


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


def _generate_batched(name, stack, grouped, seeds, opts) -> list[gen_mod.GenResult]:
    """One GEN call over every episode's classes (``stack``, from :func:`_stack`)."""
    x, mask = stack
    rng = gen_mod.RowRandom([(seed, len(b)) for seed, (b, _) in zip(seeds, grouped)])
    res = gen_mod.generate(name, x, mask, rng, **opts)
    out, start = [], 0
    for b, _ in grouped:
        stop = start + len(b)
        # Trim proxy slots that only exist because a larger episode shares the batch.
        k = min(res.proxies.shape[1], b.shape[1]) if name == "all" else res.proxies.shape[1]
        out.append(
            gen_mod.GenResult(res.proxies[start:stop, :k], res.mask[start:stop, :k], res.effective_k[start:stop])
        )
        start = stop
    return out


def score_heads(heads: Sequence[ImprintedHead], queries: torch.Tensor) -> list[torch.Tensor]:
    """Each head's (N, C) class scores, equal to ``head(queries)``.

    Query normalisations and query-proxy matrices are computed once for all heads that share
    them (the same NORM_inf and centre; the same proxies and matrix kind).
    """
    check_embeddings(queries, "query embeddings")
    normed: dict[tuple, torch.Tensor] = {}
    matrices: dict[tuple, torch.Tensor] = {}
    out = []
    for head in heads:
        if head.dim != queries.shape[1]:
            check_embeddings(queries, "query embeddings", head.dim)  # raises the clear error
        kind = head.spec.norm_inf.name
        center = head.center if head.center.numel() else None
        qkey = (kind, _identity(center) if kind == "center-l2" else None)
        if qkey not in normed:
            normed[qkey] = norm_mod.apply_vector_norm(kind, queries, center)
        q = normed[qkey]
        matrix_kind = agg_mod.matrix_kind(head.spec.agg, head.unit_inputs)
        # Keyed by the head's own buffer, which outlives this call; a dtype-converted copy
        # could be freed and its address reused by another head's copy.
        mkey = (matrix_kind, qkey, _identity(head.proxies))
        if mkey not in matrices:
            matrices[mkey] = agg_mod.pair_matrix(matrix_kind, q, head.proxies.to(q.dtype))
        scores = agg_mod.reduce(head.spec.agg, matrices[mkey], matrix_kind, head.proxy_labels, head.num_classes)
        out.append(scores)
    return out


def _identity(t: torch.Tensor | None) -> tuple | None:
    """Which tensor this is, by storage: heads built together share proxy and centre tensors."""
    if t is None:
        return None
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
