"""The docs site builds from docs/ with mkdocs in strict mode, so a broken link, a missing anchor or a
page left out of the navigation fails the suite; the README's links into docs/ resolve too."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    proc = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    built = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")} | {"index"}
    assert pages <= built


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    # The validation settings of mkdocs.yml are what turn these into warnings; --strict makes them fatal.
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    clean = index.read_text()
    broken = {"no-such-page.md": "'no-such-page.md'", "methods.md#no-such-heading": "'#no-such-heading'",
              "#nowhere": "'#nowhere'"}  # the link, and how the build's warning names it
    for target, named in broken.items():
        index.write_text(clean + f"\n[a link]({target})\n")
        proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
        assert proc.returncode != 0 and named in proc.stderr, target


def test_the_readmes_links_into_the_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"\w+://", t)]
    assert any(t.startswith("docs/") for t in links)
    for target in links:
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
            assert anchor in {slugify(h, "-") for h in headings}, f"README links to {target}: no such heading"
