"""The transfer engine's pure parts: Content-Range parsing, backoff, the token bucket, hashing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from services.common.errors import Cancelled
from services.provisioner.transfer import (
    ContentRange,
    TokenBucket,
    backoff_delay,
    file_sha256,
    parse_content_range,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes 0-99/100", ContentRange(0, 99, 100)),
        ("bytes 100-199/1000", ContentRange(100, 199, 1000)),
        ("bytes 5-9/*", ContentRange(5, 9, None)),
        ("bytes */1000", ContentRange(None, None, 1000)),
        ("BYTES 1-1/2", ContentRange(1, 1, 2)),
        ("  bytes 0-0/1 ", ContentRange(0, 0, 1)),
    ],
)
def test_parse_content_range_valid(header: str, expected: ContentRange) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "bytes",
        "bytes 10-5/100",  # end before start
        "bytes 0-100/100",  # end beyond the total
        "items 0-1/2",
        "bytes 0-/100",
        "bytes -5/100",
        "bytes 1-2",
        "bytes */*",
    ],
)
def test_parse_content_range_invalid(header: str) -> None:
    assert parse_content_range(header) is None


def test_backoff_ceiling_doubles_up_to_the_maximum() -> None:
    # rng=1.0 gives the ceiling itself, rng=0.0 its lower half.
    top = [backoff_delay(n, initial=0.5, maximum=4.0, rng=lambda: 1.0) for n in range(1, 7)]
    assert top == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = [backoff_delay(n, initial=0.5, maximum=4.0, rng=lambda: 0.0) for n in range(1, 5)]
    assert low == [0.25, 0.5, 1.0, 2.0]


def test_backoff_jitter_stays_in_the_upper_half() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(3, initial=1.0, maximum=30.0, rng=rng.random) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # actually jittered


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 500, clock=clock)
    assert bucket.reserve(500) == 0.0  # the burst is available at once
    assert bucket.reserve(250) == pytest.approx(0.25)  # then debt at 1000 B/s
    clock.now += 0.25
    assert bucket.reserve(0) == 0.0  # the debt is paid off
    clock.now += 10.0  # refill is capped at the burst
    assert bucket.reserve(500) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)


def test_token_bucket_long_run_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, 100_000, clock=clock)
    start = clock.now
    for _ in range(100):  # 10 MB in 100 KB reads, sleeping as told
        clock.now += bucket.reserve(100_000)
    assert clock.now - start == pytest.approx(9.9, rel=0.01)  # 10 MB minus the first burst


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 10)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # about 10 MB, spans several read chunks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_file_sha256_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled) as info:
        file_sha256(path, cancel)
    assert info.value.reason == "CANCELLED"


def test_destination_lock_excludes_waits_on_cancel_and_cleans_up(tmp_path: Path) -> None:
    from services.provisioner.transfer import _destination_lock

    dest = tmp_path / "model.gguf"
    lock_file = tmp_path / "model.gguf.lock"
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with _destination_lock(dest, threading.Event()):
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    assert lock_file.exists()
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled), _destination_lock(dest, cancel):
        pytest.fail("acquired a lock that another holder has")
    release.set()
    holder.join(5)
    assert not lock_file.exists()  # released locks leave nothing behind
    with _destination_lock(dest, threading.Event()):  # and can be taken again
        assert lock_file.exists()
