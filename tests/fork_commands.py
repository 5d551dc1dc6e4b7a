"""Run `bench` command lines one after another, each in its own process, the way a user runs them.

    python tests/fork_commands.py < commands.json > results.json

stdin is a JSON list of argument lists (what follows `bench`), run in order in the current folder
with the current environment. Each command runs in a child forked from this process after it has
imported the package once: importing torch, Lightning and the rest costs more than most of the
commands themselves, and a child of a process that imported them and ran nothing starts from the
same state as a fresh interpreter. A child that starts several processes (DDP) launches them as
`python -m bench.cli ...`, as the console script would. stdout is a JSON list of
{"argv", "code", "seconds", "stderr"}, one per command.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

# What the commands import anyway: the entry point and the pipeline behind extract/imprint/run.
import bench.cli
import bench.pipeline


def run_child(argv: list[str], stderr_path: str) -> None:
    """In the forked child: run one command and leave the process with its exit code."""
    code = 1
    try:
        with open(stderr_path, "w") as err:
            os.dup2(err.fileno(), 2)
        with open(os.devnull, "w") as out:
            os.dup2(out.fileno(), 1)
        sys.argv = ["bench", *argv]
        # Lightning relaunches DDP ranks from __main__'s module and sys.argv.
        sys.modules["__main__"].__spec__ = importlib.util.find_spec("bench.cli")
        try:
            code = bench.cli.main(argv)
        except SystemExit as stop:  # argparse's --help and usage errors
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        atexit._run_exitfuncs()
    except BaseException:  # the command crashed: the traceback is its stderr, as in a fresh process
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def run_one(argv: list[str]) -> tuple[int, str]:
    """One command in its own process: a forked child, or a fresh interpreter where there is no fork."""
    if not hasattr(os, "fork"):
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, errors="replace", check=False)
        return proc.returncode, proc.stderr
    with tempfile.NamedTemporaryFile(suffix=".stderr", delete=False) as f:
        stderr_path = f.name
    pid = os.fork()
    if pid == 0:
        run_child(argv, stderr_path)
    _, status = os.waitpid(pid, 0)
    with open(stderr_path, errors="replace") as f:
        stderr = f.read()
    os.unlink(stderr_path)
    return os.waitstatus_to_exitcode(status), stderr


def main() -> None:
    results = []
    for argv in json.load(sys.stdin):
        start = time.perf_counter()
        code, stderr = run_one(argv)
        results.append({"argv": argv, "code": code, "seconds": round(time.perf_counter() - start, 2),
                        "stderr": stderr[-2000:]})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
