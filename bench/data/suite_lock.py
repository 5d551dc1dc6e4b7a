"""The shipped task suites' versions, locked: ``tasks/SUITES.lock`` records per suite file its
``version`` and a sha256 of its normalised content, so a suite whose content changes while its
version stays the same is caught (results cite a suite by name and version).

Content is normalised as parsed YAML without the ``version`` key, so comments and layout may
change freely. ``python scripts/lock_suites.py`` rewrites the lock after a version bump; it
refuses a suite whose content changed under its old version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any


from bench import packaged
from bench.errors import BenchError
from bench.runtime import write_text_atomic
from bench.validation import read_yaml_mapping

LOCK_NAME = "SUITES.lock"
DEFAULT_VERSION = "1"  # TaskSuite.version's default
LOCK_COMMAND = "python scripts/lock_suites.py"


def suite_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def fingerprint(path: Path) -> dict[str, str]:
    """A suite file's version and the sha256 of its content without the version."""
    data = read_yaml_mapping(path, "suite file", mapping=False)
    version = DEFAULT_VERSION
    if isinstance(data, dict):
        data = dict(data)
        version = str(data.pop("version", DEFAULT_VERSION))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return {"version": version, "sha256": hashlib.sha256(blob.encode()).hexdigest()}


def current(root: Path) -> dict[str, dict[str, str]]:
    return {p.relative_to(root).as_posix(): fingerprint(p) for p in suite_files(root)}


def read_lock(root: Path) -> dict[str, dict[str, str]]:
    path = root / LOCK_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["suites"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BenchError(f"{path} is not a suite lock ({err}); delete it and run `{LOCK_COMMAND}`") from err


def unbumped(root: Path) -> list[str]:
    """Suites whose content changed while their version stayed the locked one."""
    lock = read_lock(root)
    return [f"task suite {name}: its content changed but its version is still '{now['version']}'; bump its version "
            f"(version: ... in the file), then run `{LOCK_COMMAND}`"
            for name, now in current(root).items()
            if name in lock and lock[name]["version"] == now["version"] and lock[name]["sha256"] != now["sha256"]]


def problems(root: Path) -> list[str]:
    """Everything that makes the lock disagree with the suite files, one line each."""
    lock, now = read_lock(root), current(root)
    out = unbumped(root)
    out += [f"task suite {name} (version {fp['version']}) is not in {LOCK_NAME}; run `{LOCK_COMMAND}`"
            for name, fp in now.items() if name not in lock]
    out += [f"task suite {name}: version {lock[name]['version']} -> {fp['version']} is not locked yet; "
            f"run `{LOCK_COMMAND}`" for name, fp in now.items()
            if name in lock and lock[name]["version"] != fp["version"]]
    out += [f"{LOCK_NAME} lists {name}, which no longer exists; run `{LOCK_COMMAND}`" for name in lock if name not in now]
    return out


def write_lock(root: Path) -> Path:
    """Record every suite's version and content; a changed suite must have a new version first."""
    refused = unbumped(root)
    if refused:
        raise BenchError(refused[0] + (f" ({len(refused) - 1} more suites too)" if len(refused) > 1 else ""))
    path = root / LOCK_NAME
    doc: dict[str, Any] = {"about": f"versions and content hashes of the task suites; rewrite with `{LOCK_COMMAND}`",
                           "suites": current(root)}
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Lock (or --check) the versions of the shipped task suites.")
    parser.add_argument("--check", action="store_true", help="only report suites the lock disagrees with")
    parser.add_argument("--root", type=Path, default=packaged.folder("tasks").resolve(), help="the suites folder (tasks/)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            found = problems(args.root)
            print("\n".join(found) or f"{args.root / LOCK_NAME} is up to date")
            return 1 if found else 0
        print(f"wrote {write_lock(args.root)}")
        return 0
    except BenchError as err:
        print(f"error: {err}")
        return 2
