"""The README and docs/ are the user's door and the rest of the house: their generated tables come
from the code, a block that quotes a file says what the file says, and every `bench ...` command in
their bash blocks runs, in order, in one folder, as a user following them would (on tiny data, or
as a dry run or --help where it needs a network, a GPU, files that only the user has or a long fit)."""

import ast
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def pages() -> list[Path]:
    """README first, then the docs pages in the order of the site's navigation (a user's reading order)."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    ordered = [ROOT / "docs" / file for entry in nav for file in entry.values()]
    return [README, *ordered, *sorted(set((ROOT / "docs").glob("*.md")) - set(ordered))]


TEXTS = {page: page.read_text() for page in pages()}

# Needs what a test machine has not got: hub weights, a GPU, the user's own data.
NEEDS_MORE = re.compile(r"timm:|openclip:|hf:|weights[:=] ?DEFAULT|accelerator=gpu|precision=bf16|/data/|"
                        r"configs/examples/(imagefolder|hf|clip)\.yaml|checkpoint:other|"
                        # zoos, encoder and generator fits take minutes; tests/test_weightspace.py and
                        # tests/test_generator.py run them on tiny zoos and tasks
                        r"^bench (zoo|weights|generator) |d2nwg:ckpt=")
# Keep the real runs small: every command that runs a suite runs one seed and two shot counts.
SMALL = ["task.seeds=[0]", "task.shots=[1,5]", "wandb.mode=disabled"]
SUITE_COMMANDS = {"run", "imprint", "extract", "quickstart", "diagnose"}


def code_blocks(text: str, lang: str = r"\w*") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def bench_commands(text: str) -> list[str]:
    """Every `bench ...` command line of a page's bash blocks (continuations joined)."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):  # the install line ends with `&& bench quickstart`
                words = shlex.split(part, comments=True)
                if words and words[0] == "bench":
                    commands.append(shlex.join(words))
    return commands


def as_run(command: str) -> tuple[str, ...]:
    """What the test runs for a documented command: the arguments after `bench`, made small."""
    words = shlex.split(command)
    if words[1] in SUITE_COMMANDS:
        extra = ["--dry-run"] if NEEDS_MORE.search(command) else SMALL
    else:
        extra = ["--help"] if NEEDS_MORE.search(command) else []
    return tuple(words[1:] + [w for w in extra if w not in words])


def markdown_tables(text: str) -> list[str]:
    return ["".join(t) for t in re.findall(r"((?:^\|.*\n)+)", text, flags=re.MULTILINE)]


def generated_tables() -> dict[str, str]:
    """The tables the code writes, by header line. In a fresh process: other test modules register
    methods of their own when collected."""
    code = ("import json; from bench.config import config_table; from bench.imprint import PRESET_TABLE; "
            "from bench.report.schema import markdown; "
            "schema_tables = lambda: [t + '\\n' for t in markdown().split('\\n\\n')[1:]]; "
            "from bench.imprint.registry import method_table; "
            "presets = ''.join(f'| `{n}` | `{s}` | {src} |\\n' for n, (s, src) in PRESET_TABLE.items()); "
            "print(json.dumps([method_table(), config_table(), '| preset | spec | source |\\n| --- | --- | --- |\\n' "
            "+ presets] + schema_tables()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {t.splitlines()[0]: t.rstrip("\n") + "\n" for t in json.loads(out)}


def test_method_config_and_preset_tables_come_from_the_code():
    expected = generated_tables()
    assert set(expected) == {"| stage | method | options | what it does |", "| key | accepted | default |",
                             "| preset | spec | source |", "| run.json field | type | required | description |",
                             "| run.json extraction.<split> field | type | required | description |",
                             "| results column | type | required | description |"}
    found = {header: [] for header in expected}
    for page, text in TEXTS.items():
        for table in markdown_tables(text):
            header = table.splitlines()[0]
            if header in expected:
                diff = "\n".join(difflib.unified_diff(table.splitlines(), expected[header].splitlines(), page.name,
                                                     "the code", lineterm="", n=0))
                assert not diff, f"{page.name}: the table '{header}' differs from the code's:\n{diff}"
                found[header].append(page.name)
    assert all(found.values()), f"a generated table is on no page: {found}"


def same_content(path: str, quoted: str, real: str) -> bool:
    """A quote may drop comments and a module docstring, and write YAML in flow style."""
    if path.endswith((".yaml", ".yml")):
        return yaml.safe_load(quoted) == yaml.safe_load(real)
    if path.endswith(".py"):
        def code(source):
            body = ast.parse(source).body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            return ast.dump(ast.Module(body, []))
        return code(quoted) == code(real)
    def lines(text):
        return [x for x in text.splitlines() if x.strip() and not x.startswith("#")]
    return lines(quoted) == lines(real)


def test_blocks_that_name_a_file_say_what_the_file_says():
    quoted = []
    for page, text in TEXTS.items():
        for block in code_blocks(text):
            named = re.match(r"# ([\w./-]+\.\w+)\b", block)
            if named and (ROOT / named[1]).is_file():
                assert same_content(named[1], block, (ROOT / named[1]).read_text()), \
                    f"{page.name} quotes {named[1]}, but the file says something else"
                quoted.append(named[1])
    assert {"configs/examples/my_gens.py", "configs/examples/imagefolder.yaml"} <= set(quoted)


def test_readme_shows_the_install_run_and_test_commands_first():
    text = TEXTS[README]
    start = text.index("## Start here")
    block = text[start:text.index("```", text.index("```bash", start) + 7)]
    assert 'pip install -e ".[test]" && bench quickstart' in block and "python -m pytest -q" in block


@pytest.fixture(scope="module")
def commands() -> list[tuple[str, ...]]:
    found = [as_run(c) for text in TEXTS.values() for c in bench_commands(text)]
    assert len(found) >= 15 and found[0][0] == "quickstart", "the README's first command is `bench quickstart`"
    return list(dict.fromkeys(found))  # a command written on several pages runs once, where it first appears


def test_every_bench_command_in_the_readme_and_docs_runs(commands, tmp_path, forks):
    """Each command in its own process, one after another in one folder, as a user runs them
    (forked from the session's server, which imported the package once: tests/forkserver.py)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tasks").symlink_to(ROOT / "tasks")
    failures = []
    for argv in commands:
        proc = forks.bench(list(argv), cwd=tmp_path, env=env, timeout=240)
        if proc.returncode != 0:
            failures.append(f"bench {shlex.join(argv)}\n  -> exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    assert not failures, "\n".join(failures)
