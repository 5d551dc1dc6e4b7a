"""Names of the things a run writes, in one place so that readers (reports, zoos) agree."""

from __future__ import annotations

from pathlib import Path

from bench.runtime import slug


def head_path(out_dir: Path, classes: str, shots: str | int, seed: int, method: str) -> Path:
    """Where ``save_heads`` puts one head: heads/<classes>-<shots>shot-seed<seed>/<method>.safetensors."""
    return out_dir / "heads" / f"{classes}-{shots}shot-seed{seed}" / f"{slug(method)}.safetensors"
