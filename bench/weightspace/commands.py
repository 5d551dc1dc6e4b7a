"""What the ``bench zoo``, ``bench weights`` and ``bench generator`` commands share: an argparse
that reports bad arguments as one line, fit configs read like run configs (a YAML file, then
``key=value`` overrides; the older ``--flags`` are overrides too) and saved beside each checkpoint,
and CSV files written atomically."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bench.config import load_config
from bench.errors import BenchError
from bench.runtime import write_text_atomic
from bench.validation import format_validation_error

CONFIG_YAML = "config.yaml"


class FlagParser(argparse.ArgumentParser):
    """argparse that raises BenchError instead of exiting, so the CLI prints one line."""

    def error(self, message: str):
        raise BenchError(f"{self.prog}: {message}")


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("-c", "--config", help="a YAML fit config, e.g. the config.yaml of a checkpoint (replays "
                                                "that fit)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def load_fit_config(model: type[BaseModel], args: argparse.Namespace, flags: dict[str, str]) -> Any:
    """Defaults, then ``args.config``, then each flag given (``flags``: argparse dest -> config
    key), then the ``key=value`` overrides; one line for a bad value, as for run configs."""
    given = [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in flags.items()
             if getattr(args, dest, None) is not None]
    return load_config(args.config, given + list(args.overrides), model=model)


def check_config(model: type[BaseModel], values: dict[str, Any], what: str = "config") -> Any:
    """``model`` from values built in code, with a config file's one-line error (``what`` names
    where the values came from)."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise BenchError(format_validation_error(err, model, what)) from None


def fit_config_yaml(config: BaseModel) -> str:
    """The resolved config as ``bench ... fit -c`` reads it back."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_fit_config(config: BaseModel, folder: str | Path) -> Path:
    path = Path(folder) / CONFIG_YAML
    write_text_atomic(path, fit_config_yaml(config))
    return path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """One row per dict; the columns are every key in the order first seen."""
    columns = list(dict.fromkeys(c for r in rows for c in r)) or ["id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return Path(path)
