"""The one progress renderer of the CLI: live bars on a terminal, plain lines elsewhere.

`rbee pull`, `rbee pulls resume`, `rbee preload` and `rbee install` feed it the same two kinds
of observation: a `note` (a stage change or a message, printed as one line) and a `transfer`
(bytes of one file: done, total, rate, ETA, reused). What the user sees depends on where
stderr goes:

- a terminal: one rich bar per file with bytes, rate and ETA; a spinner and a pulsing bar when
  the total is unknown; notes print above the bars.
- anything else (a pipe, a log, CI, TERM=dumb): one line per note, and a transfer line when the
  file changes or every `LINE_SECONDS`; no cursor movement, no escapes.
- `--format json`: nothing; the command prints each event as a JSON line on stdout.

Use it as a context manager so the live display is always stopped (Ctrl-C included):

    with progress_display(args.format) as display:
        display.note("resolving hf:org/repo")
        display.transfer("a.gguf", "downloading a.gguf (1/1)", ByteCount(done, total, rate))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.text import Text

from rbee_client.cli.output import human_bytes, stderr_console

LINE_SECONDS = 2.0  # off a terminal: at most one transfer line per file this often


@dataclass(frozen=True)
class ByteCount:
    """One observation of a byte transfer (a download, a page-cache read, a source fetch)."""

    done: int
    total: int | None = None  # None: unknown (a spinner, not a bar)
    rate: float = 0.0  # bytes per second; 0: unknown
    eta: float | None = None  # seconds left; None: unknown
    reused: int = 0  # bytes already present, not transferred again


def format_eta(seconds: float | None) -> str:
    """42s, 3m07s, 2h05m; "?" when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, int(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def transfer_line(label: str, counts: ByteCount) -> str:
    """The plain-text form of a transfer: `LABEL done/total rate/s eta T (R reused)`."""
    total = human_bytes(counts.total) if counts.total else "?"
    text = f"{label} {human_bytes(counts.done)}/{total}"
    if counts.rate:
        text += f" {human_bytes(int(counts.rate))}/s eta {format_eta(counts.eta)}"
    if counts.reused:
        text += f" ({human_bytes(counts.reused)} reused)"
    return text


class ProgressDisplay:
    """Shows notes and transfers; this base shows nothing (`--format json`)."""

    def note(self, text: str) -> None:
        """A stage change or a message: one line."""

    def transfer(self, key: str, label: str, counts: ByteCount) -> None:
        """Bytes of the transfer `key` (a file): create or update its bar or line."""

    def complete(self, key: str) -> None:
        """The transfer `key` is done (its bar fills; no more lines for it)."""

    def close(self) -> None:
        """Stop drawing (idempotent). Bars stay on screen as they were."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LineDisplay(ProgressDisplay):
    """Plain lines for pipes and logs: every note, and per file a transfer line when it first
    shows, then every `interval` seconds (a 10 GB pull must not write a million lines, nor
    files that transfer at once a line at each of their interleaved updates)."""

    def __init__(self, console: Console, *, interval: float = LINE_SECONDS) -> None:
        self._console = console
        self._interval = interval
        self._last_line: dict[str, float] = {}  # file -> when its last line was printed
        self._completed: set[str] = set()

    def _print(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def note(self, text: str) -> None:
        self._print(text)
        self._last_line.clear()  # the next transfer lines come at once, after the note

    def transfer(self, key: str, label: str, counts: ByteCount) -> None:
        if key in self._completed:
            return
        now = time.monotonic()
        last = self._last_line.get(key)
        if last is None or now - last >= self._interval:
            self._print(transfer_line(label, counts))
            self._last_line[key] = now

    def complete(self, key: str) -> None:
        self._completed.add(key)


class _SpinnerWhileUnknown(SpinnerColumn):
    """A spinner where the total is unknown (the bar cannot say anything); blank otherwise."""

    def render(self, task: Task) -> Text:
        if task.total is not None or task.finished:
            return Text(" ")
        rendered = super().render(task)
        return rendered if isinstance(rendered, Text) else Text(" ")


class _BytesColumn(ProgressColumn):
    """12.50 MiB/1.20 GiB, or 12.50 MiB when the total is unknown (our units everywhere)."""

    def render(self, task: Task) -> Text:
        done = human_bytes(int(task.completed))
        if task.total is None:
            return Text(done)
        return Text(f"{done}/{human_bytes(int(task.total))}")


class _RateColumn(ProgressColumn):
    """The rate the server measured (smoothed); rich's own estimate when it gave none."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate") or task.speed
        return Text(f"{human_bytes(int(rate))}/s" if rate else "", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """The server's ETA; rich's estimate when it gave none; blank when finished or unknown."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("done", style="progress.elapsed")
        eta = task.fields.get("eta")
        if eta is None and task.total is not None:
            eta = task.time_remaining
        return Text(f"eta {format_eta(eta)}" if eta is not None else "", style="progress.remaining")


class BarDisplay(ProgressDisplay):
    """Live rich bars on a terminal: one per transfer key."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            _SpinnerWhileUnknown(),
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=30),
            _BytesColumn(),
            _RateColumn(),
            _EtaColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._tasks: dict[str, TaskID] = {}
        self._progress.start()
        self._closed = False

    @property
    def progress(self) -> Progress:
        """The rich Progress (tests read its tasks)."""
        return self._progress

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def transfer(self, key: str, label: str, counts: ByteCount) -> None:
        task = self._tasks.get(key)
        if task is None:
            task = self._progress.add_task(label, total=counts.total, completed=counts.done)
            self._tasks[key] = task
        self._progress.update(
            task,
            description=label,
            total=counts.total,
            completed=counts.done,
            rate=counts.rate,
            eta=counts.eta,
        )

    def complete(self, key: str) -> None:
        task = self._tasks.get(key)
        if task is None:
            return
        current = self._progress.tasks[self._task_index(task)]
        total = current.total if current.total is not None else current.completed
        self._progress.update(task, total=total, completed=total, eta=None)

    def _task_index(self, task: TaskID) -> int:
        for index, candidate in enumerate(self._progress.tasks):
            if candidate.id == task:
                return index
        raise KeyError(task)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._progress.stop()


def wants_bars(console: Console) -> bool:
    """Bars only on an interactive terminal (not a pipe, not TERM=dumb, not TTY_INTERACTIVE=0)."""
    return console.is_terminal and console.is_interactive


def progress_display(output_format: str, *, console: Console | None = None) -> ProgressDisplay:
    """The display for a command's `--format`: nothing for json, bars on a terminal, lines
    otherwise. `console` defaults to stderr (progress is a message, not data)."""
    if output_format == "json":
        return ProgressDisplay()
    console = console or stderr_console()
    return BarDisplay(console) if wants_bars(console) else LineDisplay(console)
