"""What a run's numbers were computed with, for run.json: library versions, the project's git
commit, the devices and the backbone's size. Everything here is read-only and never fails: a
fact that cannot be found is recorded as None, because a missing fact must not stop a run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# run.json key -> distribution name (open_clip is published as open_clip_torch)
DISTRIBUTIONS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "torchmetrics": "torchmetrics",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "transformers": "transformers",
    "datasets": "datasets",
}
GIT_TIMEOUT_S = 5.0
PACKAGE_DIR = Path(__file__).resolve().parent


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """bench, python and the libraries that change the numbers (None: not installed)."""
    import bench

    # A checkout used without installing it has no distribution metadata; its own version stands in.
    out: dict[str, str | None] = {"bench": distribution_version("imprint-bench") or bench.__version__,
                                  "python": platform.python_version()}
    out.update({key: distribution_version(dist) for key, dist in DISTRIBUTIONS.items()})
    return out


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(folder), *args], capture_output=True, text=True, check=False,
            timeout=GIT_TIMEOUT_S, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs (a network file system)
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` when ``package_dir`` is the ``bench`` folder at
    the top of a git checkout, else both None.

    The top-level check matters: an installed wheel can sit in a virtual environment inside some
    other repository, whose commit says nothing about this code. ``--no-optional-locks`` keeps
    ``git status`` from taking the index lock of a checkout someone is committing in."""
    none = {"git_commit": None, "git_dirty": None}
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() / package_dir.name != package_dir.resolve():
        return none
    commit = _git(package_dir, "rev-parse", "HEAD")
    if not commit:  # a repository without any commit yet
        return none
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A device's model name: the GPU's for CUDA, the CPU's otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name() if device.type == "cpu" else device.type


def devices() -> list[str]:
    """Every visible CUDA device's name, else the CPU's (what ran the run, not what was asked for)."""
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [cpu_name()]


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of a backbone's image tower, each shared tensor once.

    A model that wraps a joint vision-language model says which parameters are its image tower
    (``image_parameters``); the text tower is not counted, whichever family built the backbone.
    """
    params = model.image_parameters() if hasattr(model, "image_parameters") else model.parameters()
    return sum(p.numel() for p in {id(p): p for p in params}.values())
