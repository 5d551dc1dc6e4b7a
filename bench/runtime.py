"""How a bench process behaves, written once: Lightning kept quiet, torch threads shared out,
W&B runs opened in one vocabulary of modes, file-name slugs, and atomic writes.

Every subsystem (runs, reports, diagnostics, weight space, scripts) calls these; none keeps a
copy with rules of its own.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.errors import BenchError

# ---- Lightning, quiet --------------------------------------------------------------------------
_NOISE = (
    ".*does not have many workers.*",
    ".*configure_optimizers.*",
    ".*`training_step` returned `None`.*",
    ".*Starting from v1.9.0, `tensorboardX` has been removed.*",
    ".*litlogger.*",
    # Lightning 2.6 asks torch's pytree about LeafSpec in a way torch 2.14 deprecates; it concerns
    # Lightning's internals, not anything a user of bench can change.
    ".*LeafSpec.*",
    ".*Couldn't infer the batch indices.*",
    ".*number of training batches.*",
    ".*GPU available.*",
    ".*TPU available.*",
    ".*that has Tensor Cores.*",
)


def quiet_lightning() -> None:
    """Our progress bars and tables own the terminal: Lightning's banners and the warnings about
    its own internals are noise to a bench user."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


# ---- threads -----------------------------------------------------------------------------------
USER_THREADS_ENV = "BENCH_USER_OMP_NUM_THREADS"


def remember_user_threads() -> None:
    """Record whether the user set OMP_NUM_THREADS, before Lightning launches processes (it sets
    OMP_NUM_THREADS in each). An empty record means "not set"; launched processes inherit the
    record, so every process keeps the user's choice and only the user's. Runs on import."""
    os.environ.setdefault(USER_THREADS_ENV, os.environ.get("OMP_NUM_THREADS", ""))


remember_user_threads()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM step or taskset sees fewer
    than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_share(local_processes: int = 1) -> int:
    """torch threads for one of ``local_processes`` processes on a node: the user's choice
    (BENCH_THREADS, or OMP_NUM_THREADS as set before bench started), else an equal share of the
    CPUs this process may use. Oversubscribed torch threads stall some ops by up to 100x."""
    chosen = os.environ.get("BENCH_THREADS") or os.environ.get(USER_THREADS_ENV)
    if chosen:
        try:
            return max(1, int(chosen))
        except ValueError as err:
            raise BenchError(f"thread count '{chosen}' (BENCH_THREADS or OMP_NUM_THREADS) is not an "
                             "integer; set it to e.g. 2") from err
    return max(1, available_cpus() // max(1, local_processes))


def configure_threads(local_processes: int = 1) -> int:
    """Set this process's torch threads to :func:`thread_share`; returns the count."""
    torch.set_num_threads(thread_share(local_processes))
    return torch.get_num_threads()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``count`` torch threads inside the block, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def deterministic_ops() -> Iterator[None]:
    """Torch's deterministic kernels inside the block, the caller's setting restored after.

    With 2 threads, two processes fitting SNE from one seed on the 400-network zoo differed in the
    last bits after a few epochs, and hundreds of steps grew that into different encoders. With
    deterministic kernels fits agree bit for bit across processes. Scoped, so the rest of the
    process keeps its own setting.
    """
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


# ---- Weights & Biases --------------------------------------------------------------------------
WANDB_MODES = ("auto", "offline", "online", "disabled")


def has_wandb_credentials() -> bool:
    """An API key in the environment or a netrc entry; the key itself is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str, what: str = "wandb.mode") -> str:
    """offline, online or disabled. ``auto`` is online only with credentials; WANDB_MODE=offline
    or disabled in the environment wins over auto and online (a cluster without network sets it)."""
    if mode not in WANDB_MODES:
        raise BenchError(f"{what} '{mode}' is not one of {', '.join(WANDB_MODES)}")
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "disabled") and mode in ("auto", "online"):
        return env
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return mode


def _wandb_target(mode: str, save_dir: Path) -> tuple[str, Path]:
    """The resolved mode and the run's folder, made and absolute: W&B's service process keeps the
    working directory it started in. W&B's own banners stay quiet, as in every bench run."""
    mode = resolve_wandb_mode(mode)
    save_dir = Path(save_dir).resolve()
    if mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        save_dir.mkdir(parents=True, exist_ok=True)
    return mode, save_dir


def wandb_logger(mode: str, save_dir: Path, name: str, config: dict[str, Any], project: str = "bench",
                 entity: str | None = None, group: str | None = None, job_type: str | None = None):
    """A Lightning WandbLogger in the resolved mode, or None when disabled."""
    mode, save_dir = _wandb_target(mode, save_dir)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=project, entity=entity, name=name, group=group, job_type=job_type,
                       save_dir=str(save_dir), offline=(mode == "offline"), config=config,
                       reinit="create_new")


def wandb_run(mode: str, save_dir: Path, name: str, config: dict[str, Any], project: str = "bench",
              entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
              job_type: str | None = None):
    """A plain ``wandb.init`` run in the resolved mode (for logging outside a Trainer), or None."""
    mode, save_dir = _wandb_target(mode, save_dir)
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=project, entity=entity, name=name, group=group, tags=tags or [],
                      job_type=job_type, dir=str(save_dir), mode=mode, config=config,
                      reinit="create_new", settings=wandb.Settings(silent=True, console="off"))


def wandb_where(run) -> str:
    """Where a run went: its URL when it was synced online, else the folder of its offline files."""
    url = getattr(run, "url", None)
    if url and run.settings.mode == "online":
        return url
    return str(Path(run.dir).parent)


def finish_wandb(logger_or_run) -> str | None:
    """Close a WandbLogger or a run; return where it went."""
    if logger_or_run is None or logger_or_run is False:
        return None
    run = getattr(logger_or_run, "experiment", logger_or_run)
    where = wandb_where(run)
    run.finish()
    return where


# ---- names -------------------------------------------------------------------------------------
def slug(text: str, max_len: int = 120, keep: str = "._=-") -> str:
    """A file-name-safe form of a run, method or group name: characters outside letters, digits
    and ``keep`` become ``_``. ``=`` is kept by default (method options read as ``k=5``); W&B
    artifact names do not allow it (``keep="._-"``). Never empty; long names keep their head."""
    return re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", "_", str(text)).strip("_")[:max_len] or "x"


# ---- atomic writes -----------------------------------------------------------------------------
def _temp_beside(path: Path) -> Path:
    # Unique per process: two processes writing the same file must not share a temporary one.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one
    rename, and when it fails it is removed. A reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def replace_dir_atomic(target: str | Path, fill: Callable[[Path], None], what: str = "the folder") -> Path:
    """Build a folder with ``fill(tmp)`` beside ``target``, then swap it in: the old folder is
    renamed away first and removed only after the new one is in place, so at every moment
    ``target`` is either the old complete folder or the new complete one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise BenchError(f"cannot write {what} under {target.parent}: {err.strerror}; choose another folder") from err
    try:
        fill(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target
