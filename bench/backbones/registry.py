"""The backbone registry: one function per family returns a frozen embedding model.

A family is a function plus a decorator, as GEN/NORM/AGG methods are::

    @register_backbone("pixels", form="pixels:<size>", summary="raw pixels, flattened")
    def pixels(arg: str, transform: dict | None = None) -> Backbone: ...

A backbone name is ``family`` or ``family:arg`` (``tiny-digits``, ``torchvision:resnet18``,
``checkpoint:/path/model.safetensors``); the family's function gets ``arg`` and the options it
names in its signature (``weights``, ``pool``, ``pooling``, ``config``, ``transform``). So which
option applies to which family is read from the functions, and a user's family registered from
a plugin (the run config's ``plugins``) is known to errors, ``--dry-run`` and runs alike.

This module is a leaf: the built-in families register themselves in ``builtin.py`` and
``families.py``, which ``bench.backbones`` imports.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from bench.backbones.base import Backbone
from bench.errors import BenchError

__all__ = ["Backbone", "Family", "build_backbone", "check_backbone", "known_backbones", "register_backbone"]


@dataclass(frozen=True)
class Family:
    name: str
    fn: Callable[..., Backbone]
    form: str  # how a name of this family is written, e.g. timm:<name>
    summary: str
    # may carry a text tower (Backbone.text): zero-shot methods are refused otherwise. A callable
    # (arg, options) -> bool | None decides per name without building (None: known only once built).
    text: bool | Callable[[str, dict[str, Any]], bool | None] = False

    def has_text(self, arg: str, options: dict[str, Any]) -> bool | None:
        return self.text(arg, options) if callable(self.text) else self.text

    @property
    def options(self) -> tuple[str, ...]:
        """The options the family takes: its keyword parameters after the name's argument."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


FAMILIES: dict[str, Family] = {}


def register_backbone(name: str, *, form: str | None = None, summary: str = "",
                      text: bool | Callable[[str, dict[str, Any]], bool | None] = False
                      ) -> Callable[[Callable], Callable]:
    """Register ``fn(arg, **options) -> Backbone`` as the family ``name``; ``form`` shows how its
    names are written (default: the bare name); ``text``: its backbones may have a text tower."""
    if not name or any(c in name for c in ":/, "):
        raise BenchError(f"backbone family name {name!r} must be non-empty and free of : / , and spaces")

    def deco(fn: Callable) -> Callable:
        old = FAMILIES.get(name)
        # A plugin file imported again (each run stage loads the plugins) registers the same function.
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise BenchError(f"backbone family '{name}' is already registered by {old.fn.__module__}")
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise BenchError(f"backbone family '{name}': {fn.__qualname__} must take the name's argument first "
                             "(the text after 'family:', '' when there is none)")
        FAMILIES[name] = Family(name, fn, form or name, summary, text)
        return fn

    return deco


def known_backbones() -> list[str]:
    """How each registered family's names are written."""
    return [family.form for family in FAMILIES.values()]


def check_backbone(name: str, options: dict[str, Any]) -> tuple[Family, str, dict[str, Any]]:
    """The family, its argument and the options it takes, without building anything: an unknown
    family, or an option set for a family that does not take it, is a one-line error. An option
    left at None counts as not set."""
    family_name, _, arg = name.partition(":")
    family = FAMILIES.get(family_name)
    if family is None:
        raise BenchError(f"unknown backbone '{name}'; known: {', '.join(known_backbones())}")
    for key, value in options.items():
        if key not in family.options and value is not None:
            takers = [f.name for f in FAMILIES.values() if key in f.options]
            raise BenchError(f"backbone.{key} does not apply to {name}; it applies to "
                             f"{', '.join(takers) or 'no registered family'}")
    return family, arg, {k: v for k, v in options.items() if k in family.options}


def build_backbone(name: str, **options: Any) -> Backbone:
    """Build a backbone by name (see the module docstring); ``options`` as the run config's
    ``backbone`` section gives them."""
    family, arg, taken = check_backbone(name, options)
    return family.fn(arg, **taken)
