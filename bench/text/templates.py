"""Prompt templates for zero-shot heads: the CLIP paper's 80 ImageNet templates and the per-dataset
sets CLIP_benchmark ships, read from ``bench/assets/zeroshot_templates.json``."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from bench.errors import BenchError

ASSET = Path(__file__).resolve().parent.parent / "assets" / "zeroshot_templates.json"
DEFAULT_SET = "imagenet"


@functools.lru_cache(maxsize=1)
def _asset() -> dict:
    return json.loads(ASSET.read_text())


def template_sets() -> dict[str, list[str]]:
    return dict(_asset()["templates"])


def _normalise(name: str) -> str:
    """``tv:OxfordIIITPet`` -> ``oxfordiiitpet``; ``hf:clip-benchmark/wds_vtab-eurosat`` -> ``eurosat``."""
    name = name.lower().rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    name = re.sub(r"^(wds_)?(vtab-)?", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


def set_for(*names: str | None) -> str:
    """The template set of the first name (dataset, then task) that has one, else imagenet's."""
    sets, aliases = _asset()["templates"], _asset()["aliases"]
    for name in names:
        if not name:
            continue
        key = _normalise(name)
        key = aliases.get(key, key)
        if key in sets:
            return key
    return DEFAULT_SET


def templates_for(choice: str | list[str] | None, *names: str | None) -> tuple[str, list[str]]:
    """(set name, templates): ``choice`` a set name, or a list of templates (named ``custom``), or
    None for the set of the dataset/task ``names``."""
    sets = _asset()["templates"]
    if isinstance(choice, list):
        if not choice:
            raise BenchError("text.templates is an empty list; give templates such as 'a photo of a {c}.'")
        for t in choice:
            _check(t)
        return "custom", list(choice)
    name = choice or set_for(*names)
    if name not in sets:
        raise BenchError(f"unknown template set '{name}'; known: {', '.join(sorted(sets))}, or a list of templates")
    return name, list(sets[name])


def _check(template: str) -> None:
    if "{c}" not in template and "{}" not in template:
        raise BenchError(f"template {template!r} has no place for the class name; write {{c}} (or {{}}) where "
                         "it goes, e.g. 'a photo of a {c}.'")


def prompts(class_name: str, templates: list[str]) -> list[str]:
    """Each template with the class name filled in ({c} or {})."""
    out = []
    for t in templates:
        _check(t)
        out.append(t.replace("{c}", class_name) if "{c}" in t else t.replace("{}", class_name, 1))
    return out
