"""The transfer engine against a real HTTP server on 127.0.0.1:0 (the shared fake CDN).

Every fault is a real one: the server drops the connection, stalls, answers 503/404, corrupts a
byte or ignores Range; the disk-full case runs under a real RLIMIT_FSIZE in a subprocess.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.common.errors import (
    Cancelled,
    DataLoss,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.provisioner.domain import AuthScope, Credentials, FileResult, PlannedFile
from services.provisioner.transfer import (
    DIRECT_ALIGN,
    TransferSettings,
    download_file,
    open_direct,
)
from tests.fixtures.fake_cdn import Exchange, FakeCdn, FakeHttpServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
# Small buffers and fast retries keep every test to a fraction of a second.
FAST = TransferSettings(
    buffer_bytes=64 * 1024,
    backoff_initial=0.02,
    backoff_max=0.1,
    stall_timeout=0.5,
    connect_timeout=2.0,
    free_space_margin=0,
)


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes (no two 32-byte blocks alike)."""
    blocks = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


@dataclass
class Recorder:
    """Collects progress calls and messages."""

    progress: list[tuple[int, int | None, int]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def on_progress(self, done: int, total: int | None, reused: int) -> None:
        self.progress.append((done, total, reused))


@pytest.fixture
def cdn() -> Iterator[FakeCdn]:
    with FakeCdn() as server:
        yield server


def plan(
    tmp_path: Path,
    cdn: FakeCdn,
    data: bytes,
    *,
    known_hash: bool = True,
    known_size: bool = True,
    name: str = "model.gguf",
    link: Path | None = None,
) -> PlannedFile:
    key = cdn.add_blob(data)
    return PlannedFile(
        path=name,
        url=cdn.url_for(key, name),
        dest=tmp_path / "blobs" / name,
        size=len(data) if known_size else None,
        sha256=key if known_hash else None,
        link=link,
    )


def fetch(
    planned: PlannedFile,
    recorder: Recorder | None = None,
    *,
    settings: TransferSettings = FAST,
    cancel: threading.Event | None = None,
    credentials: Credentials | None = None,
) -> FileResult:
    rec = recorder or Recorder()
    return download_file(
        planned,
        credentials=credentials or Credentials(),
        settings=settings,
        cancel=cancel or threading.Event(),
        on_progress=rec.on_progress,
        on_message=rec.messages.append,
    )


def blob_requests(cdn: FakeCdn) -> list[tuple[str | None, int, int]]:
    return [(r.range, r.status, r.body_bytes) for r in cdn.requests if r.path.startswith("/blobs")]


# --- the happy paths --------------------------------------------------------------------------


def test_full_download_verified(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(3 * MIB + 123)
    planned = plan(tmp_path, cdn, data)
    rec = Recorder()
    result = fetch(planned, rec)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == len(data) and result.transferred == len(data)
    assert planned.dest.read_bytes() == data
    assert not planned.partial.exists()
    assert sorted(p.name for p in planned.dest.parent.iterdir()) == ["model.gguf"]  # no lock left
    assert rec.progress[-1] == (len(data), len(data), 0)
    dones = [p[0] for p in rec.progress]
    assert dones == sorted(dones)
    assert blob_requests(cdn) == [(None, 200, len(data))]


def test_unknown_hash_and_size_returns_the_computed_sha256(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(MIB + 5, seed=2)
    planned = plan(tmp_path, cdn, data, known_hash=False, known_size=False)
    rec = Recorder()
    result = fetch(planned, rec)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert rec.progress[-1] == (len(data), len(data), 0)  # the total learned from the server


def test_link_is_relative_and_atomic(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(200_000)
    link = tmp_path / "snapshots" / "abc123" / "sub" / "model.gguf"
    planned = plan(tmp_path, cdn, data, link=link)
    fetch(planned)
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert os.readlink(link) == os.path.relpath(planned.dest, link.parent)
    assert link.read_bytes() == data
    # A stale link is replaced; a cached file only needs its link.
    link.unlink()
    link.symlink_to("elsewhere")
    cached = PlannedFile(**{**planned.__dict__, "cached": True})
    result = fetch(cached)
    assert result.transferred == 0 and result.sha256 == hashlib.sha256(data).hexdigest()
    assert link.read_bytes() == data
    assert len(blob_requests(cdn)) == 1  # the cached pull asked nothing
    assert [p.name for p in link.parent.iterdir()] == ["model.gguf"]  # no temp link left


def test_file_url_copy_and_resume(tmp_path: Path) -> None:
    data = payload(2 * MIB + 7, seed=3)
    source = tmp_path / "src dir" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(data)
    planned = PlannedFile(
        path="weights.bin",
        url=source.as_uri(),
        dest=tmp_path / "models" / "weights.bin",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    planned.dest.parent.mkdir()
    planned.partial.write_bytes(data[:MIB])
    rec = Recorder()
    result = fetch(planned, rec)
    assert planned.dest.read_bytes() == data
    assert result.transferred == len(data) - MIB
    assert rec.progress[-1] == (len(data), len(data), MIB)


def test_bandwidth_limit_slows_the_transfer(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(600_000, seed=4)
    planned = plan(tmp_path, cdn, data)
    settings = TransferSettings(buffer_bytes=64 * 1024, bandwidth_limit=1_000_000)
    started = time.monotonic()
    fetch(planned, settings=settings)
    # 600 kB at 1 MB/s with a 100 kB burst cannot take less than 0.5 s.
    assert time.monotonic() - started >= 0.45
    assert planned.dest.read_bytes() == data


# --- resume -----------------------------------------------------------------------------------


def test_resume_sends_range_and_only_the_missing_bytes(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(3 * MIB, seed=5)
    planned = plan(tmp_path, cdn, data)
    planned.dest.parent.mkdir()
    kept = MIB + 1000
    planned.partial.write_bytes(data[:kept])
    rec = Recorder()
    result = fetch(planned, rec)
    assert blob_requests(cdn) == [(f"bytes={kept}-", 206, len(data) - kept)]
    assert result.transferred == len(data) - kept
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert rec.progress[-1] == (len(data), len(data), kept)
    assert planned.dest.read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(MIB, seed=6)
    planned = plan(tmp_path, cdn, data)
    planned.dest.parent.mkdir()
    planned.partial.write_bytes(b"\0" * 1000)  # wrong bytes: must not survive
    cdn.faults.ignore_range = True
    rec = Recorder()
    result = fetch(planned, rec)
    assert planned.dest.read_bytes() == data
    assert result.transferred == len(data)
    assert rec.progress[-1] == (len(data), len(data), 0)
    assert any("ignored the range" in m for m in rec.messages)


def test_complete_partial_with_unknown_size_is_verified_after_416(
    tmp_path: Path, cdn: FakeCdn
) -> None:
    data = payload(300_000, seed=7)
    planned = plan(tmp_path, cdn, data, known_size=False)
    planned.dest.parent.mkdir()
    planned.partial.write_bytes(data)
    result = fetch(planned)
    assert blob_requests(cdn) == [(f"bytes={len(data)}-", 416, 0)]
    assert result.transferred == 0 and result.size == len(data)
    assert planned.dest.read_bytes() == data


def test_complete_partial_with_known_size_needs_no_request(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(300_000, seed=8)
    planned = plan(tmp_path, cdn, data)
    planned.dest.parent.mkdir()
    planned.partial.write_bytes(data)
    result = fetch(planned)
    assert blob_requests(cdn) == []
    assert result.transferred == 0 and planned.dest.read_bytes() == data


# --- transient failures -----------------------------------------------------------------------


def test_dropped_connection_is_retried_from_the_offset(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(2 * MIB, seed=9)
    planned = plan(tmp_path, cdn, data)
    cdn.faults.drop_after_bytes = 700_000
    cdn.faults.drop_count = 2
    rec = Recorder()
    result = fetch(planned, rec)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    requests = blob_requests(cdn)
    assert len(requests) == 3
    assert requests[0][0] is None and requests[1][0] is not None
    # No byte was fetched twice beyond the partial buffer lost in the drop.
    assert sum(r[2] for r in requests) < len(data) + 2 * FAST.buffer_bytes
    # Both attempts made progress, so neither used up the retry budget.
    assert [m for m in rec.messages if m.startswith("retrying")] == [
        f"retrying after connection closed early (1/{FAST.max_retries})"
    ] * 2


def test_stall_is_retried(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(MIB, seed=10)
    planned = plan(tmp_path, cdn, data)
    cdn.faults.stall_after_bytes = 300_000
    cdn.faults.stall_seconds = 30.0
    rec = Recorder()
    started = time.monotonic()
    result = fetch(planned, rec)
    assert time.monotonic() - started < 5
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert any("stall" in m for m in rec.messages)
    assert len(blob_requests(cdn)) == 2


def test_503_twice_is_retried(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(500_000, seed=11)
    planned = plan(tmp_path, cdn, data)
    cdn.faults.fail_status = 503
    cdn.faults.fail_count = 2
    rec = Recorder()
    result = fetch(planned, rec)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert [r[1] for r in blob_requests(cdn)] == [503, 503, 200]
    assert rec.messages == ["retrying after HTTP 503 (1/5)", "retrying after HTTP 503 (2/5)"]


def test_retries_exhausted_keep_the_partial(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(MIB, seed=12)
    planned = plan(tmp_path, cdn, data)
    settings = TransferSettings(
        buffer_bytes=64 * 1024, max_retries=2, backoff_initial=0.01, backoff_max=0.02
    )
    cdn.faults.drop_after_bytes = 256 * 1024  # the first attempt makes progress...

    def fail_later(done: int, total: int | None, reused: int) -> None:
        cdn.faults.fail_status = 500  # ...then every later one fails
        cdn.faults.fail_count = 1000

    with pytest.raises(Unavailable) as info:
        download_file(
            planned,
            credentials=Credentials(),
            settings=settings,
            cancel=threading.Event(),
            on_progress=fail_later,
        )
    assert info.value.reason == "DOWNLOAD_FAILED"
    assert planned.partial.stat().st_size == 256 * 1024
    assert not planned.dest.exists()
    assert [r[1] for r in blob_requests(cdn)] == [200, 500, 500]
    assert "X-Signature" not in info.value.message


def test_connection_refused_fails_after_retries(tmp_path: Path) -> None:
    server = FakeCdn().start()
    dead_url = f"{server.base_url}/blobs/x?X-Signature=secret"
    server.stop()
    planned = PlannedFile(path="f", url=dead_url, dest=tmp_path / "f", size=10)
    rec = Recorder()
    settings = TransferSettings(max_retries=2, backoff_initial=0.01, backoff_max=0.02)
    with pytest.raises(Unavailable) as info:
        fetch(planned, rec, settings=settings)
    assert info.value.reason == "DOWNLOAD_FAILED"
    assert rec.messages == [
        "retrying after connection refused (1/2)",
        "retrying after connection refused (2/2)",
    ]
    assert "secret" not in info.value.message


# --- permanent failures -----------------------------------------------------------------------


def test_404_fails_at_once(tmp_path: Path, cdn: FakeCdn) -> None:
    planned = plan(tmp_path, cdn, payload(1000))
    cdn.faults.fail_status = 404
    rec = Recorder()
    with pytest.raises(NotFound) as info:
        fetch(planned, rec)
    assert info.value.reason == "REMOTE_FILE_NOT_FOUND"
    assert len(blob_requests(cdn)) == 1 and rec.messages == []


def test_hash_mismatch_deletes_the_partial(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(MIB, seed=13)
    planned = plan(tmp_path, cdn, data)
    cdn.faults.corrupt = True
    with pytest.raises(DataLoss) as info:
        fetch(planned)
    error = info.value
    assert error.reason == "HASH_MISMATCH"
    assert error.metadata["expected"] == hashlib.sha256(data).hexdigest()
    assert error.metadata["actual"] != error.metadata["expected"]
    assert error.metadata["file"] == "model.gguf"
    assert not planned.partial.exists() and not planned.dest.exists()


def test_size_announced_differently_fails(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(1000)
    planned = PlannedFile(**{**plan(tmp_path, cdn, data).__dict__, "size": 999})
    planned.dest.parent.mkdir()
    planned.partial.write_bytes(data[:10])
    with pytest.raises(DataLoss) as info:
        fetch(planned)
    assert info.value.reason == "HASH_MISMATCH"
    assert info.value.metadata["actual_size"] == "1000"
    assert not planned.dest.exists() and not planned.partial.exists()


def test_free_space_check_before_the_transfer(tmp_path: Path, cdn: FakeCdn) -> None:
    planned = plan(tmp_path, cdn, payload(1000))
    settings = TransferSettings(free_space_margin=1 << 62)  # more than any real disk
    with pytest.raises(ResourceExhausted) as info:
        fetch(planned, settings=settings)
    assert info.value.reason == "DISK_FULL"
    assert info.value.metadata["directory"] == str(planned.dest.parent)
    assert str(planned.dest.parent) in info.value.message
    assert blob_requests(cdn) == []


_RLIMIT_CHILD = """
import json, resource, sys, threading
from pathlib import Path
from services.common.errors import RbeeError
from services.provisioner.domain import Credentials, PlannedFile
from services.provisioner.transfer import TransferSettings, download_file
url, dest, size, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
planned = PlannedFile(path="big.bin", url=url, dest=dest, size=size)
try:
    download_file(planned, credentials=Credentials(), cancel=threading.Event(),
                  settings=TransferSettings(buffer_bytes=64 * 1024, free_space_margin=0),
                  on_progress=lambda *a: None)
    print(json.dumps({"reason": None}))
except RbeeError as exc:
    print(json.dumps({"reason": exc.reason, "type": type(exc).__name__, "message": exc.message}))
"""


def test_file_size_limit_while_writing_is_disk_full(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(2 * MIB, seed=14)
    planned = plan(tmp_path, cdn, data, known_hash=False)
    planned.dest.parent.mkdir()
    limit = MIB
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _RLIMIT_CHILD,
            planned.url,
            str(planned.dest),
            str(len(data)),
            str(limit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout)
    assert outcome["reason"] == "DISK_FULL" and outcome["type"] == "ResourceExhausted"
    assert str(planned.dest.parent) in outcome["message"]
    assert planned.partial.stat().st_size == limit  # kept for resume
    assert planned.partial.read_bytes() == data[:limit]
    assert not planned.dest.exists()


# --- cancellation -----------------------------------------------------------------------------


def test_cancel_during_a_stalled_read_returns_fast_and_resumes(
    tmp_path: Path, cdn: FakeCdn
) -> None:
    data = payload(2 * MIB, seed=15)
    planned = plan(tmp_path, cdn, data)
    stall_at = 512 * 1024  # a multiple of the buffer: every byte before it reaches the disk
    cdn.faults.stall_after_bytes = stall_at
    cdn.faults.stall_seconds = 30.0
    settings = TransferSettings(buffer_bytes=64 * 1024, stall_timeout=30.0)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def cancel_when_stalled() -> None:
        deadline = time.monotonic() + 10
        while cdn.body_bytes_sent() < stall_at and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the reader is now blocked on a silent socket
        cancelled_at.append(time.monotonic())
        cancel.set()

    threading.Thread(target=cancel_when_stalled, daemon=True).start()
    with pytest.raises(Cancelled) as info:
        fetch(planned, settings=settings, cancel=cancel)
    assert time.monotonic() - cancelled_at[0] < 1.0
    assert info.value.reason == "CANCELLED"
    assert planned.partial.stat().st_size == stall_at
    assert not planned.dest.exists()

    # Pulled again: resumes from the kept bytes.
    rec = Recorder()
    result = fetch(planned, rec)
    assert result.transferred == len(data) - stall_at
    assert rec.progress[-1] == (len(data), len(data), stall_at)
    assert blob_requests(cdn)[-1] == (f"bytes={stall_at}-", 206, len(data) - stall_at)
    assert planned.dest.read_bytes() == data


def test_cancel_during_backoff(tmp_path: Path, cdn: FakeCdn) -> None:
    planned = plan(tmp_path, cdn, payload(1000))
    cdn.faults.fail_status = 503
    cdn.faults.fail_count = 100
    settings = TransferSettings(backoff_initial=20.0, backoff_max=30.0)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        fetch(planned, settings=settings, cancel=cancel)
    assert time.monotonic() - started < 2.0


def test_cancel_while_the_server_never_answers(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        planned = PlannedFile(
            path="f", url=f"http://127.0.0.1:{port}/f", dest=tmp_path / "f", size=100
        )
        settings = TransferSettings(connect_timeout=30.0, stall_timeout=30.0)
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            fetch(planned, settings=settings, cancel=cancel)
        assert time.monotonic() - started < 1.5


# --- concurrency and secrets ------------------------------------------------------------------


def test_two_concurrent_downloads_of_one_file_transfer_once(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(2 * MIB, seed=16)
    planned = plan(tmp_path, cdn, data)
    results: list[FileResult] = []
    errors: list[BaseException] = []
    settings = TransferSettings(buffer_bytes=64 * 1024, bandwidth_limit=8 * MIB)

    def run() -> None:
        try:
            results.append(fetch(planned, settings=settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert errors == []
    assert sorted(r.transferred for r in results) == [0, len(data)]
    assert cdn.body_bytes_sent() == len(data)
    assert planned.dest.read_bytes() == data


class RedirectingApi(FakeHttpServer):
    """An API origin that 302s every download to a CDN on another port (as the Hub does)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def route(self, exchange: Exchange) -> None:
        exchange.send(302, headers=[("Location", self.target)])


def test_token_goes_only_to_the_first_origin(tmp_path: Path, cdn: FakeCdn) -> None:
    data = payload(100_000, seed=17)
    key = cdn.add_blob(data)
    token = "hf_supersecret_token_123"
    with RedirectingApi(cdn.url_for(key, "m.gguf")) as api:
        planned = PlannedFile(
            path="m.gguf",
            url=f"{api.base_url}/org/repo/resolve/main/m.gguf",
            dest=tmp_path / "m.gguf",
            size=len(data),
            sha256=key,
            auth=AuthScope.HUGGINGFACE,
        )
        credentials = Credentials(hf_token=SecretStr(token))
        fetch(planned, credentials=credentials)
        assert api.requests[0].headers["authorization"] == f"Bearer {token}"
        assert [r.headers.get("authorization") for r in cdn.requests] == [None]

        # A refusal from the CDN names neither the token nor the signed query.
        os.unlink(planned.dest)
        cdn.faults.fail_status = 403
        rec = Recorder()
        with pytest.raises(PermissionDenied) as info:
            fetch(planned, rec, credentials=credentials)
        text = " ".join([info.value.message, *info.value.metadata.values(), *rec.messages])
        assert token not in text and "X-Signature" not in text


# --- direct I/O --------------------------------------------------------------------------------


@dataclass
class WriteSpy:
    """Every pwrite of the transfer engine: (O_DIRECT?, offset, length)."""

    writes: list[tuple[bool, int, int]] = field(default_factory=list)
    refuse_direct: int = 0  # the next this many direct writes fail with EINVAL

    def direct(self) -> list[tuple[int, int]]:
        return [(offset, length) for direct, offset, length in self.writes if direct]

    def buffered_bytes(self) -> int:
        return sum(length for direct, _, length in self.writes if not direct)


@pytest.fixture
def write_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteSpy:
    probe = tmp_path / "probe"
    probe.touch()
    fd = open_direct(probe)
    if fd is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    os.close(fd)
    probe.unlink()
    spy = WriteSpy()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if direct and spy.refuse_direct > 0:
            spy.refuse_direct -= 1
            raise OSError(errno.EINVAL, "Invalid argument")
        written = real_pwrite(fd, data, offset)
        spy.writes.append((direct, offset, written))
        return written

    monkeypatch.setattr(os, "pwrite", pwrite)
    return spy


def assert_aligned(spy: WriteSpy) -> None:
    for offset, length in spy.direct():
        assert offset % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0, (offset, length)


def test_direct_io_writes_whole_blocks_direct_and_the_tail_buffered(
    tmp_path: Path, cdn: FakeCdn, write_spy: WriteSpy
) -> None:
    data = payload(3 * MIB + 123, seed=18)
    planned = plan(tmp_path, cdn, data)
    result = fetch(planned)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert planned.dest.read_bytes() == data
    assert_aligned(write_spy)
    assert sum(length for _, length in write_spy.direct()) == 3 * MIB
    assert write_spy.buffered_bytes() == 123


def test_resume_from_an_unaligned_partial_realigns_after_one_short_buffer(
    tmp_path: Path, cdn: FakeCdn, write_spy: WriteSpy
) -> None:
    data = payload(3 * MIB, seed=19)
    planned = plan(tmp_path, cdn, data)
    planned.dest.parent.mkdir()
    kept = MIB + 1000
    planned.partial.write_bytes(data[:kept])
    result = fetch(planned)
    assert result.transferred == len(data) - kept
    assert planned.dest.read_bytes() == data
    assert_aligned(write_spy)
    # One buffer of 64 KiB - 1000 bytes brings the offset to a block boundary, through the page
    # cache; everything after it goes direct.
    assert write_spy.writes[0] == (False, kept, FAST.buffer_bytes - 1000)
    assert write_spy.buffered_bytes() == FAST.buffer_bytes - 1000


def test_dropped_connection_mid_block_keeps_direct_writes_aligned(
    tmp_path: Path, cdn: FakeCdn, write_spy: WriteSpy
) -> None:
    data = payload(2 * MIB, seed=20)
    planned = plan(tmp_path, cdn, data)
    cdn.faults.drop_after_bytes = 700_001
    cdn.faults.drop_count = 2
    result = fetch(planned)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert planned.dest.read_bytes() == data
    assert_aligned(write_spy)
    # Per drop: the unaligned end of what was received, then the short buffer that realigns.
    assert write_spy.buffered_bytes() <= 2 * (DIRECT_ALIGN + FAST.buffer_bytes)
    assert sum(length for _, length in write_spy.direct()) >= len(data) - 2 * (
        DIRECT_ALIGN + FAST.buffer_bytes
    )


def test_direct_io_off_writes_through_the_page_cache(
    tmp_path: Path, cdn: FakeCdn, write_spy: WriteSpy
) -> None:
    data = payload(MIB + 5, seed=21)
    planned = plan(tmp_path, cdn, data)
    fetch(planned, settings=replace(FAST, direct_io=False))
    assert planned.dest.read_bytes() == data
    assert write_spy.direct() == [] and write_spy.buffered_bytes() == len(data)


def test_a_refused_direct_write_falls_back_to_buffered(
    tmp_path: Path, cdn: FakeCdn, write_spy: WriteSpy
) -> None:
    data = payload(MIB, seed=22)
    planned = plan(tmp_path, cdn, data)
    write_spy.refuse_direct = 1
    result = fetch(planned)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert planned.dest.read_bytes() == data
    assert write_spy.direct() == [] and write_spy.buffered_bytes() == len(data)


def test_no_direct_io_where_the_filesystem_refuses_it(
    tmp_path: Path, cdn: FakeCdn, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_open)
    data = payload(MIB + 7, seed=23)
    planned = plan(tmp_path, cdn, data)
    result = fetch(planned)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert planned.dest.read_bytes() == data
