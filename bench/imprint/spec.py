"""Method specs: one string names one training-free head.

A spec has five stages separated by ``/``::

    NORM_pre / GEN / NORM_post / NORM_inf / AGG

and a stage may carry options after a colon, e.g. ``l2/kmeans:k=20/l2/l2/max`` or
``none/mean/none/none/mnn:m=1,metric=euclidean``. Names and options come from the stage
registries (:mod:`bench.imprint.registry`). ``str(spec)`` is the canonical form: options that
equal their default are left out and the rest are written in schema order, so
``MethodSpec.parse(str(spec)) == spec`` always holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError
from bench.imprint.registry import REGISTRY, REQUIRED, STAGES, Method, get


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        # %g's 6 digits when they give the value back, else repr's shortest exact form: two specs
        # whose options differ in the 7th digit must not share a name (grids key stages by it)
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class StageSpec:
    """One stage: a name from its registry and the options that differ from the defaults."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, stage: str, text: str) -> StageSpec:
        name, _, rest = text.strip().partition(":")
        name = name.strip()
        method = get(stage, name)
        given: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq:
                raise BenchError(f"option '{item}' of {stage} '{name}' must be key=value")
            if key not in method.options:
                known = ", ".join(method.options) or "none"
                raise BenchError(f"unknown option '{key}' for {stage} '{name}'; known options: {known}")
            if key in given:
                raise BenchError(f"option '{key}' of {stage} '{name}' is given twice in '{text.strip()}'; give it once")
            given[key] = method.options[key].parse(raw.strip(), key, f"{stage} '{name}'")
        return cls.build(stage, name, given)

    @classmethod
    def build(cls, stage: str, name: str, given: dict[str, Any]) -> StageSpec:
        schema = get(stage, name).options
        options = []
        for key, opt in schema.items():
            if key in given:
                if given[key] != opt.default:
                    options.append((key, given[key]))
            elif opt.default is REQUIRED:
                raise BenchError(f"{stage} '{name}' needs option '{key}', e.g. '{name}:{key}=5'")
        return cls(name, tuple(options))

    def method(self, stage: str) -> Method:
        return get(stage, self.name)

    def get(self, stage: str, key: str) -> Any:
        """The option's value, falling back to the schema default."""
        opts = dict(self.options)
        return opts[key] if key in opts else get(stage, self.name).options[key].default

    def kwargs(self, stage: str) -> dict[str, Any]:
        """Every option with its value (defaults filled in), as the method function takes them."""
        return {key: self.get(stage, key) for key in get(stage, self.name).options}

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
        spec = cls.from_parts(text)
        problem = spec.problem()
        if problem:
            raise BenchError(f"method spec '{text}' is not a valid combination: {problem}")
        return cls(*(getattr(spec, s) for s in STAGES), label=label)

    @classmethod
    def from_parts(cls, text: str) -> MethodSpec:
        """Parse the five stages without checking that they combine (see :meth:`problem`)."""
        parts = text.strip().split("/")
        if len(parts) != len(STAGES):
            raise BenchError(
                f"method spec '{text}' has {len(parts)} stage(s); it needs "
                f"{len(STAGES)}: NORM_pre/GEN/NORM_post/NORM_inf/AGG, e.g. 'l2/mean/l2/l2/max'"
            )
        return cls(**{s: StageSpec.parse(s, p) for s, p in zip(STAGES, parts)})

    def problem(self) -> str | None:
        """Why this combination makes no sense, or None when it is fine: a linear GEN scored by
        an AGG that reads distances, or a method's own check (from the registries)."""
        gen, agg = self.gen.method("gen"), self.agg.method("agg")
        if gen.linear and not agg.linear_ok:
            fits = ", ".join(m.name for m in _linear_aggs())
            return (f"'{gen.name}' yields a linear classifier, not prototypes in embedding space, so only "
                    f"inner-product scoring applies ({fits})")
        for stage in STAGES:
            method = getattr(self, stage).method(stage)
            why = method.problem(self) if method.problem is not None else None
            if why:
                return why
        return None

    @property
    def max_proxies_per_class(self) -> int | None:
        """Upper bound on proxies per class; None when it depends on the support size."""
        gen = self.gen.method("gen")
        if gen.single_proxy or gen.linear:
            return 1
        if "k" in gen.options:  # by convention, an option named k is the number of proxies per class
            return self.gen.get("gen", "k")
        return None

    @property
    def name(self) -> str:
        """What tables show: the preset name when there is one, else the canonical string."""
        return self.label or str(self)

    def fields(self) -> dict[str, Any]:
        """Flat description for result tables and W&B config (one key per stage and option)."""
        out: dict[str, Any] = {"method": self.name, "spec": str(self)}
        out.update({stage: getattr(self, stage).name for stage in STAGES})
        for stage in STAGES:
            spec = getattr(self, stage)
            for key, value in spec.kwargs(stage).items():
                out[f"{stage}.{key}"] = value
        return out

    def __str__(self) -> str:
        return "/".join(str(getattr(self, s)) for s in STAGES)


def _linear_aggs() -> list[Method]:
    return [m for m in REGISTRY["agg"].values() if m.linear_ok]
