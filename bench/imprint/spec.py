"""Method specs: one string names one training-free head.

A spec has five stages separated by ``/``::

    NORM_pre / GEN / NORM_post / NORM_inf / AGG

and a stage may carry options after a colon, e.g. ``l2/kmeans:k=20/l2/l2/max`` or
``none/mean/none/none/mnn:m=1,metric=euclidean``. ``str(spec)`` is the canonical form: options
that equal their default are left out and the rest are written in schema order, so
``MethodSpec.parse(str(spec)) == spec`` always holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError

REQUIRED = object()  # marks an option without a default


@dataclass(frozen=True)
class Option:
    kind: type
    default: Any = REQUIRED
    choices: tuple[str, ...] | None = None
    minimum: float | None = None


NORM_PRE: dict[str, dict[str, Option]] = {"none": {}, "l2": {}, "center-l2": {}}
NORM_POST: dict[str, dict[str, Option]] = {"none": {}, "l2": {}, "quantile": {}}
NORM_INF: dict[str, dict[str, Option]] = {"none": {}, "l2": {}, "center-l2": {}}
GEN: dict[str, dict[str, Option]] = {
    "mean": {},
    "kmeans": {
        "k": Option(int, minimum=1),
        "n_init": Option(int, 1, minimum=1),
        "iters": Option(int, 100, minimum=1),
    },
    "kmedoids": {"k": Option(int, minimum=1), "iters": Option(int, 50, minimum=1)},
    "random": {"k": Option(int, minimum=1)},
    "fps": {"k": Option(int, minimum=1)},
    "all": {},
    "none": {"k": Option(int, 1, minimum=1)},
    "ls": {"lam": Option(float, 1e-3, minimum=0.0)},
}
METRICS = ("cosine", "euclidean", "manhattan", "chebyshev")
AGG: dict[str, dict[str, Option]] = {
    "max": {},
    "mnn": {
        "m": Option(int, 1, minimum=1),
        "weight": Option(str, "uniform", choices=("uniform", "distance")),
        "metric": Option(str, "euclidean", choices=METRICS),
    },
}
STAGES: tuple[tuple[str, dict[str, dict[str, Option]]], ...] = (
    ("norm_pre", NORM_PRE),
    ("gen", GEN),
    ("norm_post", NORM_POST),
    ("norm_inf", NORM_INF),
    ("agg", AGG),
)
# Generators that produce one proxy per class, whatever their options.
SINGLE_PROXY_GENS = frozenset({"mean", "ls"})


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse_value(stage: str, name: str, key: str, raw: str, opt: Option) -> Any:
    try:
        value = opt.kind(raw)
    except ValueError:
        raise BenchError(
            f"option {key}={raw!r} of {stage} '{name}' must be {opt.kind.__name__}"
        ) from None
    if opt.choices is not None and value not in opt.choices:
        raise BenchError(
            f"option {key}={raw!r} of {stage} '{name}' is not one of {', '.join(opt.choices)}"
        )
    if opt.minimum is not None and value < opt.minimum:
        raise BenchError(
            f"option {key}={value} of {stage} '{name}' must be >= {_format_value(opt.minimum)}"
        )
    return value


@dataclass(frozen=True)
class StageSpec:
    """One stage: a name from its registry and the options that differ from the defaults."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, stage: str, text: str) -> StageSpec:
        registry = dict(STAGES)[stage]
        name, _, rest = text.strip().partition(":")
        name = name.strip()
        if name not in registry:
            raise BenchError(
                f"unknown {stage} method '{name}'; known: {', '.join(registry)}"
            )
        schema = registry[name]
        given: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq:
                raise BenchError(f"option '{item}' of {stage} '{name}' must be key=value")
            if key not in schema:
                known = ", ".join(schema) or "none"
                raise BenchError(
                    f"unknown option '{key}' for {stage} '{name}'; known options: {known}"
                )
            given[key] = _parse_value(stage, name, key, raw.strip(), schema[key])
        return cls.build(stage, name, given)

    @classmethod
    def build(cls, stage: str, name: str, given: dict[str, Any]) -> StageSpec:
        schema = dict(STAGES)[stage][name]
        options = []
        for key, opt in schema.items():
            if key in given:
                if given[key] != opt.default:
                    options.append((key, given[key]))
            elif opt.default is REQUIRED:
                raise BenchError(
                    f"{stage} '{name}' needs option '{key}', e.g. '{name}:{key}=5'"
                )
        return cls(name, tuple(options))

    def get(self, stage: str, key: str) -> Any:
        """The option's value, falling back to the schema default."""
        opts = dict(self.options)
        return opts[key] if key in opts else dict(STAGES)[stage][self.name][key].default

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options)


@dataclass(frozen=True)
class MethodSpec:
    """A whole head recipe. Build with :meth:`parse` or :func:`bench.imprint.resolve`."""

    norm_pre: StageSpec
    gen: StageSpec
    norm_post: StageSpec
    norm_inf: StageSpec
    agg: StageSpec
    label: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str, label: str | None = None) -> MethodSpec:
        parts = text.strip().split("/")
        if len(parts) != len(STAGES):
            raise BenchError(
                f"method spec '{text}' has {len(parts)} stage(s); it needs "
                f"{len(STAGES)}: NORM_pre/GEN/NORM_post/NORM_inf/AGG, e.g. 'l2/mean/l2/l2/max'"
            )
        stages = {s: StageSpec.parse(s, p) for (s, _), p in zip(STAGES, parts)}
        spec = cls(**stages, label=label)
        problem = spec.problem()
        if problem:
            raise BenchError(f"method spec '{text}' is not a valid combination: {problem}")
        return spec

    def problem(self) -> str | None:
        """Why this combination makes no sense, or None when it is fine."""
        if self.gen.name == "ls" and self.agg.name != "max":
            return (
                "'ls' yields a linear classifier, not prototypes in embedding space, so only "
                "'max' (inner-product) scoring applies"
            )
        if self.gen.name == "none" and self.norm_pre.name != "none":
            return "'none' draws random proxies, so a NORM_pre before it has no effect"
        if (
            self.agg.name == "mnn"
            and self.agg.get("agg", "m") > 1
            and self.max_proxies_per_class == 1
        ):
            return (
                f"mnn with m={self.agg.get('agg', 'm')} votes over one proxy per class, "
                "which only counts ties; use m=1 or a multi-proxy GEN"
            )
        return None

    @property
    def max_proxies_per_class(self) -> int | None:
        """Upper bound on proxies per class; None when it depends on the support size."""
        if self.gen.name in SINGLE_PROXY_GENS:
            return 1
        if self.gen.name == "all":
            return None
        return self.gen.get("gen", "k")

    @property
    def name(self) -> str:
        """What tables show: the preset name when there is one, else the canonical string."""
        return self.label or str(self)

    def fields(self) -> dict[str, Any]:
        """Flat description for result tables and W&B config (one key per stage and option)."""
        out: dict[str, Any] = {
            "method": self.name,
            "spec": str(self),
            "norm_pre": self.norm_pre.name,
            "gen": self.gen.name,
            "norm_post": self.norm_post.name,
            "norm_inf": self.norm_inf.name,
            "agg": self.agg.name,
        }
        for stage, _ in STAGES:
            spec = getattr(self, stage)
            for key, opt in dict(STAGES)[stage][spec.name].items():
                out[f"{stage}.{key}"] = spec.get(stage, key)
        return out

    def __str__(self) -> str:
        return "/".join(str(getattr(self, s)) for s, _ in STAGES)
