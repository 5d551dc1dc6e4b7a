"""Registries of the method space, one per stage: NORM_pre, GEN, NORM_post, NORM_inf, AGG.

A method is a function plus a decorator, in the manner of timm's ``register_model``::

    @register_gen("median", options={"kind": Option(str, "coordinate", choices=(...))},
                  one_sample_identity=True, summary="coordinate-wise or geometric median")
    def gen_median(x, mask, *, kind): ...

The decorator declares the method's name, its typed options (which the spec parser checks) and
the facts the grid engine uses to share work: whether a class's proxies depend on the other
classes, when it equals ``all`` (k >= the class size) and so on. Whether a GEN draws random
numbers is read from its signature (it takes an ``rng``), so it cannot be forgotten.
``bench methods``, the spec parser, the grid and the README's method table all read these
registries, so a method registered from a user's own code is a first-class method everywhere.

This module is a leaf: the built-in methods register themselves in ``norm.py``, ``gen.py`` and
``agg.py``, which ``bench.imprint`` imports. Methods that live in optional modules (heavy
dependencies) are named in ``LAZY`` and imported the first time a spec names them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.errors import BenchError

STAGES = ("norm_pre", "gen", "norm_post", "norm_inf", "agg")
STAGE_TITLES = {
    "norm_pre": "NORM_pre (support)",
    "gen": "GEN (proxies per class)",
    "norm_post": "NORM_post (proxies)",
    "norm_inf": "NORM_inf (queries)",
    "agg": "AGG (class scores)",
}
REQUIRED = object()  # marks an option without a default


@dataclass(frozen=True)
class Option:
    """A typed method option: ``kind`` (int, float, str or bool) with its constraints."""

    kind: type
    default: Any = REQUIRED
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive lower bound
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None  # inclusive upper bound

    def describe(self) -> str:
        """The accepted form, for error messages and ``bench methods``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        words = {int: "an int", float: "a finite float", str: "a string", bool: "true or false"}
        text = words.get(self.kind, self.kind.__name__)
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {_format(self.minimum)}")
        if self.above is not None:
            bounds.append(f"> {_format(self.above)}")
        if self.maximum is not None:
            bounds.append(f"<= {_format(self.maximum)}")
        return text + (" " + " and ".join(bounds) if bounds else "")

    def parse(self, raw: str, key: str, where: str) -> Any:
        """A value from its text, or a one-line error naming the option, where it is, the value
        and the accepted form."""
        bad = BenchError(f"option {key}={raw} of {where} is not valid: expected {self.describe()}")
        try:
            if self.kind is bool:
                if raw.lower() not in ("true", "false"):
                    raise bad
                value: Any = raw.lower() == "true"
            elif self.kind is int:
                value = int(raw)
            elif self.kind is float:
                value = float(raw)
            else:
                value = self.kind(raw)
        except ValueError:
            raise bad from None
        return self.check(value, bad)

    def check(self, value: Any, bad: BenchError) -> Any:
        if self.kind is float and not math.isfinite(value):
            raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.minimum is not None and value < self.minimum:
            raise bad
        if self.above is not None and value <= self.above:
            raise bad
        if self.maximum is not None and value > self.maximum:
            raise bad
        return value


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@functools.lru_cache(maxsize=None)
def _extra_keywords(fn: Callable) -> frozenset[str]:
    # inspect.signature costs tens of microseconds and the grid asks once per head
    params = inspect.signature(fn).parameters
    return frozenset(p for p in ("rng", "ctx") if p in params)


@dataclass(frozen=True)
class Method:
    """One registered method and the facts the grid engine reads."""

    stage: str
    name: str
    fn: Callable
    options: dict[str, Option] = field(default_factory=dict)
    summary: str = ""
    reference: str = ""
    # GEN facts (seeded, below, is read from the signature)
    coupled: bool = False  # a class's proxies depend on the episode's other classes
    linear: bool = False  # rows of a linear classifier, one per class (scored by inner product)
    sample_proxies: bool = False  # proxies are support samples, so they keep the samples' norm
    single_proxy: bool = False  # exactly one proxy per class whatever the options
    k_option: str | None = None  # with this many proxies >= a class's size, the result is `all`
    one_sample_identity: bool = False  # the proxy of a one-sample class is that sample (`all`)
    simplify: Callable[[dict[str, Any]], tuple[str, dict[str, Any]] | None] | None = None
    needs_reference: bool = False  # reads reference statistics (e.g. base-class means)
    training_free: bool = True  # False for fitted heads (gradient-based, e.g. logreg): tables mark their rows
    needs_text: bool = False  # reads the classes' text embeddings (GenContext.text): a text tower is required
    needs_support: bool = True  # False: builds its head without support samples, so it also runs at 0 shots
    # NORM facts
    unit: bool = False  # output rows are l2-normalised
    # AGG facts
    matrix: Callable[[dict[str, Any], bool], str] | None = None  # which query-proxy matrix it reads
    linear_ok: bool = False  # applies to the rows of a linear classifier (a `linear` GEN)
    # spec-level check: (MethodSpec) -> why the combination makes no sense, or None
    problem: Callable[[Any], str | None] | None = None

    @property
    def takes(self) -> frozenset[str]:
        """Keyword arguments beyond the options that the function accepts (rng, ctx)."""
        return _extra_keywords(self.fn)

    @property
    def seeded(self) -> bool:
        """Draws random numbers (takes an ``rng``): the episode's seed is one of its inputs, so
        identical episodes under different seeds do not share its result."""
        return "rng" in self.takes

    def option_text(self) -> str:
        """``name[:opt=default,...]`` as the README's method table shows it."""
        if not self.options:
            return f"`{self.name}`"
        parts = [f"{k}={'K' if o.default is REQUIRED else _format(o.default)}" for k, o in self.options.items()]
        required = [p for p, o in zip(parts, self.options.values()) if o.default is REQUIRED]
        optional = [p for p, o in zip(parts, self.options.values()) if o.default is not REQUIRED]
        text = self.name + (":" + ",".join(required) if required else "")
        if optional:
            text += ("[," if required else "[:") + ",".join(optional) + "]"
        return f"`{text}`"


REGISTRY: dict[str, dict[str, Method]] = {stage: {} for stage in STAGES}
# Methods in optional modules, imported the first time a spec names them.
LAZY: dict[tuple[str, str], str] = {("gen", "d2nwg"): "bench.weightspace.generator.d2nwg"}


def _register(stages: tuple[str, ...], name: str, **facts: Any) -> Callable[[Callable], Callable]:
    for stage in stages:
        if stage not in REGISTRY:
            raise BenchError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    if not name or any(c in name for c in "/:|,=[] "):
        raise BenchError(f"method name {name!r} must be non-empty and free of / : | , = [ ] and spaces")

    def deco(fn: Callable) -> Callable:
        for stage in stages:
            old = REGISTRY[stage].get(name)
            if old is not None and old.fn is not fn and (old.fn.__module__, old.fn.__qualname__) != (
                fn.__module__, fn.__qualname__
            ):
                raise BenchError(f"{stage} method '{name}' is already registered by {old.fn.__module__}")
            REGISTRY[stage][name] = Method(stage, name, fn, **facts)
        return fn

    return deco


def register_norm(name: str, *, stages: tuple[str, ...], summary: str, reference: str = "",
                  unit: bool = False, needs_reference: bool = False,
                  options: dict[str, Option] | None = None) -> Callable[[Callable], Callable]:
    """A normalisation. For ``norm_pre``/``norm_inf``: ``fn(x, *, center, **options)`` on rows of
    any leading shape; for ``norm_post``: ``fn(proxies, *, reference, **options)`` on (P, D)."""
    return _register(stages, name, options=dict(options or {}), summary=summary, reference=reference,
                     unit=unit, needs_reference=needs_reference)


def register_gen(name: str, *, summary: str, reference: str = "", options: dict[str, Option] | None = None,
                 seeded: bool | None = None, **facts: Any) -> Callable[[Callable], Callable]:
    """A generator: ``fn(x, mask, [*, rng], [ctx], **options) -> GenResult`` on a padded
    (C, S, D) batch of support with a (C, S) mask of real samples. See :class:`Method` for the
    facts (coupled, linear, k_option, ...). A generator that takes ``rng`` is seeded; ``seeded``
    may say so too, and is refused when the signature says otherwise."""
    register = _register(("gen",), name, options=dict(options or {}), summary=summary, reference=reference,
                         **facts)

    def deco(fn: Callable) -> Callable:
        takes_rng = "rng" in _extra_keywords(fn)
        if seeded is not None and seeded != takes_rng:
            raise BenchError(
                f"GEN '{name}' declares seeded={seeded} but {fn.__qualname__} takes an rng argument, so its "
                "proxies change with the episode's seed; drop seeded=False" if takes_rng else
                f"GEN '{name}' declares seeded={seeded} but {fn.__qualname__} takes no rng argument; a seeded "
                "GEN draws from `*, rng` (add it to the signature), an unseeded one drops seeded=True")
        return register(fn)

    return deco


def register_agg(name: str, *, summary: str, matrix: Callable[[dict[str, Any], bool], str],
                 reference: str = "", options: dict[str, Option] | None = None, linear_ok: bool = False,
                 problem: Callable[[Any], str | None] | None = None) -> Callable[[Callable], Callable]:
    """An aggregation: ``fn(matrix, kind, proxy_labels, num_classes, **options) -> (N, C)``, where
    ``matrix(options, unit_inputs)`` names the query-proxy matrix it reads: ``dot`` (inner
    products) or a distance metric (``euclidean``, ``cosine``, ...)."""
    return _register(("agg",), name, options=dict(options or {}), summary=summary, reference=reference,
                     matrix=matrix, linear_ok=linear_ok, problem=problem)


def get(stage: str, name: str) -> Method:
    """The registered method, importing it first if it lives in an optional module."""
    methods = REGISTRY[stage]
    if name not in methods and (stage, name) in LAZY:
        try:
            importlib.import_module(LAZY[(stage, name)])
        except ImportError as err:
            raise BenchError(f"{stage} '{name}' needs a package that is not installed: {err}") from err
    if name not in methods:
        raise BenchError(f"unknown {stage} method '{name}'; known: {', '.join(known(stage))}")
    return methods[name]


def known(stage: str) -> list[str]:
    return list(dict.fromkeys([*REGISTRY[stage], *(n for s, n in LAZY if s == stage)]))


def load_lazy() -> list[str]:
    """Import every optional method module; returns why each one that failed could not load."""
    problems = []
    for (stage, name), module in LAZY.items():
        if name not in REGISTRY[stage]:
            try:
                importlib.import_module(module)
            except ImportError as err:
                problems.append(f"{stage} '{name}' unavailable: {err}")
    return problems


def method_table() -> str:
    """The README's method table (markdown), read from the registries: one row per method,
    listing every stage it serves."""
    load_lazy()
    rows: dict[tuple[str, Callable], list[str]] = {}
    for stage in STAGES:
        for method in REGISTRY[stage].values():
            rows.setdefault((method.name, method.fn), []).append(stage)
    lines = ["| stage | method | options | what it does |", "| --- | --- | --- | --- |"]
    for (name, _), stages in rows.items():
        method = REGISTRY[stages[0]][name]
        where = ", ".join(STAGE_TITLES[s].split(" ")[0] for s in stages)
        opts = "; ".join(f"{k}: {o.describe()}" for k, o in method.options.items()) or "-"
        source = f" ({method.reference})" if method.reference else ""
        lines.append(f"| {where} | {method.option_text()} | {opts} | {method.summary}{source} |")
    return "\n".join(lines)
