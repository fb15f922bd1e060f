"""The transfer engine: one PlannedFile from its URL to its verified, final place on disk.

The shape of a download, and why:

- Bytes accumulate in `planned.partial` and the file appears under `planned.dest` only once it
  is complete and verified (fsync, rename, fsync of the directory). A partial left behind by a
  cancel, a failure or a kill -9 is resumed with `Range: bytes=<offset>-`; its bytes are hashed
  once from disk first (they count as "reused"), so the sha256 covers the whole file without a
  second pass over the new bytes.
- The sha256 is computed while the bytes stream in, overlapped with the network: the calling
  thread reads with `readinto` into a small ring of preallocated buffers and hands each filled
  buffer to a hashing thread, which hands it on to a writing thread, which returns it to the
  ring. hashlib releases the GIL on large updates, and os.write and recv_into do too, so the
  network, the hash and the disk run at the same time on three cores with flat memory.
- Transient failures (reset, refused, timeout, a stall longer than `stall_timeout`, 5xx, 429)
  are retried from the current offset with exponential backoff and jitter; the retry budget
  counts consecutive attempts that made no progress. Permanent ones (4xx, hash mismatch, disk
  full) fail at once.
- Cancellation is checked per buffer, and a watcher thread shuts the socket down when the event
  is set, so even a read blocked on a silent server returns within a fraction of a second.
- The partial is written with O_DIRECT where the filesystem allows it (`direct_io`, on by
  default): the bytes go from the ring's page-aligned buffers to the disk without a copy into the
  page cache. Buffered writes cost about as much CPU as the sha256 leaves free (1.4 s of kernel
  time per GiB on a 2-core host, plus the writeback), evict the page cache that running workers
  read their models from, and left the final fsync a disk's worth of dirty pages to wait for.
  Aligned blocks go direct; the few bytes around a resume or a failed read, and the file's tail,
  are written buffered (the receiver sizes its next buffer so the offset realigns at once).
  Where O_DIRECT is refused (tmpfs on older kernels, some network filesystems) every write is
  buffered, with a background fdatasync every FLUSH_BYTES.
- One process at a time writes a given partial: `fcntl.flock` on `<dest>.lock`.

Secrets: the token travels only inside `http.open_url` (first origin only); every URL that can
reach a message goes through `redact_url`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import logging
import mmap
import os
import queue
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from services.common.errors import (
    Cancelled,
    DataLoss,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.provisioner.domain import AuthScope, Credentials, FileResult, PlannedFile
from services.provisioner.http import HttpResponse, open_url, raise_for_status, redact_url

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None, int], None]
"""(done_bytes, total_bytes or None, reused_bytes): at most every ~0.1 s, and once at the end."""

PROGRESS_INTERVAL = 0.1
RING_BUFFERS = 4  # filled buffers in flight: one being received, one hashed, one written, spare
# Written bytes between background fdatasync calls: the disk writes back while the network runs,
# so the final fsync has little left to do (it cost ~0.9 s per 2 GiB when left to the end).
FLUSH_BYTES = 256 * 1024 * 1024
# O_DIRECT granularity for file offsets, lengths and buffer addresses: the largest logical block
# size in use (4 KiB sector disks); 512-byte devices accept it too.
DIRECT_ALIGN = 4096
# Bytes asked of the response per read: what one failed read may lose (see `_receive`).
READ_BYTES = 1024 * 1024
CANCEL_POLL = 0.1  # how often the lock wait and the socket watcher look at the cancel event
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TOKEN_SETTINGS = {AuthScope.HUGGINGFACE: "HF_TOKEN", AuthScope.CIVITAI: "CIVITAI_API_TOKEN"}


@dataclass(frozen=True)
class TransferSettings:
    """How downloads run; one object from the provisioner's settings, passed down."""

    buffer_bytes: int = 4 * 1024 * 1024
    max_retries: int = 5  # consecutive attempts without progress
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stall_timeout: float = 30.0  # no byte for this long: a transient error
    connect_timeout: float = 30.0
    bandwidth_limit: int = 0  # bytes/s, 0 = unlimited
    free_space_margin: int = 64 * 1024 * 1024
    direct_io: bool = True  # write the partial with O_DIRECT where the filesystem allows it


# --- pure parts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentRange:
    """A parsed `Content-Range` header: `bytes START-END/TOTAL` or `bytes */TOTAL` (416)."""

    start: int | None
    end: int | None  # inclusive
    total: int | None  # None for `/*`


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str) -> ContentRange | None:
    """Parse a Content-Range header; None when it is absent or malformed (never raises)."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None
    start_text, end_text, total_text = match.groups()
    start = int(start_text) if start_text is not None else None
    end = int(end_text) if end_text is not None else None
    total = None if total_text == "*" else int(total_text)
    if start is None and total is None:
        return None  # "bytes */*" says nothing
    if start is not None and end is not None and end < start:
        return None
    if total is not None and end is not None and end >= total:
        return None
    return ContentRange(start, end, total)


def backoff_delay(
    failures: int,
    *,
    initial: float,
    maximum: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `failures` (1-based): exponential with equal jitter.

    The ceiling doubles from `initial` up to `maximum`; the delay is drawn from its upper half,
    so retries spread out (no thundering herd) but never collapse to zero.
    """
    ceiling = min(maximum, initial * (2.0 ** max(0, failures - 1)))
    return ceiling / 2 + rng() * ceiling / 2


class TokenBucket:
    """A byte-rate limiter: `reserve(n)` takes n tokens and says how long to sleep for them.

    Tokens refill at `rate` per second up to `burst`. The balance may go negative: the caller
    sleeps the debt off (on the cancel event) before reading more. Thread-safe: the files of
    one pull that transfer at once share one bucket, so the pull's limit holds for their sum.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def for_limit(cls, limit: int) -> TokenBucket | None:
        """The bucket for a bytes-per-second limit (a tenth of a second's burst); None for 0."""
        return cls(limit, max(64 * 1024, limit / 10)) if limit > 0 else None

    def reserve(self, amount: int) -> float:
        """Take `amount` tokens; return the seconds to wait before using them (0 when due)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= amount
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# --- public entry points ----------------------------------------------------------------------


def file_sha256(path: Path, cancel: threading.Event | None = None) -> str:
    """The lowercase hex sha256 of a file, read in large chunks; Cancelled when `cancel` is set."""
    hasher = hashlib.sha256()
    _hash_file_into(hasher, path, None, cancel, lambda _done: None)
    return hasher.hexdigest()


def download_file(
    planned: PlannedFile,
    *,
    credentials: Credentials,
    settings: TransferSettings,
    cancel: threading.Event,
    on_progress: ProgressCallback,
    on_message: Callable[[str], None] = lambda _message: None,
    bucket: TokenBucket | None = None,
) -> FileResult:
    """Fetch one planned file (http(s):// or file://), verified, to `planned.dest`; blocking.

    `bucket`: a rate limiter shared with other downloads (the files of one pull); without one,
    `settings.bandwidth_limit` limits this file alone.

    Resumes from `planned.partial`, checks size and sha256, renames atomically, then points
    `planned.link` (when set) at the file with a relative symlink. Errors: DataLoss
    HASH_MISMATCH (partial deleted), Unavailable DOWNLOAD_FAILED (after the retries; partial
    kept), ResourceExhausted DISK_FULL, Cancelled CANCELLED (partial kept), and the errors of
    `http.raise_for_status` for other 4xx answers.
    """
    if planned.cached and planned.dest.is_file():
        return _use_cached(planned, cancel, on_progress)
    planned.dest.parent.mkdir(parents=True, exist_ok=True)
    with _destination_lock(planned.dest, cancel):
        # Another process may have completed the same file while we waited for the lock.
        done = _already_complete(planned, cancel)
        if done is not None:
            _ensure_link(planned)
            on_progress(done.size, done.size, done.size)
            return done
        return _Download(
            planned,
            credentials=credentials,
            settings=settings,
            cancel=cancel,
            on_progress=on_progress,
            on_message=on_message,
            bucket=bucket
            if bucket is not None
            else TokenBucket.for_limit(settings.bandwidth_limit),
        ).run()


# --- cached files, locks, links -------------------------------------------------------------


def _use_cached(
    planned: PlannedFile, cancel: threading.Event, on_progress: ProgressCallback
) -> FileResult:
    size = planned.dest.stat().st_size
    digest = planned.sha256.lower() if planned.sha256 else file_sha256(planned.dest, cancel)
    _ensure_link(planned)
    on_progress(size, size, size)
    return FileResult(planned.path, planned.dest, size, digest, transferred=0)


def _already_complete(planned: PlannedFile, cancel: threading.Event) -> FileResult | None:
    """`dest` exists and is provably the planned file (a known sha256 that matches)."""
    if not planned.sha256 or not planned.dest.is_file():
        return None
    size = planned.dest.stat().st_size
    if planned.size is not None and size != planned.size:
        return None
    digest = file_sha256(planned.dest, cancel)
    if digest != planned.sha256.lower():
        return None
    return FileResult(planned.path, planned.dest, size, digest, transferred=0)


@contextlib.contextmanager
def _destination_lock(dest: Path, cancel: threading.Event) -> Iterator[None]:
    """An exclusive flock on `<dest>.lock`, waited for on the cancel event.

    The holder unlinks the lock file before releasing it, so a waiter that then acquires the
    old inode checks that the path still names it, and starts over otherwise.
    """
    lock_path = dest.with_name(dest.name + ".lock")
    told = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not told:
                logger.info("waiting for another download of %s", dest.name)
                told = True
            if cancel.wait(CANCEL_POLL):
                raise Cancelled(
                    f"{dest.name}: cancelled while waiting for another download of the same file",
                    reason="CANCELLED",
                ) from None
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # closing releases the flock


def _ensure_link(planned: PlannedFile) -> None:
    """Point `planned.link` at `planned.dest` with a relative symlink, atomically."""
    link = planned.link
    if link is None:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(planned.dest, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        return
    temp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, temp)
    try:
        os.replace(temp, link)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(link.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- hashing a file from disk -----------------------------------------------------------------


class _Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _hash_file_into(
    hasher: _Hasher,
    path: Path,
    limit: int | None,
    cancel: threading.Event | None,
    progress: Callable[[int], None],
) -> int:
    """Feed up to `limit` bytes of `path` (all when None) to `hasher`; returns the count."""
    buffer = bytearray(4 * 1024 * 1024)
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as file:
        while limit is None or done < limit:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{path.name}: hashing cancelled", reason="CANCELLED")
            want = len(buffer) if limit is None else min(len(buffer), limit - done)
            n = file.readinto(view[:want])
            if not n:
                break
            hasher.update(view[:n])
            done += n
            progress(done)
    return done


# --- the pipeline: receive -> hash -> write, on a ring of buffers -----------------------------


def open_direct(path: Path) -> int | None:
    """A second, O_DIRECT descriptor on `path` for writing; None where it cannot be had."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:  # EINVAL: the filesystem does not do direct I/O
        logger.debug("no direct I/O for %s (%s); writing through the page cache", path, exc)
        return None


class _RingPipeline:
    """A ring of preallocated buffers flowing from the caller to a hashing and a writing thread.

    The caller `acquire`s a free buffer, fills it (at most `fill_limit()` bytes), and `submit`s
    it; the hashing thread updates the sha256 and passes it to the writing thread, which writes
    it at the end of the partial file and returns it to the ring. Aligned blocks go through
    `direct_fd` (O_DIRECT) when there is one, the rest through `fd`. A flushing thread
    fdatasyncs every FLUSH_BYTES written through the page cache, in the background. A write
    error (ENOSPC, EFBIG) stops the writing and is raised to the caller at its next `acquire` or
    `drain`.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        hasher: _Hasher,
        buffer_bytes: int,
        direct_fd: int | None = None,
    ) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self.hasher = hasher
        self.submitted = offset  # bytes handed over (all will be written, or `error` is set)
        self.error: OSError | None = None
        self._write_offset = offset  # where the writing thread writes next
        # Anonymous mappings are page-aligned, as O_DIRECT wants the memory to be.
        self._buffers = [mmap.mmap(-1, buffer_bytes) for _ in range(RING_BUFFERS)]
        self.views = [memoryview(b) for b in self._buffers]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(RING_BUFFERS):
            self._free.put(index)
        self._to_hash: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._unflushed = 0
        self._flush_wanted = threading.Event()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._hash_loop, name="transfer-hash", daemon=True),
            threading.Thread(target=self._write_loop, name="transfer-write", daemon=True),
            threading.Thread(target=self._flush_loop, name="transfer-flush", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def fill_limit(self) -> int:
        """How many bytes the next buffer should take: short once after an unaligned offset
        (a resume, a failed read), so that the buffers after it start on an aligned one."""
        size = len(self.views[0])
        if self.direct_fd is None:
            return size
        return size - self.submitted % DIRECT_ALIGN

    def acquire(self, cancel: threading.Event) -> int:
        """A free buffer's index; raises the writer's error, or Cancelled while waiting."""
        while True:
            self._raise_error()
            try:
                return self._free.get(timeout=CANCEL_POLL)
            except queue.Empty:
                if cancel.is_set():
                    raise _CancelledNow() from None

    def release(self, index: int) -> None:
        """Give back a buffer that was acquired but not filled."""
        self._free.put(index)

    def submit(self, index: int, size: int) -> None:
        with self._idle:
            self._outstanding += 1
        self.submitted += size
        self._to_hash.put((index, size))

    def drain(self, *, raise_error: bool = True) -> None:
        """Wait until every submitted buffer is hashed and written."""
        with self._idle:
            self._idle.wait_for(lambda: self._outstanding == 0)
        if raise_error:
            self._raise_error()

    def restart(self, hasher: _Hasher) -> None:
        """Throw the bytes away and start the file over from 0 (after `drain`)."""
        os.ftruncate(self.fd, 0)
        self.hasher = hasher
        self.submitted = 0
        self._write_offset = 0

    def close(self) -> None:
        self._to_hash.put(None)
        self._closing = True
        self._flush_wanted.set()
        for thread in self._threads:
            thread.join()

    def _write(self, view: memoryview, size: int) -> None:
        """Write view[:size] at the write offset: the aligned blocks direct, the rest buffered."""
        offset = self._write_offset
        done = 0
        if self.direct_fd is not None and offset % DIRECT_ALIGN == 0:
            aligned = size - size % DIRECT_ALIGN
            while done < aligned:
                try:
                    done += os.pwrite(self.direct_fd, view[done:aligned], offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # Refused after all (a filesystem that accepts the flag but not the write,
                    # or a short write left the offset unaligned): buffered from here on.
                    logger.debug("direct write refused (%s); writing through the page cache", exc)
                    self.direct_fd = None
                    break
        while done < size:
            n = os.pwrite(self.fd, view[done:size], offset + done)
            done += n
            self._unflushed += n
        self._write_offset = offset + size

    def _raise_error(self) -> None:
        if self.error is not None:
            raise _WriteFailed(self.error)

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not None:
            index, size = item
            if self.error is None:
                self.hasher.update(self.views[index][:size])
            self._to_write.put(item)
        self._to_write.put(None)

    def _flush_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            if self._closing:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                if self.error is None:
                    self.error = exc

    def _write_loop(self) -> None:
        while (item := self._to_write.get()) is not None:
            index, size = item
            if self.error is None:
                try:
                    self._write(self.views[index], size)
                except OSError as exc:
                    self.error = exc
            if self._unflushed >= FLUSH_BYTES:
                self._unflushed = 0
                self._flush_wanted.set()
            self._free.put(index)
            with self._idle:
                self._outstanding -= 1
                self._idle.notify_all()


# --- one download -----------------------------------------------------------------------------


class _WriteFailed(Exception):
    """Internal: the writing thread failed (ENOSPC, EFBIG, EIO)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _CancelledNow(Exception):
    """Internal: the cancel event was seen; turned into `Cancelled` with the byte counts."""


class _Transient(Exception):
    """Internal: an attempt failed in a way worth retrying from the current offset."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


class _Restart(Exception):
    """Internal: the server cannot continue our partial; start over from byte 0 at once."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _SocketWatcher:
    """Shuts the current response's socket down as soon as the cancel event is set."""

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._lock = threading.Lock()
        self._response: HttpResponse | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-cancel", daemon=True)
        self._thread.start()

    def watch(self, response: HttpResponse | None) -> None:
        with self._lock:
            self._response = response
            if response is not None and self._cancel.is_set():
                response.shutdown()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._cancel.wait(CANCEL_POLL):
                with self._lock:
                    if self._response is not None:
                        self._response.shutdown()
                # Keep watching: a response opened after this moment is shut in `watch`.
                self._stopped.wait(CANCEL_POLL)


class _Progress:
    """Throttles the progress callback to one call per PROGRESS_INTERVAL, plus the last one."""

    def __init__(self, callback: ProgressCallback, total: int | None) -> None:
        self._callback = callback
        self.total = total
        self.reused = 0
        self._last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._callback(done, self.total, self.reused)


class _Download:
    """The state of one download_file call (holding the destination lock)."""

    def __init__(
        self,
        planned: PlannedFile,
        *,
        credentials: Credentials,
        settings: TransferSettings,
        cancel: threading.Event,
        on_progress: ProgressCallback,
        on_message: Callable[[str], None],
        bucket: TokenBucket | None,
    ) -> None:
        self.planned = planned
        self.settings = settings
        self.cancel = cancel
        self.on_message = on_message
        self.token: SecretStr | None = credentials.token_for(planned.auth)
        self.progress = _Progress(on_progress, planned.size)
        self.transferred = 0
        self.total: int | None = planned.size  # the file's size once known
        self.bucket = bucket
        scheme = urlsplit(planned.url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise InvalidArgument(
                f"{planned.path}: unsupported URL scheme {scheme!r} ({redact_url(planned.url)})"
            )
        self.is_file_url = scheme == "file"

    # -- the outer flow --

    def run(self) -> FileResult:
        planned = self.planned
        partial = planned.partial
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o644)
        direct_fd = open_direct(partial) if self.settings.direct_io else None
        pipeline: _RingPipeline | None = None
        watcher: _SocketWatcher | None = None
        keep = True  # the partial survives every failure but wrong bytes
        try:
            hasher, offset = self._reuse_partial(fd)
            self._check_free_space(offset)
            pipeline = _RingPipeline(fd, offset, hasher, self._chunk_bytes(), direct_fd)
            watcher = _SocketWatcher(self.cancel)
            self._transfer_with_retries(pipeline, watcher)
            pipeline.drain()
            pipeline.close()
            size, digest = pipeline.submitted, pipeline.hasher.hexdigest()
            pipeline = None
            os.fsync(fd)
            self.progress.total = self.total if self.total is not None else size
            self._verify(size, digest)
            os.close(fd)
            fd = -1
            os.replace(partial, planned.dest)
            _fsync_directory(planned.dest.parent)
            _ensure_link(planned)
            self.progress.update(size, force=True)
            return FileResult(planned.path, planned.dest, size, digest, self.transferred)
        except DataLoss:
            keep = False
            raise
        except _WriteFailed as failed:
            raise self._write_error(failed.error) from None
        except OSError as exc:
            if _is_disk_full(exc):  # ftruncate/fsync/rename can hit it too
                raise self._write_error(exc) from None
            raise
        except _CancelledNow:
            done = pipeline.submitted if pipeline is not None else 0
            raise Cancelled(
                f"{planned.path}: download cancelled; {done} bytes kept for resume",
                reason="CANCELLED",
                metadata={"file": planned.path, "kept_bytes": str(done)},
            ) from None
        finally:
            if watcher is not None:
                watcher.stop()
            if pipeline is not None:
                pipeline.drain(raise_error=False)
                pipeline.close()
            if direct_fd is not None:
                os.close(direct_fd)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(fd)  # a kept partial is durable, so a resume can trust it
                os.close(fd)
            if not keep or planned.partial_bytes() == 0:  # wrong bytes, or none to resume
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()

    def _write_error(self, error: OSError) -> ResourceExhausted | Unavailable:
        directory = self.planned.dest.parent
        if _is_disk_full(error):
            free = shutil.disk_usage(directory).free
            return ResourceExhausted(
                f"{self.planned.path}: the disk is full or the file too large while writing in "
                f"{directory} ({os.strerror(error.errno or 0)}; {free} bytes free); "
                "the partial file is kept",
                reason="DISK_FULL",
                metadata={"directory": str(directory), "free_bytes": str(free)},
            )
        return Unavailable(
            f"{self.planned.path}: cannot write in {directory} ({os.strerror(error.errno or 0)})",
            reason="DOWNLOAD_FAILED",
            metadata={"file": self.planned.path},
        )

    def _chunk_bytes(self) -> int:
        size = max(64 * 1024, self.settings.buffer_bytes)
        if self.bucket is not None:
            # Small reads under a rate limit, so the sleeps stay short and smooth.
            size = min(size, max(16 * 1024, int(self.bucket.burst)))
        return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN  # whole blocks, for direct writes

    def _reuse_partial(self, fd: int) -> tuple[_Hasher, int]:
        """Hash the bytes already in the partial (they are reused); start over when unusable."""
        hasher: _Hasher = hashlib.sha256()
        existing = os.fstat(fd).st_size
        if existing == 0:
            return hasher, 0
        if self.total is not None and existing > self.total:
            self.on_message(
                f"the partial file is larger than expected ({existing} > {self.total} bytes); "
                "starting over"
            )
            os.ftruncate(fd, 0)
            return hasher, 0
        self.on_message(f"resuming: checking {existing} bytes already downloaded")

        def hashed(done: int) -> None:
            self.progress.reused = done
            self.progress.update(done)

        try:
            done = _hash_file_into(hasher, self.planned.partial, existing, self.cancel, hashed)
        except Cancelled:
            raise _CancelledNow() from None
        self.progress.reused = done
        return hasher, done

    def _check_free_space(self, offset: int) -> None:
        if self.total is None:
            return
        remaining = self.total - offset
        if remaining <= 0:
            return
        directory = self.planned.dest.parent
        free = shutil.disk_usage(directory).free
        needed = remaining + self.settings.free_space_margin
        if free < needed:
            raise ResourceExhausted(
                f"not enough free disk space in {directory} for {self.planned.path}: "
                f"{remaining} bytes to download + {self.settings.free_space_margin} bytes margin "
                f"= {needed} bytes needed, {free} bytes free",
                reason="DISK_FULL",
                metadata={
                    "directory": str(directory),
                    "needed_bytes": str(needed),
                    "free_bytes": str(free),
                },
            )

    def _verify(self, size: int, digest: str) -> None:
        planned = self.planned
        if planned.size is not None and size != planned.size:
            raise DataLoss(
                f"{planned.path}: downloaded {size} bytes, expected {planned.size}; "
                "the partial file was deleted",
                reason="HASH_MISMATCH",
                metadata={
                    "file": planned.path,
                    "expected_size": str(planned.size),
                    "actual_size": str(size),
                },
            )
        if planned.sha256 and digest != planned.sha256.lower():
            raise DataLoss(
                f"{planned.path}: sha256 mismatch (expected {planned.sha256.lower()}, got "
                f"{digest}); the partial file was deleted",
                reason="HASH_MISMATCH",
                metadata={
                    "expected": planned.sha256.lower(),
                    "actual": digest,
                    "file": planned.path,
                },
            )

    def _size_mismatch(self, announced: int) -> DataLoss:
        self.on_message(f"the server's file has {announced} bytes, expected {self.planned.size}")
        return DataLoss(
            f"{self.planned.path}: the server announced {announced} bytes, expected "
            f"{self.planned.size}; the partial file was deleted",
            reason="HASH_MISMATCH",
            metadata={
                "file": self.planned.path,
                "expected_size": str(self.planned.size),
                "actual_size": str(announced),
            },
        )

    def _transfer_with_retries(self, pipeline: _RingPipeline, watcher: _SocketWatcher) -> None:
        failures = 0  # consecutive failed attempts without progress
        restarts = 0
        rng = random.Random()
        while True:
            if self.cancel.is_set():
                raise _CancelledNow()
            start = pipeline.submitted
            try:
                if self.is_file_url:
                    self._copy_attempt(pipeline)
                else:
                    self._http_attempt(pipeline, watcher)
                return
            except _Restart as restart:
                restarts += 1
                if restarts > self.settings.max_retries + 1:
                    raise Unavailable(
                        f"{self.planned.path}: the server keeps refusing to resume ({restart.why})",
                        reason="DOWNLOAD_FAILED",
                        metadata={"file": self.planned.path},
                    ) from None
                self.on_message(f"{restart.why}; starting over from byte 0")
                pipeline.drain()
                pipeline.restart(hashlib.sha256())
                self.progress.reused = 0
                continue
            except _Transient as failure:
                if self.cancel.is_set():
                    raise _CancelledNow() from None
                failures = 1 if pipeline.submitted > start else failures + 1
                if failures > self.settings.max_retries:
                    raise Unavailable(
                        f"{self.planned.path}: download failed after "
                        f"{self.settings.max_retries} retries ({failure.what}); "
                        f"{pipeline.submitted} bytes kept for resume",
                        reason="DOWNLOAD_FAILED",
                        metadata={"file": self.planned.path, "kept_bytes": str(pipeline.submitted)},
                    ) from None
                delay = backoff_delay(
                    failures,
                    initial=self.settings.backoff_initial,
                    maximum=self.settings.backoff_max,
                    rng=rng.random,
                )
                if failure.retry_after is not None:
                    delay = min(self.settings.backoff_max, max(delay, failure.retry_after))
                logger.info(
                    "%s: retrying in %.1f s after %s (%d/%d)",
                    self.planned.path,
                    delay,
                    failure.what,
                    failures,
                    self.settings.max_retries,
                )
                self.on_message(
                    f"retrying after {failure.what} ({failures}/{self.settings.max_retries})"
                )
                if self.cancel.wait(delay):
                    raise _CancelledNow() from None

    # -- one HTTP attempt --

    def _http_attempt(self, pipeline: _RingPipeline, watcher: _SocketWatcher) -> None:
        """One request from the current offset; returns when the file is complete."""
        offset = pipeline.submitted
        if self.total is not None and offset == self.total and offset > 0:
            return  # the partial is already complete: nothing to ask for
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        try:
            response = self._open(headers)
        except Unavailable as exc:
            raise _Transient(_short_reason(exc.message)) from None
        watcher.watch(response)
        try:
            expected_end = self._check_response(response, offset, pipeline)
            if expected_end is not None and expected_end == offset:
                return
            response.set_read_timeout(self.settings.stall_timeout)
            self._receive(response, pipeline, expected_end)
        finally:
            watcher.watch(None)
            response.close()

    def _open(self, headers: dict[str, str]) -> HttpResponse:
        """`open_url` in a helper thread, so a cancel is not held up by a slow connect.

        Until the headers arrive there is no socket for the watcher to shut down; on a cancel
        the helper is abandoned and closes its response itself when it finally gets one.
        """
        outcome: list[HttpResponse | BaseException] = []
        lock = threading.Lock()
        abandoned = False
        done = threading.Event()

        def request() -> None:
            try:
                result: HttpResponse | BaseException = open_url(
                    self.planned.url,
                    headers=headers,
                    token=self.token,
                    timeout=self.settings.connect_timeout,
                )
            except BaseException as exc:  # handed to the waiting thread below
                result = exc
            with lock:
                if abandoned and isinstance(result, HttpResponse):
                    result.close()
                outcome.append(result)
            done.set()

        threading.Thread(target=request, name="transfer-connect", daemon=True).start()
        while not done.wait(CANCEL_POLL):
            if self.cancel.is_set():
                with lock:
                    if not outcome:
                        abandoned = True
                        raise _CancelledNow()
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _check_response(
        self, response: HttpResponse, offset: int, pipeline: _RingPipeline
    ) -> int | None:
        """Validate the status and headers; returns where the body ends (None: at EOF)."""
        status = response.status
        planned = self.planned
        if status == 206:
            content_range = parse_content_range(response.header("Content-Range"))
            if content_range is None or content_range.start != offset:
                raise _Restart("the server answered a different range than asked")
            total = content_range.total
            if total is not None and planned.size is not None and total != planned.size:
                raise self._size_mismatch(total)
            if total is not None:
                self._learn_total(total, offset)
            assert content_range.end is not None
            return content_range.end + 1
        if status == 200:
            if offset > 0:
                # A 200 to a Range request is the whole file: take it from byte 0.
                self.on_message("the server ignored the range request; starting over from byte 0")
                pipeline.drain()
                pipeline.restart(hashlib.sha256())
                self.progress.reused = 0
            length_text = response.header("Content-Length")
            length = int(length_text) if length_text.isdigit() else None
            if length is not None and planned.size is not None and length != planned.size:
                raise self._size_mismatch(length)
            if length is not None:
                self._learn_total(length, 0)
                return length
            return self.total  # no length (chunked): an early EOF still shows against the size
        if status == 416:
            content_range = parse_content_range(response.header("Content-Range"))
            total = content_range.total if content_range is not None else None
            if offset > 0 and (total == offset or (total is None and planned.size == offset)):
                return offset  # the partial is complete: verify and finish
            raise _Restart("the server cannot continue the partial file (HTTP 416)")
        if status in TRANSIENT_STATUSES:
            retry_after = response.header("Retry-After")
            raise _Transient(
                f"HTTP {status}",
                retry_after=float(retry_after) if retry_after.isdigit() else None,
            )
        raise_for_status(
            response,
            what=planned.path,
            token=self.token,
            token_setting=TOKEN_SETTINGS.get(planned.auth, ""),
        )
        raise Unavailable(  # a 1xx/3xx that open_url did not resolve
            f"{planned.path}: unexpected HTTP {status} from {redact_url(response.url)}",
            reason="DOWNLOAD_FAILED",
        )

    def _learn_total(self, total: int, offset: int) -> None:
        if self.total is None:
            self.total = total
            self.progress.total = total
            self._check_free_space(offset)

    def _receive(
        self, response: HttpResponse, pipeline: _RingPipeline, expected_end: int | None
    ) -> None:
        """Read the body into the ring until EOF; the bytes go on to the hash and the disk."""
        eof = False
        while not eof:
            if self.cancel.is_set():
                raise _CancelledNow()
            index = pipeline.acquire(self.cancel)
            view = pipeline.views[index][: pipeline.fill_limit()]
            filled = 0
            # The buffer fills by reads of at most READ_BYTES: a buffered readinto that fails
            # (a stall's timeout, a reset) loses the count of what it had read, so a fault
            # costs at most one such read, not a whole buffer, and the retry's Range starts
            # after every byte that was counted.
            failure: BaseException | None = None
            while filled < len(view):
                try:
                    n = response.readinto(view[filled : filled + READ_BYTES])
                except (OSError, http.client.HTTPException) as exc:
                    failure = exc
                    break
                if n == 0:
                    eof = True
                    break
                filled += n
            if filled:
                self._accept(pipeline, index, filled)
            else:
                pipeline.release(index)
            if failure is not None:
                if self.cancel.is_set():
                    raise _CancelledNow() from None
                raise _Transient(self._describe(failure)) from None
        if self.cancel.is_set():
            raise _CancelledNow()  # the watcher's shutdown looks like an EOF
        if expected_end is not None and pipeline.submitted < expected_end:
            raise _Transient("connection closed early")

    def _accept(self, pipeline: _RingPipeline, index: int, n: int) -> None:
        """Hand a filled buffer on; account for progress and the bandwidth limit."""
        if self.total is not None and pipeline.submitted + n > self.total:
            pipeline.release(index)
            raise self._size_mismatch(pipeline.submitted + n)
        pipeline.submit(index, n)
        self.transferred += n
        self.progress.update(pipeline.submitted)
        if self.bucket is not None:
            wait = self.bucket.reserve(n)
            if wait > 0 and self.cancel.wait(wait):
                raise _CancelledNow()

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"a stall (no data for {self.settings.stall_timeout:g} s)"
        if isinstance(exc, ConnectionResetError):
            return "connection reset"
        if isinstance(exc, ConnectionAbortedError | BrokenPipeError):
            return "connection aborted"
        if isinstance(exc, http.client.IncompleteRead):
            return "connection closed early"
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror.lower()
        return type(exc).__name__

    # -- one local copy (file://) --

    def _copy_attempt(self, pipeline: _RingPipeline) -> None:
        source = Path(unquote(urlsplit(self.planned.url).path))
        try:
            file = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(
                f"{self.planned.path}: {source} does not exist",
                resource_type="file",
                resource_name=str(source),
                reason="FILE_NOT_FOUND",
            ) from None
        with file:
            size = os.fstat(file.fileno()).st_size
            if self.planned.size is not None and size != self.planned.size:
                raise self._size_mismatch(size)
            self._learn_total(size, pipeline.submitted)
            offset = pipeline.submitted
            if offset > size:
                raise _Restart("the partial file is larger than the source")
            file.seek(offset)
            while True:
                if self.cancel.is_set():
                    raise _CancelledNow()
                index = pipeline.acquire(self.cancel)
                n = file.readinto(pipeline.views[index][: pipeline.fill_limit()])
                if not n:
                    pipeline.release(index)
                    break
                self._accept(pipeline, index, n)


def _short_reason(message: str) -> str:
    """The cause part of an http.open_url error ("cannot reach URL: connection refused")."""
    return message.rsplit(": ", 1)[-1] if ": " in message else message


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


__all__ = [
    "DIRECT_ALIGN",
    "ContentRange",
    "ProgressCallback",
    "TokenBucket",
    "TransferSettings",
    "backoff_delay",
    "download_file",
    "file_sha256",
    "open_direct",
    "parse_content_range",
]
