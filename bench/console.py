"""What every benchmark's `main` prints besides its table: timed progress lines on stderr, the
command line it was run with, and the closing line."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path


class Progress:
    """`progress("message")` prints `[  12.3 s] message` on stderr, timed from creation."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f} s] {message}", file=sys.stderr, flush=True)

    def done(self, workdir: Path | None, *, kept: bool) -> None:
        self(f"done{'; kept ' + str(workdir) if kept else ''}")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How the benchmark was run, for the report: `python -m bench.X ARGS`."""
    args = sys.argv[1:] if argv is None else list(argv)
    return f"python -m {module} {' '.join(args)}".strip()
