"""One supervised worker process: started, its output kept and followed, stopped safely.

The pool runs on asyncio (grpc.aio), so this does too: `WorkerProcess.start()` spawns the child
with asyncio's subprocess support, two tasks read its stdout and stderr line by line into one
bounded tail (and, when asked, append them to a log file), and a third notes its exit.

Process hygiene, which the original pool got wrong:

- Own session (`start_new_session=True`): a Ctrl-C in the pool's terminal goes to the terminal's
  foreground process group, so it reaches the pool, which stops its workers in order, and never
  the workers directly.
- The child dies with the pool, even on `kill -9` of the pool. On Linux the child asks the kernel
  for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG): the command runs behind
  orphan_guard.py, a tiny script that sets the signal, checks its parent is still there (if the
  parent died first the signal would never come), then execs the command (same pid; the
  setting survives exec). Not a `preexec_fn`: that forces fork() in a process full of gRPC
  threads and runs Python in the child before exec; gRPC's fork handlers crashed such children
  with SIGSEGV. Caveat: the kernel sends the signal when the parent THREAD that forked the
  child exits, not the process. asyncio spawns from the event loop thread (the Popen call
  runs synchronously in create_subprocess_exec), which lives as long as the pool: never start
  workers from a short-lived thread (asyncio.to_thread, an executor).
- Off Linux there is no PDEATHSIG: the child gets the pool's pid in RBEE_POOL_PID (set on every
  platform) so a worker can watch its parent; nothing watches it yet.
- Signals go only to this object's own child, through its asyncio.subprocess handle, never to a
  pid read from anywhere else, and never once the child has been reaped: `returncode` is checked
  first in the event loop thread, and Popen.send_signal polls the pid again before it calls
  kill (a child the watcher thread reaped a moment ago is then seen as gone). A pid cannot be
  reused before its process is reaped, so no signal can reach a stranger. (The one cost, in a
  microseconds-wide race on Python 3.11's threaded child watcher: when that poll reaps a child
  that died at that very moment, asyncio reports its exit code as 255.)

Output: lines are decoded as UTF-8 with errors="replace". A line longer than MAX_LINE_BYTES is
split into pieces of that size (never a blocked reader or a lost line); a multi-byte character
on a piece boundary is kept whole in the next piece.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
# Output normally ends with the process; a grandchild that inherited the pipes may keep them
# open. After the exit, reading stops after this long so wait() and followers are not held up.
OUTPUT_DRAIN_SECONDS = 2.0
POOL_PID_ENV = "RBEE_POOL_PID"
ORPHAN_GUARD = Path(__file__).with_name("orphan_guard.py")
STDOUT = "stdout"
STDERR = "stderr"
STREAMS = (STDOUT, STDERR)


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a worker process."""

    argv: list[str]  # the full command
    env: dict[str, str]  # the full environment for the child
    log_path: Path | None = None  # when set, every output line is also appended here
    # A pipe on stdin instead of /dev/null: a warm spare reads its worker's argv there
    # (send_launch).
    stdin_pipe: bool = False


@dataclass(frozen=True)
class LogLine:
    """One line of a worker's output."""

    time: datetime  # UTC, when read
    stream: str  # "stdout" | "stderr"
    text: str  # without the newline


def format_log_record(line: LogLine) -> str:
    """The line as the log file holds it: "ISO-TIME STREAM TEXT" (no newline)."""
    return f"{line.time.isoformat(timespec='microseconds')} {line.stream} {line.text}"


def parse_log_record(record: str) -> LogLine | None:
    """A log file line back into a LogLine (None when it is not one of ours), so a restarted
    pool can serve the logs of a worker it started before."""
    parts = record.rstrip("\n").split(" ", 2)
    if len(parts) < 2 or parts[1] not in STREAMS:
        return None
    try:
        time = datetime.fromisoformat(parts[0])
    except ValueError:
        return None
    return LogLine(time=time, stream=parts[1], text=parts[2] if len(parts) == 3 else "")


# ---- parent death ----------------------------------------------------------------------------


def guarded_argv(argv: Sequence[str]) -> list[str]:
    """`argv` behind orphan_guard.py (Linux): the child sets its own parent-death signal after
    exec and then execs `argv` (same pid). Elsewhere `argv` unchanged.

    Raises FileNotFoundError / PermissionError here, as a direct exec would, when the command
    cannot run (behind the guard the failure would otherwise only show as an exit code)."""
    command = argv[0]
    resolved = command if os.sep in command else shutil.which(command)
    if resolved is None or not os.path.exists(resolved):
        raise FileNotFoundError(2, "No such file or directory", command)
    if not os.access(resolved, os.X_OK) or os.path.isdir(resolved):
        raise PermissionError(13, "Permission denied", command)
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, str(ORPHAN_GUARD), str(os.getpid()), "--", *argv]


# ---- following -------------------------------------------------------------------------------


class LogFollower:
    """New lines of one worker from the moment it was created until its output ends.

    Subscribed when created (not at the first iteration), so `tail()` then `follow()` with no
    await between them misses and repeats nothing. A follower that falls more than the tail
    capacity behind loses its oldest unread lines: the child is never slowed by a slow reader.
    """

    def __init__(self, stream: str | None, capacity: int) -> None:
        self._stream = stream
        self._buffer: deque[LogLine] = deque(maxlen=capacity)
        self._ready = asyncio.Event()
        self._ended = False

    def _push(self, line: LogLine) -> None:
        if self._stream is None or line.stream == self._stream:
            self._buffer.append(line)
            self._ready.set()

    def _end(self) -> None:
        self._ended = True
        self._ready.set()

    def __aiter__(self) -> LogFollower:
        return self

    async def __anext__(self) -> LogLine:
        while not self._buffer:
            if self._ended:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._buffer.popleft()


class LineWatch:
    """Sets `seen` once a process prints a given line on stdout (WorkerProcess.watch_line)."""

    def __init__(self, lines: AsyncIterator[LogLine], text: str) -> None:
        self.seen = asyncio.Event()

        async def watch() -> None:
            async for line in lines:
                if line.text == text:
                    self.seen.set()
                    return

        self._task = asyncio.get_running_loop().create_task(watch(), name=f"watch-line:{text}")

    def cancel(self) -> None:
        """Stop watching (the event stays as it is)."""
        self._task.cancel()


def _check_stream(stream: str | None) -> None:
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)} or None, got {stream!r}")


# ---- the process -----------------------------------------------------------------------------


class WorkerProcess:
    """A running (or finished) child process of the pool. Create with `await start(...)`."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        tail_lines: int,
        log_file: TextIO | None,
        log_path: Path | None,
    ) -> None:
        self._process = process
        self.pid: int = process.pid
        self.started_at: datetime = datetime.now(UTC)
        self._tail_lines = tail_lines
        self._lines: deque[LogLine] = deque(maxlen=tail_lines)
        self._followers: weakref.WeakSet[LogFollower] = weakref.WeakSet()
        self._output_ended = False
        self._log_file = log_file
        self._log_path = log_path
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.create_task(
                self._read(process.stdout, STDOUT), name=f"worker {self.pid} stdout"
            ),
            asyncio.create_task(
                self._read(process.stderr, STDERR), name=f"worker {self.pid} stderr"
            ),
        ]
        self._supervisor = asyncio.create_task(self._supervise(), name=f"worker {self.pid} exit")

    @classmethod
    async def start(cls, spec: LaunchSpec, *, tail_lines: int = 1000) -> WorkerProcess:
        """Start `spec.argv` in its own session with `spec.env` (plus RBEE_POOL_PID), stdin
        from /dev/null (or a pipe: `spec.stdin_pipe`). Call it from the event loop thread (see
        the module doc on PDEATHSIG).

        Raises ValueError for an empty argv or tail_lines < 1, OSError when the command cannot
        be executed (FileNotFoundError, PermissionError) or the log file cannot be opened.
        """
        if not spec.argv:
            raise ValueError("argv is empty")
        if tail_lines < 1:
            raise ValueError(f"tail_lines must be at least 1, got {tail_lines}")
        env = {**spec.env, POOL_PID_ENV: str(os.getpid())}
        log_file: TextIO | None = None
        if spec.log_path is not None:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: a crash of the pool loses at most a partial line.
            log_file = spec.log_path.open("a", encoding="utf-8", errors="replace", buffering=1)
        try:
            process = await asyncio.create_subprocess_exec(
                *guarded_argv(spec.argv),
                stdin=asyncio.subprocess.PIPE if spec.stdin_pipe else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=MAX_LINE_BYTES,
            )
        except BaseException:
            if log_file is not None:
                log_file.close()
            raise
        logger.debug("started worker process %d: %s", process.pid, spec.argv)
        return cls(process, tail_lines=tail_lines, log_file=log_file, log_path=spec.log_path)

    async def send_launch(self, argv: Sequence[str], *, log_path: Path | None) -> None:
        """Turn this warm spare (services.worker.spare) into the worker `argv` (the arguments
        after the command): one JSON line on its stdin, which is then closed. From now on the
        output also goes to `log_path`, the tail starts afresh (the spare's own lines are not
        the worker's) and `started_at` is now.

        Raises OSError (BrokenPipeError, ConnectionResetError) when the spare is gone or was
        not started with a stdin pipe; the caller starts a fresh process instead.
        """
        stdin = self._process.stdin
        if stdin is None:
            raise BrokenPipeError(32, "this process was started without a stdin pipe")
        if self._process.returncode is not None:
            raise BrokenPipeError(32, f"the spare exited with {self._process.returncode}")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._close_log_file()
            self._log_file = log_path.open("a", encoding="utf-8", errors="replace", buffering=1)
            self._log_path = log_path
        self._lines.clear()
        self.started_at = datetime.now(UTC)
        stdin.write(json.dumps({"argv": list(argv)}).encode() + b"\n")
        try:
            await stdin.drain()
        finally:
            stdin.close()

    def close_stdin(self) -> None:
        """Close the stdin pipe (a spare then exits 0 without starting); no-op without one."""
        if self._process.stdin is not None:
            self._process.stdin.close()

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal); None
        while it runs. Its last output may still be being read: `wait()` waits for both."""
        return self._process.returncode

    async def wait(self) -> int:
        """Wait for the exit and the end of its output (so tail() is complete); the exit code,
        negative when killed by a signal (-9 for SIGKILL), as asyncio reports it."""
        return await asyncio.shield(self._supervisor)

    def tail(
        self, n: int = 0, *, stream: str | None = None, since: datetime | None = None
    ) -> list[LogLine]:
        """The kept lines (at most tail_lines), oldest first: the last `n` (0 = all) of `stream`
        (None = both) read at or after `since` (an aware datetime)."""
        _check_stream(stream)
        lines = [
            line
            for line in self._lines
            if (stream is None or line.stream == stream) and (since is None or line.time >= since)
        ]
        return lines[-n:] if n > 0 else lines

    def follow(self, *, stream: str | None = None) -> AsyncIterator[LogLine]:
        """New lines from now until the process's output ends (at once if it already has).

        A plain method returning an async iterator (use `async for`): it subscribes when
        called, so lines read between this call and the first iteration are not lost.
        """
        _check_stream(stream)
        follower = LogFollower(stream, self._tail_lines)
        if self._output_ended:
            follower._end()
        else:
            self._followers.add(follower)
        return follower

    def watch_line(self, text: str) -> LineWatch:
        """A watch whose `seen` is set when this process prints `text` as a line on stdout.
        Subscribed now, like `follow`: create it before anything that may make the process
        print it (a launch), or with no await since the start, and no line is missed."""
        return LineWatch(self.follow(stream=STDOUT), text)

    def stderr_tail_text(self, lines: int = 20, max_chars: int = 2000) -> str:
        """The last `lines` stderr lines as one text, cut to its last `max_chars` characters
        (the end of a traceback says the most), for a FAILED state message."""
        text = "\n".join(line.text for line in self.tail(lines, stream=STDERR))
        if max_chars > 0 and len(text) > max_chars:
            text = "…" + text[-(max_chars - 1) :]
        return text

    async def stop(self, *, grace: float, force: bool = False) -> int:
        """Stop the process and return its exit code: SIGTERM, then SIGKILL if it is still
        running after `grace` seconds; `force`: SIGKILL at once. Idempotent: a process that has
        already exited is not signalled, and its exit code is returned."""
        if self._process.returncode is None:
            if force:
                self._signal(signal.SIGKILL)
            else:
                self._signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._process.wait()), timeout=max(0.0, grace)
                    )
                except TimeoutError:
                    self._signal(signal.SIGKILL)
        return await self.wait()

    def _signal(self, sig: signal.Signals) -> None:
        # Only our own child, and only before it has been reaped (see the module doc).
        if self._process.returncode is not None:
            return
        logger.debug("sending %s to worker process %d", sig.name, self.pid)
        with contextlib.suppress(ProcessLookupError):  # exited, its transport closed meanwhile
            self._process.send_signal(sig)

    # --- output ---------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, stream: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                try:
                    data = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    # More than MAX_LINE_BYTES without a newline: emit a piece and go on. A
                    # multi-byte character cut at the end waits in the decoder for the next.
                    piece = await reader.read(MAX_LINE_BYTES)
                    if piece:
                        self._add(stream, decoder.decode(piece, final=False))
                    continue
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:  # a last line without a newline
                        self._add(stream, decoder.decode(exc.partial, final=True))
                    return
                text = decoder.decode(data, final=True).removesuffix("\n").removesuffix("\r")
                self._add(stream, text)
        except OSError as exc:
            logger.debug("worker process %d %s: read failed: %s", self.pid, stream, exc)

    def _add(self, stream: str, text: str) -> None:
        line = LogLine(time=datetime.now(UTC), stream=stream, text=text)
        self._lines.append(line)
        for follower in list(self._followers):
            follower._push(line)
        if self._log_file is not None:
            try:
                self._log_file.write(format_log_record(line) + "\n")
            except (OSError, ValueError) as exc:
                # A full disk must not stop the worker or its in-memory tail.
                logger.warning("cannot write %s (%s): logging to memory only", self._log_path, exc)
                self._close_log_file()

    async def _supervise(self) -> int:
        try:
            code = await self._process.wait()
            _, pending = await asyncio.wait(self._readers, timeout=OUTPUT_DRAIN_SECONDS)
            if pending:
                logger.debug(
                    "worker process %d exited but its output is still open (a child of it "
                    "holds the pipe): stopped reading",
                    self.pid,
                )
            logger.debug("worker process %d exited with %d", self.pid, code)
            return code
        finally:
            for task in self._readers:
                task.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
            self._end_output()

    def _end_output(self) -> None:
        self._output_ended = True
        for follower in list(self._followers):
            follower._end()
        self._followers.clear()
        self._close_log_file()

    def _close_log_file(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
