import os
from pathlib import Path

import pytest
import torch

# W&B never reaches the network from tests, and never asks for a login.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture
def blobs():
    """Two well separated classes per dimension, small enough to reason about."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    x = centres.repeat_interleave(10, 0) + 0.3 * torch.randn(30, 3, generator=g)
    y = torch.arange(3).repeat_interleave(10)
    return x, y


_FORK_SERVER = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """Start the fork server as soon as a collected test needs it: its imports then run while the
    tests before that one do."""
    if not config.option.collectonly and any("forks" in getattr(item, "fixturenames", ()) for item in items):
        from tests.forkserver import ForkServer

        config.stash[_FORK_SERVER] = server = ForkServer()
        config.add_cleanup(server.close)


@pytest.fixture(scope="session")
def forks(pytestconfig, tmp_path_factory):
    """Separate processes forked from a server that imported bench once (tests/forkserver.py)."""
    from tests.forkserver import ForkServer

    server = pytestconfig.stash.get(_FORK_SERVER, None) or ForkServer()
    server.folder = tmp_path_factory.mktemp("forks")
    yield server
    server.close()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory):
    """The quickstart's cache: tiny-digits embeddings of the digits train and test splits, extracted
    once per session (in this process, as `bench extract` with configs/quickstart.yaml does).

    Shared, so read only: a test that may write into a cache takes a copy (`copy_cache`); the
    session fails at the end if anything in it changed."""
    from bench import pipeline
    from bench.config import load_config
    from bench.runtime import quiet_lightning, torch_threads

    root = tmp_path_factory.mktemp("quickstart-cache")
    cfg = load_config(QUICKSTART, [f"cache_dir={root}", "wandb.mode=disabled"])
    quiet_lightning()
    with torch_threads(torch.get_num_threads()):
        pipeline.extract_stage(cfg)
    before = _tree(root)
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 2  # train and test
    yield root
    assert _tree(root) == before, "a test wrote into the shared quickstart cache; copy it with copy_cache"


@pytest.fixture(scope="session")
def report_of_two_runs(tmp_path_factory):
    """One report of two runs (a: base and novel classes; b: another backbone, novel only), for
    the tests that only read a report: figures take most of a report's time. Read only; the
    session fails at the end if anything in it changed."""
    from bench.report.build import build_report
    from tests.helpers import make_rows, make_run

    root = tmp_path_factory.mktemp("report-of-two-runs")
    make_run(root / "runs" / "a", make_rows(subsets=("base", "novel")))
    make_run(root / "runs" / "b", make_rows(backbone="other-net", offset=-0.05, seed=1))
    report = build_report([str(root / "runs" / "*")], root / "rep")
    before = _tree(root)
    yield root, report
    assert _tree(root) == before, "a test wrote into the shared report; build its own"
