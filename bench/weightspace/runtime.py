"""What the weight-space trainers share: quiet Lightning, thread shares, W&B loggers, atomic files."""

from __future__ import annotations

import json
import logging
import netrc
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError

WANDB_MODES = ("auto", "offline", "online", "disabled")


def quiet_lightning() -> None:
    """Our progress lines and tables own the terminal; Lightning's banners are noise here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*LeafSpec.*",
                    ".*number of training batches.*", ".*GPU available.*", ".*TPU available.*"):
        warnings.filterwarnings("ignore", message=pattern)


@contextmanager
def deterministic_ops():
    """Torch's deterministic kernels inside the block, the caller's setting restored after.

    With 2 threads, two processes fitting SNE from one seed on the 400-network zoo differed in
    the last bits after a few epochs (the kernel was not pinned down: segment sums and their
    gradients alone were stable), and hundreds of steps grew that into different encoders. With
    deterministic kernels the fits agree bit for bit across processes, so a fit is a function of
    its config, seed and thread count. Scoped, so the rest of the process keeps its own setting.
    """
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def set_thread_share(processes: int = 1) -> None:
    """Each process takes its share of the CPUs unless the user set OMP_NUM_THREADS: tiny
    models on oversubscribed threads run many times slower."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, processes)))


def resolve_wandb_mode(mode: str) -> str:
    if mode not in WANDB_MODES:
        raise BenchError(f"W&B mode '{mode}' is not one of {', '.join(WANDB_MODES)}")
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "disabled") and mode in ("auto", "online"):
        return env
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


def wandb_logger(mode: str, save_dir: Path, name: str, config: dict[str, Any], project: str = "bench"):
    """A Lightning WandbLogger (offline unless there are credentials), or None when disabled."""
    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, name=name, job_type="weights-fit", save_dir=str(save_dir),
                       offline=(mode == "offline"), config=config, reinit="create_new")


def finish_wandb(logger) -> str | None:
    """Close the run; return where it went (a URL, or the folder of offline runs)."""
    if logger is None:
        return None
    run = logger.experiment
    where = getattr(run, "url", None) or str(Path(run.dir).parent.parent)
    run.finish()
    return where


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
