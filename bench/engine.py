"""The imprint stage on cached embeddings: every episode of a suite through the grid engine.

Episodes (class subset x shots x seed) are grouped into batches under a memory budget, and
each batch is one :func:`~bench.imprint.build_head_grid` call: the normalised support, the
proxies and the query-proxy matrices that methods share are computed once per batch. Each
episode's queries are scored by :func:`~bench.imprint.score_heads` in chunks whose matrices stay
under the same budget, and :class:`~bench.metrics.HeadGridMetrics` evaluates every head from
one confusion matrix. There is no Lightning Trainer here: the tensors are already computed,
and a Trainer per episode costs more than the heads.

Under DDP the batches, planned from the suite alone, are dealt to ranks in turn, so a batch is
computed the same way whatever the world size, and the rows are gathered on every rank in
suite order (:func:`gather_rows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from bench.data.episodes import Episode
from bench.errors import BenchError
from bench.imprint import MethodSpec, Reference, SupportSet, build_head_grid, score_heads
from bench.imprint.gen import class_positions
from bench.metrics import HeadGridMetrics, flatten_metrics
from bench.naming import head_path
from bench.selection import MEMBER, Family, selection_rows, training_free, validation_accuracy

FLOAT_BYTES = 4


@dataclass(frozen=True)
class RunLabels:
    """What every results row says about where it comes from."""

    backbone: str
    dataset: str
    task: str
    backbone_fingerprint: str | None = None


def plan_batches(episodes: Sequence[Episode], dim: int, num_specs: int, max_bytes: int) -> list[list[int]]:
    """Consecutive episodes of one (classes, shots) group whose support-derived tensors fit
    ``max_bytes``: the support itself, its normalised copies and the proxies, estimated as
    (2 + methods) x the support's bytes. An episode larger than the budget alone is a batch of
    one (its queries are still scored in budget-sized chunks). The plan depends only on the
    suite and the budget, never on the number of processes."""
    batches: list[list[int]] = []
    used, group = 0, None
    for i, ep in enumerate(episodes):
        cost = len(ep.support) * dim * FLOAT_BYTES * (2 + num_specs)
        key = (ep.classes, ep.shots, ep.query_split)
        if batches and key == group and used + cost <= max_bytes:
            batches[-1].append(i)
            used += cost
        else:
            batches.append([i])
            used, group = cost, key
    return batches


def query_chunk_rows(heads, dim: int, max_bytes: int) -> int:
    """Query rows per chunk such that the query-proxy matrices and scores stay under ``max_bytes``."""
    per_row = dim + sum(h.proxies.shape[0] + h.num_classes for h in heads)
    return max(1, max_bytes // (FLOAT_BYTES * per_row))


def imprint_episodes(
    specs: Sequence[MethodSpec],
    episodes: Sequence[tuple[str, Episode]],
    pool: Any,
    queries: Any | None,
    labels: RunLabels,
    *,
    reference: Reference | None = None,
    max_batch_bytes: int = 1 << 30,
    rank: int = 0,
    world_size: int = 1,
    heads_dir: Path | None = None,
    progress: bool = True,
    select: Sequence[Family] = (),
    text: torch.Tensor | None = None,
    listed: int | None = None,
) -> list[dict[str, Any]]:
    """Imprint and evaluate every spec on this rank's share of the episodes.

    ``pool`` and ``queries`` are cache entries (``embeddings``, ``labels``); an episode's
    support indexes the pool, its queries the pool or the test entry. Rows carry ``_order``
    (episode, spec) so :func:`gather_rows` can restore suite order. With ``heads_dir``, every
    head is saved there (see :func:`bench.naming.head_path`). ``select`` families (whose members
    are among ``specs``) add each episode's ``@val`` and ``@oracle`` rows (:mod:`bench.selection`).
    ``text`` (classes, D): every pool class's text embedding, for the GENs that read text (zeroshot,
    tip). At 0 shots only the specs whose GEN needs no support (zeroshot) give rows.
    """
    eps = [ep for _, ep in episodes]
    dim = int(pool.embeddings.shape[1])
    # Specs after the first ``listed`` are select families' members the run did not list itself:
    # their rows stay in the results, marked, and reports leave them out (bench.selection.MEMBER).
    fields = [{**spec.fields(), "training_free": training_free(spec),
               "selection": MEMBER if listed is not None and i >= listed else "", "selected": ""}
              for i, spec in enumerate(specs)]
    members = sorted({specs.index(m) for fam in select for m in fam.members})
    # at 0 shots: specs that read no support, nor its mean (center-l2 without a reference centres on it)
    support_free = [i for i, spec in enumerate(specs) if not spec.gen.method("gen").needs_support and not (
        reference is None and any(getattr(spec, s).method(s).needs_reference for s in ("norm_pre", "norm_inf")))]
    batches = plan_batches(eps, dim, len(specs), max_batch_bytes)[rank::world_size]
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc="imprint + evaluate", unit="episode", disable=not progress)
    rows: list[dict[str, Any]] = []
    metrics: dict[tuple[int, int], HeadGridMetrics] = {}  # reset and reused: building one costs more than a small episode
    for batch in batches:
        supports = []
        for j in batch:
            ep = eps[j]
            idx = torch.as_tensor(ep.support, dtype=torch.long)
            vidx = torch.as_tensor(getattr(ep, "validation", ()), dtype=torch.long)  # pool indices
            validation = (pool.embeddings[vidx].float(), pool.labels[vidx]) if len(vidx) else None
            classes = torch.unique(torch.as_tensor(ep.classes))  # the head's class order
            supports.append(SupportSet(pool.embeddings[idx].float(), pool.labels[idx], ep.seed, classes, reference,
                                       validation=validation, text=None if text is None else text[classes]))
        # a batch is one shot count; at 0 shots only support-free specs build a head
        active = support_free if str(eps[batch[0]].shots) == "0" else list(range(len(specs)))
        grid = build_head_grid([specs[i] for i in active], supports,
                               max_batch_elements=max_batch_bytes // FLOAT_BYTES, dataset=labels.dataset,
                               backbone=labels.backbone_fingerprint) if active else []
        for col, j in enumerate(batch):
            subset, ep = episodes[j]
            if not active:
                bar.update(1)
                continue
            heads = [row[col] for row in grid]
            shape = (len(heads), len(heads[0].classes))
            # One rank scores a whole episode, so its counts must not be summed with other ranks'
            # (other episodes): no sync on compute.
            if shape not in metrics:
                metrics[shape] = HeadGridMetrics(*shape, sync_on_compute=False)
            metric = metrics[shape]
            results = _evaluate(heads, ep, pool if ep.query_split == "train" else queries, dim, max_batch_bytes, metric)
            for i, head, values in zip(active, heads, results):
                spec = specs[i]
                rows.append({
                    "_order": [j, i], "backbone": labels.backbone, "dataset": labels.dataset,
                    "task": labels.task, "classes": subset, "shots": str(ep.shots), "seed": ep.seed,
                    **({"ways": ep.ways} if getattr(ep, "ways", None) else {}),
                    **fields[i], **values, **head.summary(),
                })
                if heads_dir is not None:
                    path = head_path(heads_dir, subset, ep.shots, ep.seed, spec.name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    head.save(path)
            if select and str(ep.shots) != "0":  # at 0 shots there is no imprinted member to choose among
                if supports[col].validation is None:
                    raise BenchError(f"select: episode {subset} {ep.shots}-shot seed {ep.seed} has no validation "
                                     "samples; raise the task's validation share")
                accs = validation_accuracy([heads[i] for i in members], *supports[col].validation)
                tested = {r["_order"][1]: r for r in rows[-len(specs):] if r["_order"][0] == j}  # spec -> row
                picked = selection_rows(select, specs, tested, dict(zip(members, accs)))
                rows += [{**r, "_order": [j, len(specs) + r_i]} for r_i, r in enumerate(picked)]
            bar.set_postfix_str(f"{subset} {ep.shots}-shot seed {ep.seed}", refresh=False)  # update() redraws
            bar.update(1)
    bar.close()
    return rows


def _evaluate(heads, ep: Episode, entry: Any, dim: int, max_bytes: int,
              metric: HeadGridMetrics) -> list[dict[str, float]]:
    """Every head's metrics on the episode's queries, scored in budget-sized chunks."""
    idx = torch.as_tensor(ep.query, dtype=torch.long)
    classes = heads[0].classes
    metric.reset()
    step = query_chunk_rows(heads, dim, max_bytes)
    target = class_positions(classes, entry.labels[idx].to(classes.device), "query labels")
    for start in range(0, len(idx), step):
        scores = score_heads(heads, entry.embeddings[idx[start:start + step]].float())
        metric.update(torch.stack([s.argmax(1) for s in scores]), target[start:start + step])
    # compute squeezes one head; one tolist per metric, not one item() per head and class
    values = {k: v.reshape(len(heads), -1).tolist() for k, v in metric.compute().items()}
    names = classes.tolist()
    return [flatten_metrics({k: v[h] for k, v in values.items()}, names) for h in range(len(heads))]


def gather_rows(rows: list[dict[str, Any]], fabric: Any | None) -> list[dict[str, Any]]:
    """Every rank's rows on every rank, in suite order, without the ``_order`` key.

    Rows travel as JSON bytes in a uint8 tensor through Fabric's ``all_gather`` (padded to the
    longest rank's), so nothing is unpickled and the gather works on gloo and NCCL alike.
    """
    if fabric is not None and fabric.world_size > 1:
        blob = torch.frombuffer(bytearray(json.dumps(rows).encode()), dtype=torch.uint8)
        sizes = fabric.all_gather(torch.tensor([len(blob)], device=fabric.device)).flatten().tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[: len(blob)] = blob
        gathered = fabric.all_gather(padded.to(fabric.device)).cpu()
        rows = [r for size, part in zip(sizes, gathered) for r in json.loads(part[:size].numpy().tobytes())]
    rows = sorted(rows, key=lambda r: tuple(r["_order"]))
    return [{k: v for k, v in r.items() if k != "_order"} for r in rows]
