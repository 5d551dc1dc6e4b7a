"""The task suites (``tasks/``) and run configs (``configs/``) shipped inside the package.

Both folders stay at the top of the repository, where users read and edit them, and ship as
package resources under ``bench/_resources/``. ``bench/_resources/tasks`` and
``bench/_resources/configs`` are symlinks to the top-level folders (committed as links), rather
than copies a build hook makes: setuptools follows a link when it copies package data, so a
wheel holds real files, while a checkout and an editable install read the top-level folders
themselves through the link, with no copy that could go stale and no build step before the
tests. (A build hook that copies into ``build/`` would not reach an editable install, which
imports from the source tree.)

One rule for both folders: a path that exists (from the working directory) wins; otherwise a
relative path under ``tasks/`` or ``configs/`` names the packaged copy, so the commands in the
docs (``bench run -c configs/examples/hf.yaml``) work from an installed wheel anywhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

FOLDERS = ("tasks", "configs")


def folder(name: str) -> Path:
    """The packaged copy of ``tasks`` or ``configs``. A wheel installs unpacked (never zipped), so
    the resource is a real folder."""
    if name not in FOLDERS:
        raise ValueError(f"no packaged folder '{name}'; packaged: {', '.join(FOLDERS)}")
    return Path(str(resources.files("bench") / "_resources" / name))


def locate(path: str | Path, name: str) -> Path | None:
    """``path`` if it exists, else its packaged copy when it is a relative path under ``name/``
    (e.g. ``configs/quickstart.yaml``), else None."""
    path = Path(path)
    if path.exists():
        return path
    if not path.is_absolute() and len(path.parts) > 1 and path.parts[0] == name:
        packaged = folder(name).joinpath(*path.parts[1:])
        if packaged.exists():
            return packaged
    return None


def listing(name: str, pattern: str = "*.yaml") -> list[str]:
    """Relative paths of the packaged files matching ``pattern`` (at any depth), for error messages."""
    root = folder(name)
    return sorted(str(p.relative_to(root)) for p in root.rglob(pattern)) if root.is_dir() else []
