"""Building and scoring many heads at once, computing each shared stage once.

A grid of method specs over a set of episodes repeats a lot of work when every head is
built alone: most specs share NORM_pre, many share their proxies (k-means with k at least
the shot count is ``all``, k-means with k = 1 is the mean, l2 after l2-normalised support
samples changes nothing), and heads with the same proxies and query normalisation read the
same query-proxy similarity matrix. :func:`build_head_grid` and :func:`score_heads` find
these shared stages from the specs, the facts each method declares in its registry, and the
episodes' class sizes; compute each once; and batch episodes together within a stage.
Episodes whose support is identical (same embeddings, labels, classes and reference; e.g.
every seed of ``shots=all``) also share every stage that draws no random numbers, so only
seeded generators run once per seed.

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
from bench.imprint import norm as norm_mod
from bench.imprint.gen import ClassLayout, GenContext, GenResult, class_layout, effective_gen, generate, group_by_class
from bench.imprint.head import ImprintedHead, check_embeddings
from bench.imprint.presets import resolve
from bench.imprint.registry import get
from bench.imprint.sampling import RowRandom
from bench.imprint.spec import MethodSpec, StageSpec
from bench.imprint.support import Reference, SupportSet


@dataclass
class _Prepared:
    """One episode's support, checked once, and the stage outputs computed from it."""

    support: SupportSet
    labels: torch.Tensor
    classes: torch.Tensor
    reference: Reference | None
    center: torch.Tensor | None  # the center-l2 mean: the reference's, else the support's
    layout: ClassLayout | None  # where each sample goes when grouped by class (None at 0 shots)
    grouped: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    seconds: dict[tuple, float] = field(default_factory=dict)  # stage key -> time it took
    same_as: int = -1  # index of the first episode with identical inputs (itself if none)

    @property
    def max_count(self) -> int:
        """The largest class's sample count (0 at 0 shots)."""
        return 0 if self.layout is None else self.layout.s_max


def _prepare(ep: SupportSet) -> _Prepared:
    """Labels, classes and layout; the embeddings are checked by :func:`_check_and_center`."""
    x = ep.embeddings
    if x.ndim != 2:
        check_embeddings(x, "support embeddings")  # raises the clear error
    labels = torch.as_tensor(ep.labels, device=x.device).long()
    if labels.shape != (len(x),):
        raise BenchError(f"support labels have shape {tuple(labels.shape)}; expected ({len(x)},)")
    classes = torch.unique(labels) if ep.classes is None else torch.unique(torch.as_tensor(ep.classes))
    classes = classes.to(x.device)
    if len(classes) == 0:
        raise BenchError("an episode has no classes: give its support samples or its class list")
    reference = ep.reference_stats
    if reference is not None:
        if reference.mean.shape != (x.shape[1],):
            raise BenchError(f"the reference mean has shape {tuple(reference.mean.shape)}; expected ({x.shape[1]},)")
        reference = reference.to(x)
    if len(labels) == 0:  # 0 shots: nothing to lay out
        return _Prepared(ep, labels, classes, reference, None, None)
    layout = class_layout(labels, classes, "support labels")
    return _Prepared(ep, labels, classes, reference, None, layout)


def _check_and_center(eps: list[_Prepared], need_center: bool) -> None:
    """Check each distinct support's embeddings and compute its centre once; twins (found by
    :func:`_link_identical`, which never pairs supports holding NaN) share both."""
    for j, ep in enumerate(eps):
        if ep.same_as != j:
            ep.center = eps[ep.same_as].center
            continue
        x = ep.support.embeddings
        if len(x):  # an empty (0, D) support is a 0-shot episode
            check_embeddings(x, "support embeddings")
        if need_center:
            ep.center = x.mean(0) if ep.reference is None else ep.reference.mean


def _gen_key(spec: MethodSpec, ep: _Prepared) -> tuple[str, str, tuple]:
    name, opts = effective_gen(spec.gen.name, spec.gen.kwargs("gen"), ep.max_count)
    return str(spec.norm_pre), name, tuple(sorted(opts.items()))


def _needs_center(spec: MethodSpec) -> bool:
    return any(get(s, getattr(spec, s).name).needs_reference for s in ("norm_pre", "norm_inf"))


def build_head_grid(
    specs: Sequence[MethodSpec | str],
    episodes: Sequence[SupportSet],
    *,
    reference_weights: torch.Tensor | None = None,
    max_batch_elements: int = 1 << 24,
    dataset: str | None = None,
    backbone: str | None = None,
) -> list[list[ImprintedHead]]:
    """Imprint every spec on every episode: ``result[i][j]`` is spec i's head for episode j.

    Episodes are batched within a GEN stage while the padded batch stays under
    ``max_batch_elements`` values: beyond that, per-op overhead is already amortised and a
    larger batch only costs fresh memory. Each head's ``gen_time_s`` is what building it
    alone took: the time of every stage it used (stages batched over n episodes count 1/n).
    ``dataset`` and ``backbone`` (a weights fingerprint) tell generators that check where
    embeddings come from (a learned generator refuses another backbone's embeddings).
    """
    specs = [resolve(s) for s in specs]
    if not episodes or not specs:
        return [[] for _ in specs]
    dims = {ep.embeddings.shape[1] for ep in episodes}
    if len(dims) > 1:
        raise BenchError(f"episodes in one batch have different embedding sizes {sorted(dims)}")
    need_center = any(_needs_center(s) for s in specs)
    if any(len(ep.embeddings) == 0 for ep in episodes):
        # center-l2 without a reference centres on the support mean, which 0 shots do not have
        no_mean = any(ep.reference is None for ep in episodes if len(ep.embeddings) == 0)
        needy = [s.name for s in specs if s.gen.method("gen").needs_support or (no_mean and _needs_center(s))]
        if needy:
            raise BenchError(f"methods {needy} need support samples, and an episode has none (0 shots); only "
                             "support-free methods (e.g. zeroshot) build heads at 0 shots")
    device = episodes[0].embeddings.device
    eps = [_prepare(ep) for ep in episodes]
    _link_identical(eps)
    _check_and_center(eps, need_center)
    source = (dataset, backbone)

    gens: dict[tuple, dict[int, GenResult | None]] = {}  # GEN key -> episode -> result
    pre_specs: dict[str, StageSpec] = {}
    keys: list[list[tuple[tuple, int]]] = []  # per spec, per episode: (GEN key, owner episode)
    for spec in specs:
        pre_specs[str(spec.norm_pre)] = spec.norm_pre
        _ensure_grouped(spec.norm_pre, eps, device)
        by_count: dict[int, tuple] = {}  # the key depends on the episode only through its largest class
        keys.append([])
        for j, ep in enumerate(eps):
            if ep.max_count not in by_count:
                by_count[ep.max_count] = _gen_key(spec, ep)
            key = by_count[ep.max_count]
            owner = _gen_owner(key, j, eps)
            keys[-1].append((key, owner))
            gens.setdefault(key, {}).setdefault(owner, None)
    stacks: dict[tuple, tuple] = {}  # (NORM_pre, twin groups) -> (batch, mask, memo of what GENs derive)
    # One NORM_pre at a time, so only that NORM_pre's support batches are held.
    for key, done in sorted(gens.items(), key=lambda item: item[0][0]):
        if stacks and next(iter(stacks))[0] != key[0]:
            stacks.clear()
        todo = [j for j, res in done.items() if res is None]
        done.update(zip(todo, _generate(key, pre_specs[key[0]], eps, todo, stacks, max_batch_elements,
                                        device, source)))

    out: list[list[ImprintedHead]] = []
    proxies_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    flat_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (GEN key, owner) -> (proxies, labels)
    sums: dict[torch.dtype, list[torch.Tensor]] = {}  # each new proxy matrix's sum, checked at once below
    checks = []
    k_lists: dict[tuple, list[int]] = {}  # (GEN key, owner) -> effective k per class
    for spec, spec_keys in zip(specs, keys):
        row = []
        uses_center = _needs_center(spec)
        unit_pre, unit_post = spec.norm_pre.method("norm_pre").unit, spec.norm_post.method("norm_post").unit
        post_opts, post_spec_text = spec.norm_post.kwargs("norm_post"), str(spec.norm_post)
        pre_text = str(spec.norm_pre)
        for ep, (key, owner) in zip(eps, spec_keys):  # owner: the episode whose GEN result this head reuses
            res = gens[key][owner]
            # Support samples that NORM_pre l2-normalised are unit rows: a second l2 is skipped.
            unit_samples = unit_pre and get("gen", key[1]).sample_proxies
            post = "none" if spec.norm_post.name == "l2" and unit_samples else spec.norm_post.name
            unit = unit_post or (post == "none" and unit_samples)
            post_text = "none" if post == "none" else post_spec_text
            pkey = (key, post_text, owner)
            if pkey not in proxies_cache:
                start = _tick(device)
                if (key, owner) not in flat_cache:  # NORM_post variants of one GEN result share it
                    flat_cache[(key, owner)] = _flatten(res, len(ep.classes))
                flat, labels = flat_cache[(key, owner)]
                # each proxy matrix its own labels, as heads own the buffers they share with no other
                # proxies: loading a state dict into one head copies into them in place
                labels = labels.clone()
                opts = post_opts if post != "none" else {}
                proxies = norm_mod.apply_proxy_norm(post, flat, reference_weights, **opts)
                bias = None if res.bias is None else res.bias[res.mask]
                total = proxies.sum() if bias is None else proxies.sum() + bias.sum()
                sums.setdefault(total.dtype, []).append(total)
                checks.append((proxies, bias, spec))
                proxies_cache[pkey] = (proxies, labels, bias)
                eps[owner].seconds[("post", pkey)] = _tick(device) - start
            proxies, labels, bias = proxies_cache[pkey]
            if (key, owner) not in k_lists:
                k_lists[(key, owner)] = res.effective_k.tolist()
            eff = k_lists[(key, owner)]
            pre_s = eps[ep.same_as].seconds[("pre", pre_text)]
            gen_s = eps[owner].seconds[("gen", key)] + eps[owner].seconds[("post", pkey)]
            meta = {
                "seed": int(ep.support.seed),
                "effective_k": eff,
                "effective_k_min": min(eff),
                "effective_k_max": max(eff),
                "num_proxies": len(proxies),
                "unit_proxies": unit,
                "center": None if not uses_center else ("support" if ep.reference is None else "reference"),
                "quantile_reference": None
                if spec.norm_post.name != "quantile"
                else ("proxies" if reference_weights is None else "reference"),
                "gen_time_s": pre_s + gen_s,
                "batched_episodes": len(eps),
                "chosen": res.chosen,
            }
            center = ep.center if uses_center else None
            row.append(ImprintedHead(spec, proxies, labels, ep.classes, center, meta, bias))
        out.append(row)
    # A sum holding NaN or Inf is NaN or Inf, so one reduction over the sums clears every proxy
    # (and bias); only then are the matrices checked one by one, to name the method.
    if not all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values()):
        for proxies, bias, spec in checks:
            _check_finite(proxies, bias, spec)
    return out


def _flatten(res: GenResult, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEN result's proxies as one (P, D) matrix, class by class, and each proxy's class.

    With every slot filled (the usual case) the matrix is a view and the labels are the shared
    :func:`~bench.imprint.agg.class_major` layout; callers copy the labels before a head owns them.
    """
    if bool(res.mask.all()):
        labels = agg_mod.class_major(num_classes, res.mask.shape[1], res.mask.device)
        return res.proxies.reshape(-1, res.proxies.shape[-1]), labels
    slots = torch.arange(num_classes, device=res.mask.device)[:, None]
    return res.proxies[res.mask], slots.expand_as(res.mask)[res.mask]


def _check_finite(proxies: torch.Tensor, bias: torch.Tensor | None, spec: MethodSpec) -> None:
    """Refuse a method whose proxies or bias hold NaN or Inf (values whose sum overflowed pass)."""
    if not torch.isfinite(proxies).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise BenchError(
            f"method '{spec.name}' produced NaN or Inf proxies, so its scores would be meaningless; "
            "check the embeddings and the method's options"
        )


def build_heads(
    spec: MethodSpec | str,
    episodes: Sequence[SupportSet],
    *,
    reference_weights: torch.Tensor | None = None,
    max_batch_elements: int = 1 << 24,
    dataset: str | None = None,
    backbone: str | None = None,
) -> list[ImprintedHead]:
    """One head per episode for one spec (see :func:`build_head_grid`)."""
    return build_head_grid([spec], episodes, reference_weights=reference_weights,
                           max_batch_elements=max_batch_elements, dataset=dataset, backbone=backbone)[0]


def build_head(
    spec: MethodSpec | str,
    support: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: torch.Tensor | None = None,
    reference: Reference | torch.Tensor | None = None,
    reference_weights: torch.Tensor | None = None,
    seed: int = 0,
    dataset: str | None = None,
    backbone: str | None = None,
) -> ImprintedHead:
    """Imprint one head.

    ``reference`` is a :class:`Reference` (reference-class statistics, e.g. of base classes:
    the centre for center-l2, class statistics for ``dc``) or just a reference mean; without
    it, center-l2 centres on the support mean. ``reference_weights`` is the reference for
    quantile normalisation; without it the head's own proxies are used.
    """
    episode = SupportSet(support, labels, seed, classes, reference)
    return build_heads(spec, [episode], reference_weights=reference_weights, dataset=dataset,
                       backbone=backbone)[0]


def _tick(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _link_identical(eps: list[_Prepared]) -> None:
    """Point each episode at the first one with identical inputs.

    A sum per episode narrows the candidates, so only likely twins are compared in full and
    the cost stays one pass over each episode's embeddings, far less than any stage it saves.
    """
    first: dict[tuple, list[int]] = {}  # fingerprint -> episodes that head a twin group
    for j, ep in enumerate(eps):
        ep.same_as = j
        emb = ep.support.embeddings
        # A few thousand evenly spaced values narrow the candidates as well as all of them at
        # a fraction of the cost (a float64 sum of a 5000 x 512 support took longer than the
        # mean heads built from it); torch.equal below decides.
        flat = emb.reshape(-1)
        probe = flat[:: max(1, len(flat) // 4096)]
        fingerprint = (tuple(emb.shape), float(probe.detach().sum(dtype=torch.float64)))
        heads = first.setdefault(fingerprint, [])
        twin = next((i for i in heads if _same_inputs(eps[i], ep)), None)
        if twin is None:
            heads.append(j)
        else:
            ep.same_as, ep.grouped = twin, eps[twin].grouped


def _same_inputs(a: _Prepared, b: _Prepared) -> bool:
    if not torch.equal(a.classes, b.classes) or (a.reference is None) != (b.reference is None):
        return False
    if a.reference is not None and a.support.reference is not b.support.reference:
        return False  # shared only when both episodes were given the same reference object
    va, vb = a.support.validation, b.support.validation  # GENs that choose on validation read it
    if (va is None) != (vb is None) or (va is not None and not (
            torch.equal(torch.as_tensor(va[1]), torch.as_tensor(vb[1])) and torch.equal(va[0], vb[0]))):
        return False
    ta, tb = a.support.text, b.support.text  # zeroshot and tip read the classes' text embeddings
    if (ta is None) != (tb is None) or (ta is not None and ta is not tb and not torch.equal(ta, tb)):
        return False
    return torch.equal(a.labels, b.labels) and torch.equal(a.support.embeddings, b.support.embeddings)


def _gen_owner(key: tuple, j: int, eps: list[_Prepared]) -> int:
    """The episode whose GEN result episode ``j`` uses: its own for seeded generators, else
    the first identical episode's."""
    return j if get("gen", key[1]).seeded else eps[j].same_as


def _ensure_grouped(norm_pre: StageSpec, eps: list[_Prepared], device) -> None:
    """Normalise and group each episode's support by class once per NORM_pre (twins share)."""
    key = str(norm_pre)
    for ep in eps:
        if key not in ep.grouped and len(ep.labels) == 0:  # 0 shots: no samples to normalise or group
            x = ep.support.embeddings
            ep.grouped[key] = (x.new_zeros(len(ep.classes), 0, x.shape[1]),
                               torch.zeros(len(ep.classes), 0, dtype=torch.bool, device=x.device))
            ep.seconds[("pre", key)] = 0.0
        if key not in ep.grouped:
            start = _tick(device)
            x = norm_mod.apply_vector_norm(norm_pre.name, ep.support.embeddings, ep.center,
                                           **norm_pre.kwargs("norm_pre"))
            ep.grouped[key] = group_by_class(x, ep.labels, ep.classes, ep.layout)
            ep.seconds[("pre", key)] = _tick(device) - start


def _generate(
    key, norm_pre: StageSpec, eps: list[_Prepared], ids: list[int], stacks: dict, max_elements: int,
    device, source: tuple[str | None, str | None],
) -> list[GenResult]:
    """Run one GEN stage for episodes ``ids``, batching them unless the generator couples
    classes. ``stacks`` caches each padded batch of support with a memo of what GENs derive
    from it, so GEN stages with the same NORM_pre and episodes share one copy (and e.g. one
    Gram matrix for k-means++) instead of each making their own."""
    pre_key, name, opts = key
    grouped = [eps[j].grouped[pre_key] for j in ids]
    coupled = get("gen", name).coupled
    chunks = [[i] for i in range(len(ids))] if coupled else _chunks(grouped, max_elements)
    if get("gen", name).seeded and device.type == "cpu":  # twins: run on their one support tensor
        chunks = [part for chunk in chunks for part in _split_twins(chunk, [eps[j] for j in ids], grouped)]
    results: dict[int, GenResult] = {}  # by position in ids: chunks group episodes by width
    for chunk in chunks:
        start = _tick(device)
        members = [eps[ids[i]] for i in chunk]
        # keyed by twin group, so twins (one support tensor) share the batch and its memo
        skey = (pre_key, tuple(ep.same_as for ep in members))
        if skey not in stacks:
            stacks[skey] = (*_stack([grouped[i] for i in chunk]), {})
        ctx = GenContext(
            classes=torch.cat([ep.classes for ep in members]),
            norm_pre=str(norm_pre),
            reference=members[0].reference,  # a run's episodes share one reference
            dataset=source[0],
            backbone=source[1],
            validation=_validation(members[0], norm_pre) if coupled else None,  # coupled: one episode
            text=_text(members) if get("gen", name).needs_text else None,
            memo=stacks[skey][2],
        )
        batch = _generate_batched(name, stacks[skey][:2], [grouped[i] for i in chunk],
                                  [ep.support.seed for ep in members], dict(opts), ctx)
        results.update(zip(chunk, batch))
        per_episode = (_tick(device) - start) / len(chunk)
        for ep in members:
            ep.seconds[("gen", key)] = per_episode
    return [results[i] for i in range(len(ids))]


def _validation(ep: _Prepared, norm_pre: StageSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The episode's validation samples through the support's NORM_pre (GenContext.validation)."""
    if ep.support.validation is None or len(ep.support.validation[1]) == 0:
        return None
    emb, labels = ep.support.validation
    x = norm_mod.apply_vector_norm(norm_pre.name, emb.to(ep.support.embeddings), ep.center,
                                   **norm_pre.kwargs("norm_pre"))
    return x, torch.as_tensor(labels).long()


def _text(members: list[_Prepared]) -> torch.Tensor:
    """The members' class text embeddings, stacked like their classes (GenContext.text)."""
    texts = [ep.support.text for ep in members]
    if any(t is None for t in texts):
        raise BenchError("a method reads class text embeddings (zeroshot, tip), but the episode carries none; "
                         "use a backbone with a text tower (openclip:..., a CLIP/SigLIP hf model)")
    for ep, t in zip(members, texts):
        if t.shape[0] != len(ep.classes):
            raise BenchError(f"the episode has {len(ep.classes)} classes but {t.shape[0]} text embeddings")
    return torch.cat(texts).to(members[0].support.embeddings)


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


def _split_twins(chunk: list[int], eps: list[_Prepared], grouped) -> list[list[int]]:
    """A chunk of identical episodes (every seed of ``shots=all``) as one chunk per episode,
    when their support is large.

    A seeded generator runs once per seed even on twins; stacking their shared support would
    copy it once per seed (a 50 MB copy for 5 seeds of 10 classes x 500 x 512) and push the
    batch out of cache, while each seed alone reads the one shared tensor. A small support is
    still stacked: there, per-call overhead costs more than the copy. On CPU a row does not
    depend on its batch, so the results are the same either way; on CUDA a batched product's
    bits can depend on the batch size, so there twins stay stacked as they always were.
    """
    if len(chunk) > 1 and len({eps[i].same_as for i in chunk}) == 1 and grouped[chunk[0]][0].numel() >= _SPLIT_TWINS:
        return [[i] for i in chunk]
    return [chunk]


_SPLIT_TWINS = 1 << 20  # values per episode (4 MB of float32) from which twins run apart


def _chunks(grouped, max_elements: int) -> list[list[int]]:
    """Runs of episodes of one padded width (their largest class) whose batch stays under
    ``max_elements``, in order within each width.

    Episodes of different widths never share a batch: padding a class further can change the
    bits of a product that sums over its samples, and which way k-means++ seeds
    (:func:`~bench.imprint.kmeans.seeding_gram_pays` reads the width), so an episode's heads
    would depend on the other episodes beside it, and on how episodes are split over processes.
    """
    by_width: dict[int, list[int]] = {}
    for i, (b, _) in enumerate(grouped):
        by_width.setdefault(b.shape[1], []).append(i)
    chunks: list[list[int]] = []
    for members in by_width.values():
        current: list[int] = []
        rows = 0
        for i in members:
            b = grouped[i][0]
            if current and (rows + b.shape[0]) * b.shape[1] * b.shape[2] > max_elements:
                chunks.append(current)
                current, rows = [], 0
            current.append(i)
            rows += b.shape[0]
        chunks.append(current)
    return chunks


def _generate_batched(name, stack, grouped, seeds, opts, ctx: GenContext) -> list[GenResult]:
    """One GEN call over every episode's classes (``stack``, from :func:`_stack`)."""
    x, mask = stack
    rng = RowRandom([(seed, len(b)) for seed, (b, _) in zip(seeds, grouped)])
    res = generate(name, x, mask, rng, ctx, **opts)
    if len(grouped) == 1:
        return [res]  # one episode is the whole batch: nothing to split or trim
    out, start = [], 0
    for b, _ in grouped:
        stop = start + len(b)
        # Trim proxy slots that only exist because a larger episode shares the batch.
        k = min(res.proxies.shape[1], b.shape[1]) if name == "all" else res.proxies.shape[1]
        bias = None if res.bias is None else res.bias[start:stop, :k]
        out.append(GenResult(res.proxies[start:stop, :k], res.mask[start:stop, :k],
                             res.effective_k[start:stop], bias, res.chosen if len(grouped) == 1 else None))
        start = stop
    return out


def score_heads(heads: Sequence[ImprintedHead], queries: torch.Tensor) -> list[torch.Tensor]:
    """Each head's (N, C) class scores, equal to ``head(queries)``.

    Query normalisations and query-proxy matrices are computed once for all heads that share
    them (the same NORM_inf and centre; the same proxies and matrix kind), and so are the class
    scores of heads whose AGG reads the same matrix with the same proxy labels and bias (e.g.
    every seed of ``shots=all`` for an unseeded GEN, or ``kmeans:k=1`` beside ``mean``); each
    such head gets its own copy, so a caller may change one head's scores in place.
    """
    check_embeddings(queries, "query embeddings")
    normed: dict[tuple, torch.Tensor] = {}
    matrices: dict[tuple, torch.Tensor] = {}
    terms: dict[tuple, dict[str, torch.Tensor]] = {}  # the query side of a distance, once per query set
    plans: dict[tuple, tuple] = {}  # what a spec's stages say, read from the registries once per spec
    reduced: dict[tuple, torch.Tensor] = {}  # (AGG, matrix, proxy labels, classes, bias) -> class scores
    out = []
    for head in heads:
        buffers = head._buffers  # read once: nn.Module attribute lookups add up over thousands of heads
        proxies, center, bias = buffers["proxies"], buffers["center"], buffers["bias"]
        if proxies.shape[1] != queries.shape[1]:
            check_embeddings(queries, "query embeddings", proxies.shape[1])  # raises the clear error
        spec = head.spec
        plan_key = (id(spec), head.unit_inputs)  # heads hold their spec, so ids stay valid here
        if plan_key not in plans:
            inf = spec.norm_inf
            plans[plan_key] = (str(inf), inf.method("norm_inf").needs_reference, inf.kwargs("norm_inf"),
                               agg_mod.matrix_kind(spec.agg, head.unit_inputs), str(spec.agg))
        inf_text, needs_center, inf_opts, matrix_kind, agg_text = plans[plan_key]
        center = center if center.numel() else None
        qkey = (inf_text, _identity(center) if needs_center else None)
        if qkey not in normed:
            normed[qkey] = norm_mod.apply_vector_norm(spec.norm_inf.name, queries, center, **inf_opts)
        q = normed[qkey]
        # Keyed by the head's own buffer, which outlives this call; a dtype-converted copy
        # could be freed and its address reused by another head's copy.
        mkey = (matrix_kind, qkey, _identity(proxies))
        labels, num_classes = buffers["proxy_labels"], len(buffers["classes"])
        rkey = (agg_text, mkey, _identity(labels), num_classes, _identity(bias) if bias.numel() else None)
        if rkey in reduced:  # the same AGG over the same inputs: the same scores (a copy costs far less)
            out.append(reduced[rkey].clone())
            continue
        if mkey not in matrices:
            tkey = (matrix_kind, qkey)
            if tkey not in terms:
                terms[tkey] = agg_mod.query_terms(matrix_kind, q)
            matrices[mkey] = agg_mod.pair_matrix(matrix_kind, q, proxies.to(q.dtype), terms[tkey])
        matrix = matrices[mkey]
        if bias.numel():
            matrix = matrix + bias.to(matrix.dtype)
        reduced[rkey] = agg_mod.reduce(spec.agg, matrix, matrix_kind, labels, num_classes)
        out.append(reduced[rkey])
    return out


def _identity(t: torch.Tensor | None) -> tuple | None:
    """Which tensor this is, by storage: heads built together share proxy and centre tensors."""
    if t is None:
        return None
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
