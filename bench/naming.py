"""Names of the things a run writes, in one place so that readers (reports, zoos) agree."""

from __future__ import annotations

import re
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a run or method name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def head_path(out_dir: Path, classes: str, shots: str | int, seed: int, method: str) -> Path:
    """Where ``save_heads`` puts one head: heads/<classes>-<shots>shot-seed<seed>/<method>.safetensors."""
    return out_dir / "heads" / f"{classes}-{shots}shot-seed{seed}" / f"{slug(method)}.safetensors"
