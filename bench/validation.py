"""One line per bad value: pydantic's validation errors, as the user should read them.

pydantic reports where a value failed (a location path that also names union members and
list positions) and why. This turns that into ``config key 'trainer.devices' = 'two' is not
valid: expected a positive int, auto, or a list of device ids``, with the accepted form taken
from the field's description.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bench.errors import BenchError


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type may hold (through Optional, Union, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, Any, type[BaseModel]]:
    """(dotted key, the innermost field's info or None, the model the last key was looked up
    in) for an error location."""
    parts: list[str] = []
    info = None
    current: type[BaseModel] | None = model
    container = model
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif current is not None:
            container = current
            parts.append(str(item))
            info = current.model_fields.get(item)
            models = _models_in(info.annotation) if info is not None else []
            current = models[0] if models else None
        else:
            break  # a union member's tag inside a plain field: the key is complete
    return ".".join(parts), info, container


def format_validation_error(err: ValidationError, model: type[BaseModel], what: str) -> str:
    """The first bad value as one line; later ones are counted, not listed."""
    seen: dict[str, str] = {}
    for e in err.errors():
        key, info, holder = _walk(model, tuple(e["loc"]))
        if key in seen:
            continue
        if e["type"] == "extra_forbidden":
            parent = key.rpartition(".")[0]
            seen[key] = (f"{what}: unknown key '{key}'; known keys in '{parent or 'root'}': "
                         f"{sorted(holder.model_fields)}")
            continue
        value = e.get("input")
        shown = f" = {value!r}" if not isinstance(value, dict) else ""
        if e["type"] == "value_error":  # a validator's own message says what is wrong
            reason = e["msg"].removeprefix("Value error, ")
            seen[key] = f"{what}: '{key}'{shown} is not valid: {reason}" if key else f"{what}: {reason}"
            continue
        accepted = getattr(info, "description", None) if info is not None else None
        seen[key] = f"{what}: '{key}'{shown} is not valid: expected {accepted or e['msg'].lower()}"
    lines = list(seen.values())
    more = f" (and {len(lines) - 1} more bad value(s))" if len(lines) > 1 else ""
    return lines[0] + more if lines else str(err)


def read_yaml_mapping(path: Path, what: str, mapping: bool = True) -> Any:
    """A YAML file's content (``{}`` when empty) with one-line errors naming ``what`` and the file:
    invalid YAML, and (with ``mapping``) anything but a mapping at the top."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise BenchError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if mapping and not isinstance(data, dict):
        raise BenchError(f"{what} {path} must hold a YAML mapping")
    return data
