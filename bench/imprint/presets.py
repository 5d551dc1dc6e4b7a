"""Named presets for the rows people cite, and grid expansion over the method space.

Grid syntax: stages are separated by ``/`` as in a spec; ``|`` separates alternatives within a
stage, and ``[a,b]`` lists alternatives for one option value. For example::

    l2|none/kmeans:k=[1,5,20]|mean/l2/l2/max

expands to 2 x (3 + 1) = 8 specs. A grid entry may also be a preset name. Combinations that
make no sense are dropped, each with the reason (see :meth:`MethodSpec.problem`), and
duplicates (two entries naming the same head) are kept once.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from bench.errors import BenchError
from bench.imprint.registry import STAGES
from bench.imprint.spec import MethodSpec

# name -> (spec, source): the rows people cite.
PRESET_TABLE: dict[str, tuple[str, str]] = {
    # normalised mean imprinting, cosine classifier
    "qi2018": ("l2/mean/l2/l2/max", "Qi et al. 2018"),
    # mean imprinting with quantile-normalised weights
    "hosoda2024": ("none/mean/quantile/none/max", "Hosoda et al. 2024"),
    # nearest class mean by euclidean distance on raw embeddings
    "janson2022": ("none/mean/none/none/mnn:m=1", "Janson et al. 2022"),
    # multi-proxy k-means imprinting, k = 20
    "westerhoff2025": ("l2/kmeans:k=20/l2/l2/max", "Westerhoff et al. 2025"),
    # SimpleShot (CL2N): centred l2 features, euclidean nearest centroid
    "simpleshot": ("center-l2/mean/none/center-l2/mnn:m=1", "Wang et al. 2019"),
    # nearest class mean on l2-normalised embeddings (cosine NCM)
    "ncm": ("l2/mean/none/l2/mnn:m=1,metric=cosine", "cosine nearest class mean"),
    # k-nearest neighbours over the whole support set, cosine, 5 votes
    "knn": ("l2/all/none/l2/mnn:m=5,metric=cosine", "5-NN over the support set"),
    # least-squares oracle: not imprinting; uses all classes at once
    "ls-oracle": ("none/ls/none/none/max", "least-squares oracle"),
    # DINOv2's kNN evaluation: cosine over every support sample, top 20, softmax(sim / 0.07) votes
    "dinov2-knn": ("l2/all/none/l2/knn:k=20,t=0.07", "Oquab et al. 2023 (DINOv2 kNN)"),
    # CLIP's linear probe: L-BFGS logistic regression on raw features, C chosen on validation
    # (C=1 without a validation part). Gradient-based: NOT training-free.
    "logreg": ("none/logreg/none/none/max", "Radford et al. 2021 (CLIP linear probe), gradient-based"),
    # CLIP zero-shot: class text embeddings (prompt templates averaged) as the head; also at 0 shots
    "zeroshot": ("none/zeroshot/none/l2/max", "Radford et al. 2021 (CLIP zero-shot)"),
    # Tip-Adapter, training-free: zero-shot logits + alpha * cache affinities exp(-beta (1 - cos))
    "tip": ("l2/tip/l2/l2/tip:alpha=1,beta=5.5", "Zhang et al. 2022 (Tip-Adapter)"),
    # Tip-Adapter's cache model alone: needs no text tower
    "tip-cache": ("l2/all/none/l2/cache:beta=5.5", "Zhang et al. 2022 (Tip-Adapter cache, image only)"),
}
# Tip-Adapter's family: not in the default method list, whose default backbone has no text tower
TEXT_PRESETS = ("zeroshot", "tip", "tip-cache")
# Named families for the run config's `select:` (a family's member is chosen per episode on the
# task's validation part, see bench.selection): `select: [dinov2-knn, kmeans]`.
FAMILIES: dict[str, str] = {
    # DINOv2 reports kNN at k in {10, 20, 100, 200}
    "dinov2-knn": "l2/all/none/l2/knn:k=[10,20,100,200],t=0.07",
    # the k of multi-proxy k-means imprinting
    "kmeans": "l2/kmeans:k=[1,5,10,20]/l2/l2/max",
    # the least-squares oracle's ridge
    "ls": "none/ls:lam=[0.0001,0.001,0.01,0.1]/none/none/max",
    # the probe's C, as separate members (the `logreg` preset chooses C inside, warm-started)
    "logreg": "none/logreg:c=[0.001,0.01,0.1,1,10,100,1000,10000]/none/none/max",
    # Tip-Adapter's alpha (residual ratio) and beta (sharpness), a small grid around the paper's 1 and 5.5
    "tip": "l2/tip/l2/l2/tip:alpha=[0.5,1,2,4],beta=[1,3,5.5,8]",
}
PRESETS: dict[str, str] = {name: spec for name, (spec, _) in PRESET_TABLE.items()}


def resolve(method: str | MethodSpec) -> MethodSpec:
    """A preset name or a spec string (or an existing spec) as a :class:`MethodSpec`."""
    if isinstance(method, MethodSpec):
        return method
    text = str(method).strip()
    if text in PRESETS:
        return MethodSpec.parse(PRESETS[text], label=text)
    if "/" not in text:
        raise BenchError(
            f"unknown method '{text}': not a preset ({', '.join(PRESETS)}) and not a spec "
            "like 'l2/kmeans:k=20/l2/l2/max'"
        )
    return MethodSpec.parse(text)


@dataclass
class Grid:
    specs: list[MethodSpec]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (spec, reason)


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside square brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise BenchError(f"unbalanced brackets in grid '{text}'")
    parts.append("".join(cur))
    return parts


def _expand_stage(text: str) -> list[str]:
    """'kmeans:k=[1,5]|mean' -> ['kmeans:k=1', 'kmeans:k=5', 'mean']."""
    out = []
    for alt in split_top(text, "|"):
        name, _, rest = alt.partition(":")
        if not rest:
            out.append(name.strip())
            continue
        choices = []
        for item in split_top(rest, ","):
            key, _, value = item.partition("=")
            m = re.fullmatch(r"\s*\[(.*)\]\s*", value)
            values = [v.strip() for v in m.group(1).split(",")] if m else [value.strip()]
            choices.append([f"{key.strip()}={v}" for v in values])
        for combo in itertools.product(*choices):
            out.append(f"{name.strip()}:{','.join(combo)}")
    return out


def expand(entry: str) -> list[str]:
    """All spec strings a grid entry stands for (a preset name stands for itself)."""
    entry = entry.strip()
    if entry in PRESETS:
        return [entry]
    stages = split_top(entry, "/")
    if len(stages) != len(STAGES):
        raise BenchError(
            f"grid entry '{entry}' has {len(stages)} stage(s); it needs {len(STAGES)} "
            "(NORM_pre/GEN/NORM_post/NORM_inf/AGG) or a preset name"
        )
    return ["/".join(p) for p in itertools.product(*(_expand_stage(s) for s in stages))]


def expand_grid(entries: str | list[str]) -> Grid:
    """Expand grid entries into valid, unique specs, recording what was dropped and why.

    Unknown names and bad option values still raise: they are typos, not combinations.
    """
    if isinstance(entries, str):
        entries = [entries]
    grid = Grid(specs=[])
    seen: dict[MethodSpec, str] = {}
    for entry in entries:
        for text in expand(entry):
            if text in PRESETS:
                spec = resolve(text)
            else:
                spec = MethodSpec.from_parts(text)
                problem = spec.problem()
                if problem:
                    grid.dropped.append((text, problem))
                    continue
            if spec in seen:
                grid.dropped.append((text, f"same head as '{seen[spec]}'"))
                continue
            seen[spec] = spec.name
            grid.specs.append(spec)
    if not grid.specs:
        reasons = "; ".join(f"{t}: {r}" for t, r in grid.dropped) or "the grid is empty"
        raise BenchError(f"the method grid leaves no valid method ({reasons})")
    return grid
