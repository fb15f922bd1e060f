"""Smoke test of the download benchmark at a tiny scale: every contender is measured and printed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from bench.download import (
    CURL,
    HF,
    LABELS,
    RBEE,
    SHARDED_LABELS,
    BenchConfig,
    parse_size,
    render_table,
    run_benchmark,
    write_sharded_repo,
    write_source_file,
)

pytestmark = pytest.mark.integration

SIZE = 8 * 2**20


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (contender (a))")
def test_benchmark_measures_and_prints_every_contender(tmp_path: Path) -> None:
    result = run_benchmark(BenchConfig(size=SIZE, rounds=1, workdir=tmp_path))

    assert list(result.rows) == [CURL, HF, RBEE]
    for row in result.rows.values():
        assert row.measured, row
        assert len(row.runs) == 1
        assert row.runs[0].seconds > 0
    rbee_run = result.rows[RBEE].runs[0]
    assert rbee_run.rss_growth is not None and rbee_run.rss_before
    assert rbee_run.rss_samples >= 2  # the value before the pull and at least one during/after

    text = render_table(result, "python -m bench.download --size 8MiB --rounds 1")
    assert "python -m bench.download --size 8MiB --rounds 1" in text
    assert "size:     8,388,608 bytes" in text
    for label in LABELS.values():
        assert label in text
    target_lines = [line for line in text.splitlines() if line.startswith("target ")]
    assert len(target_lines) == 3
    assert all(line.endswith(("PASS", "MISS")) for line in target_lines), target_lines
    # The work directory (source, downloads, both services' homes) is removed unless --keep.
    assert not result.workdir.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (contender (a))")
def test_sharded_mode_pulls_every_file_of_the_repo(tmp_path: Path) -> None:
    config = BenchConfig(size=SIZE, rounds=1, workdir=tmp_path, files=3, parallel_files=2)
    result = run_benchmark(config)
    assert result.sharded
    assert SIZE < result.size < SIZE + 4096  # the weights, plus config.json and the index
    for row in result.rows.values():
        assert row.measured, row
    text = render_table(result, "python -m bench.download --files 3")
    for label in SHARDED_LABELS.values():
        assert label in text
    assert "RBEE_PROVISIONER_PARALLEL_FILES=2" in text
    assert [line for line in text.splitlines() if line.startswith("target ")] == []
    assert len([line for line in text.splitlines() if line.startswith("(info) (c) vs")]) == 2


def test_sharded_repo_shards_differ_and_add_up(tmp_path: Path) -> None:
    files = write_sharded_repo(tmp_path, 10_000_003, 3)
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sum(files[name].stat().st_size for name in shards) == 10_000_003
    # Distinct bytes: the HF cache stores blobs by sha256, so equal shards would be one blob.
    assert len({files[name].read_bytes()[:4096] for name in shards}) == 3
    index = json.loads(files["model.safetensors.index.json"].read_text())
    assert sorted(set(index["weight_map"].values())) == shards


def test_source_file_is_a_valid_safetensors_of_the_exact_size(tmp_path: Path) -> None:
    for size in (1000, 4096 + 3, SIZE):
        path = write_source_file(tmp_path / f"{size}.safetensors", size)
        data = path.read_bytes()
        assert len(data) == size
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        start, end = header["weight"]["data_offsets"]
        assert 8 + header_len + end == size and start == 0
        assert header["weight"]["shape"] == [end]
        assert header_len % 8 == 0
        assert data[8 + header_len :] == bytes(end)  # the hole reads as zeros


def test_parse_size_units() -> None:
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    assert parse_size("8mib") == 8 * 2**20
