"""What the ``bench zoo``, ``bench weights`` and ``bench generator`` commands share: an argparse
that reports bad arguments as one line, and CSV files written atomically."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from bench.errors import BenchError
from bench.runtime import write_text_atomic


class FlagParser(argparse.ArgumentParser):
    """argparse that raises BenchError instead of exiting, so the CLI prints one line."""

    def error(self, message: str):  # noqa: D401
        raise BenchError(f"{self.prog}: {message}")


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """One row per dict; the columns are every key in the order first seen."""
    columns = list(dict.fromkeys(c for r in rows for c in r)) or ["id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return Path(path)
