"""The README is the user's door: its tables come from the code, and every `bench ...` command
in its code blocks runs, in order, in one folder, as a user following it would (on tiny data,
or as a dry run where it needs a network, a GPU or files that only the user has)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import config_table
from bench.imprint import PRESET_TABLE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Needs what a test machine has not got: hub weights, a GPU, the user's own data.
NEEDS_MORE = re.compile(r"timm:|openclip:|hf:|weights[:=] ?DEFAULT|accelerator=gpu|precision=bf16|/data/|"
                        r"configs/examples/(imagefolder|hf)\.yaml|checkpoint:other|"
                        # zoos, encoder and generator fits take minutes; tests/test_weightspace.py and
                        # tests/test_generator.py run them on tiny zoos and tasks
                        r"^bench (zoo|weights|generator) |d2nwg:ckpt=")
# Keep the real runs small: every command that runs a suite runs one seed and two shot counts.
SMALL = ["task.seeds=[0]", "task.shots=[1,5]", "wandb.mode=disabled"]
SUITE_COMMANDS = {"run", "imprint", "extract", "quickstart", "diagnose"}


def readme_commands() -> list[str]:
    """Every `bench ...` command line of the README's bash blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):  # the install line ends with `&& bench quickstart`
                words = shlex.split(part, comments=True)
                if words and words[0] == "bench":
                    commands.append(shlex.join(words))
    return commands


def test_method_config_and_preset_tables_come_from_the_code():
    # In a fresh process: other test modules register methods of their own when collected.
    fresh = subprocess.run([sys.executable, "-c", "from bench.imprint.registry import method_table; "
                            "print(method_table(), end='')"], capture_output=True, text=True, check=True).stdout
    assert fresh.startswith("| stage | method |") and fresh in README
    assert config_table() in README
    for name, (spec, source) in PRESET_TABLE.items():
        assert f"| `{name}` | `{spec}` | {source} |" in README


def test_readme_shows_the_install_run_and_test_commands_first():
    start = README.index("## Start here")
    block = README[start:README.index("```", README.index("```bash", start) + 7)]
    assert 'pip install -e ".[test]" && bench quickstart' in block and "python -m pytest -q" in block


@pytest.fixture(scope="module")
def commands():
    found = readme_commands()
    assert len(found) >= 15 and any(c.startswith("bench quickstart") for c in found)
    return found


def test_every_bench_command_in_the_readme_runs(commands, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "BENCH_README_TEST": "1"}
    env.pop("OMP_NUM_THREADS", None)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tasks").symlink_to(ROOT / "tasks")
    failures = []
    for command in commands:
        words = shlex.split(command)
        sub = words[1]
        if sub in SUITE_COMMANDS:
            words += ["--dry-run"] if NEEDS_MORE.search(command) else SMALL
        elif NEEDS_MORE.search(command):
            words.append("--help")
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            failures.append(f"{command}\n  -> exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    assert not failures, "\n".join(failures)
