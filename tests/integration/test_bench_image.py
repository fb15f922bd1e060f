"""bench.image at its tiniest scale: both paths run (the diffusers child and the real
rbee-worker), every row of the report is measured, and the worker streams every step and the
same PNG as diffusers for the same seed. Timings are not asserted (noisy machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.image import BenchConfig, png_size, render_report, run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.sd]

STEPS = 2
SIDE = 64


def test_tiny_run_measures_both_paths_and_renders_every_row(tmp_path: Path) -> None:
    # pipeline=None: the diffusers child writes the tiny pipeline (this process never imports
    # torch), as the benchmark does by default.
    config = BenchConfig(
        rounds=1,
        images=1,
        width=SIDE,
        height=SIDE,
        steps=STEPS,
        threads=1,
        workdir=tmp_path,
    )
    result = run_benchmark(config)

    assert result.threads_reported == 1
    facts = dict(result.facts)
    assert facts["pipeline"].startswith("StableDiffusionPipeline (tests' tiny random pipeline)")
    assert not any(tmp_path.iterdir())  # the work dir (pipeline, logs) is removed afterwards
    for row in (result.direct, result.worker):
        assert len(row.runs) == 1, row.label
        run = row.runs[0]
        assert 0 < run.first_step <= run.seconds, row.label
        assert png_size(run.png) == (SIDE, SIDE), row.label
        assert row.wall_seconds >= run.seconds > 0 and row.busy_cpu_seconds > 0, row.label
    # The worker streamed one progress message per step and reported its engine time.
    worker_run = result.worker.runs[0]
    assert worker_run.progress_events == STEPS
    assert worker_run.engine_seconds is not None and worker_run.engine_seconds > 0
    assert worker_run.engine_seconds <= worker_run.seconds
    # Same pipeline, scheduler, seed and threads: the same pixels on both paths.
    assert result.worker.differences == [0]

    report = render_report(result, "python -m bench.image --rounds 1 --images 1 --steps 2")
    assert "command:  python -m bench.image --rounds 1" in report
    for label in ("(a) diffusers called directly", "(b) rbee worker over gRPC"):
        (line,) = [line for line in report.splitlines() if line.startswith(label)]
        assert " - " not in line and line.rstrip().endswith("yes"), line
    assert "target (b) >= 0.97x (a) images/s: " in report
    assert "worker's extra time to the first step: " in report
    assert "torch " in report and "threads:" in report
