"""Smoke test of the cold-start benchmark at a tiny scale: every phase is measured and printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.coldstart import (
    COLD,
    LABELS,
    NO_EVICTION_FILESYSTEMS,
    PRELOAD_SPAWN,
    WARM,
    BenchConfig,
    model_dims,
    render_table,
    run_benchmark,
    write_model,
)

pytestmark = pytest.mark.integration

SIZE = 10 * 2**20


def test_benchmark_measures_and_prints_every_phase(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the cpu-llm worker needs llama-cpp-python")
    result = run_benchmark(BenchConfig(size=SIZE, rounds=1, workdir=tmp_path))

    assert list(result.rows) == [COLD, PRELOAD_SPAWN, WARM]
    assert result.size >= SIZE
    for row in result.rows.values():
        assert row.measured, row
        (run,) = row.runs
        assert run.seconds > 0
        # Every stage of the spawn was seen, in order, and the first token came after READY.
        marks = [run.stages[name] for name in ("validating", "starting", "loading", "ready")]
        assert marks == sorted(marks)
        assert marks[-1] <= run.stages["worker"] <= run.stages["token"] == run.seconds
        # The worker mapped and read the whole file: it is resident after the first token.
        assert run.resident_after >= 0.9 * result.size
        # The pool's warm spare was ready before every phase, and every spawn took it.
        assert run.warm_start, row
    assert "preloading" in result.rows[PRELOAD_SPAWN].runs[0].stages
    assert "preloading" not in result.rows[COLD].runs[0].stages
    warm = result.rows[WARM].runs[0]
    assert warm.preload_seconds is not None and warm.preload_seconds > 0
    assert warm.resident_after_preload is not None
    assert warm.resident_after_preload >= 0.9 * result.size
    if result.filesystem.kind not in NO_EVICTION_FILESYSTEMS:
        # A disk honours DONTNEED: every phase started with the file out of the page cache.
        assert result.valid, result.invalid_reason()
        for row in result.rows.values():
            assert row.runs[0].resident_after_evict <= 0.03 * result.size

    text = render_table(result, "python -m bench.coldstart --size 10MiB --rounds 1")
    assert "python -m bench.coldstart --size 10MiB --rounds 1" in text
    assert f"{result.size:,} bytes" in text
    for label in LABELS.values():
        assert text.count(label) == 2  # the table and the stages
    assert "disk read (cold):" in text and "MB/s" in text
    assert "3 of 3 measured spawns started from it" in text
    target = [line for line in text.splitlines() if line.startswith("target ")]
    assert len(target) == 1
    assert target[0].endswith(("PASS", "MISS") if result.valid else ("INVALID",)), target
    # The work directory (model, services' homes, logs) is removed unless --keep.
    assert not result.workdir.exists()
    assert list(tmp_path.iterdir()) == []


def test_model_dims_reach_the_requested_size(tmp_path: Path) -> None:
    for size in (10**7, 100 * 2**20, 512 * 2**20, 2**30):
        dims = model_dims(size)
        # The 2-D weights alone (f16) reach the size; a layer more would overshoot by a layer.
        assert size <= dims.parameters * 2 < size + 2 * 16 * dims.n_embd**2 + 2**20
        assert dims.n_embd % dims.n_head == 0 and dims.n_layer >= 1
    assert model_dims(512 * 2**20).n_embd == 1024
    path = write_model(tmp_path / "small.gguf", model_dims(SIZE))
    assert SIZE <= path.stat().st_size < SIZE * 1.1
