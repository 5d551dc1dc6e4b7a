"""Separate processes for tests, without paying for the imports each time.

Importing torch, Lightning and bench costs 5-20 s of CPU per process, more than most of what the
tests run in them. A server process (this file run as a script) imports them once and forks a
child per request; the test side gets a handle that behaves like ``subprocess.Popen``: its own
process and session (SIGKILL of its group kills it and every process it launched, as for
``start_new_session=True``), its own working folder, environment and output files, and an exit
code that says how it ended.

The server forks before it has run any torch operation: a process whose OpenMP pool exists
cannot fork a child that computes (the child hangs in its first parallel kernel), which is also
why tests never fork the pytest process itself. A child of a server that only imported starts
from the state a fresh interpreter reaches after the same imports; what a fresh interpreter
reads from the environment at start (torch's thread count, bench's record of the user's
OMP_NUM_THREADS, unbuffered output, writing bytecode) is set again from the child's own
environment, and the random generators seeded at import are seeded again. What a library reads
from the environment when it is imported (a cache folder, a plotting backend) stays the server's,
which is the test process's: a test that changes such a variable needs a fresh interpreter.
Processes that a child launches (Lightning's DDP ranks, torchrun's workers) are fresh ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = "forkserver ready"


# ---- the server ----------------------------------------------------------------------------------

def _child(request: dict, default_threads: int) -> None:
    """In the forked child: become the requested process, run it, leave with its exit code."""
    import atexit
    import io
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                      write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace")
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
        if request.get("file_size_limit") is not None:  # as a full disk would: writes past it fail (EFBIG)
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = int(request["file_size_limit"])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        import random

        import numpy as np
        import torch

        import bench.runtime

        random.seed()  # from the OS, as at a fresh start: no two children draw the same numbers
        np.random.seed()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or default_threads))
        bench.runtime.remember_user_threads()  # what importing bench.runtime does in a fresh process
        args = [str(a) for a in request["args"]]
        if request.get("module"):  # python -m MODULE ARGS (Lightning relaunches DDP ranks the same way)
            sys.argv = [request["module"], *args]
            sys.path[0] = os.getcwd()
            sys.modules.pop(request["module"], None)  # imported here, but run afresh as __main__
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:  # python SCRIPT ARGS
            sys.argv = [request["script"], *args]
            sys.path[0] = str(Path(request["script"]).resolve().parent)
            runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # a crash: the traceback is its stderr, as in a fresh process
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """Read one JSON request per line on stdin, fork it, answer its pid; write each child's exit
    code to the status file it named once it ends (reaped here, polled by the test side)."""
    import select

    # What the commands and the tests' scripts import: importing it here is the point.
    import lightning  # noqa: F401
    import torch

    import bench.cli
    import bench.extract
    import bench.pipeline
    import bench.report.build
    import bench.report.wandb_log  # noqa: F401

    default_threads = torch.get_num_threads()  # started without OMP_NUM_THREADS: the fresh default
    status_files: dict[int, str] = {}
    pending = b""
    print(READY, flush=True)
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        while status_files:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            path = status_files.pop(pid)
            Path(path + ".tmp").write_text(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)
        if not readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the test session is over: nothing it started outlives it
            for pid in status_files:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os._exit(0)  # nothing to write back; tearing down torch and the rest takes seconds
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request, default_threads)
            status_files[pid] = request["status"]
            print(pid, flush=True)


# ---- the test side -------------------------------------------------------------------------------

class Forked:
    """A forked process, used like ``subprocess.Popen`` (pid, poll, wait, returncode), with its
    stdout and stderr in files."""

    def __init__(self, pid: int, folder: Path) -> None:
        self.pid, self.folder, self.returncode = pid, folder, None

    def poll(self) -> int | None:
        status = self.folder / "status"
        if self.returncode is None and status.exists():
            self.returncode = int(status.read_text())
        return self.returncode

    def wait(self, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout, self.stdout, self.stderr)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL to the process and to every process it started (its own process group)."""
        if self.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait()

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float = 300) -> list[str]:
        """The complete lines of stdout up to the first one that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.poll() is not None  # read after the check: the last lines are then in
            lines = self.stdout.splitlines(keepends=True)
            complete = [line for line in lines if line.endswith("\n")]
            for i, line in enumerate(complete):
                if line.startswith(prefix):
                    return complete[:i + 1]
            if done or time.monotonic() > deadline:
                if not done:
                    self.kill()
                raise AssertionError(f"no '{prefix}' line; rc {self.returncode}; stdout {''.join(lines)[-2000:]}; "
                                     f"stderr {self.stderr[-3000:]}")
            time.sleep(0.01)


class ForkServer:
    """Starts the server (its imports run while the caller goes on) and forks processes from it;
    each process's output and exit code go to a numbered folder under ``folder``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.count = 0
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.ready = False

    def start(self, args, *, module: str | None = None, script: str | Path | None = None, cwd: str | Path,
              env: dict | None = None, file_size_limit: int | None = None) -> Forked:
        """``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` in ``cwd`` with ``env`` (default: this
        process's environment), as a process of its own."""
        assert (module is None) != (script is None), "a module or a script"
        if not self.ready:
            line = self.proc.stdout.readline()
            assert line.strip() == READY, f"the fork server did not start: {line!r}"
            self.ready = True
        self.count += 1
        folder = Path(self.folder) / f"{self.count:04d}"
        folder.mkdir(parents=True)
        for name in ("stdout", "stderr"):
            (folder / name).touch()
        request = {"args": [str(a) for a in args], "module": module, "script": str(script) if script else None,
                   "cwd": str(cwd), "env": dict(os.environ if env is None else env),
                   "stdout": str(folder / "stdout"), "stderr": str(folder / "stderr"), "status": str(folder / "status"),
                   "file_size_limit": file_size_limit}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Forked(int(self.proc.stdout.readline()), folder)

    def run(self, args, timeout: float = 600, **kw) -> Forked:
        """Start a process and wait for it to end."""
        proc = self.start(args, **kw)
        proc.wait(timeout)
        return proc

    def bench(self, args, cwd, env=None, timeout: float = 600, **kw) -> Forked:
        """``bench ARGS`` (``python -m bench.cli ARGS``) to its end."""
        return self.run(args, module="bench.cli", cwd=cwd, env=env, timeout=timeout, **kw)

    def close(self) -> None:
        """End the server, and with it whatever it forked that still runs."""
        if self.proc.poll() is not None:
            return
        if self.ready:
            self.proc.stdin.close()  # the server kills what still runs and exits
        else:
            self.proc.kill()  # still importing: nothing forked yet
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


if __name__ == "__main__":
    serve()
