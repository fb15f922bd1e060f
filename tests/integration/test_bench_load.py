"""bench.load at a tiny scale (~3 s): both loads run against the real worker and catalog, every
row of the report is present, and nothing fails unexpectedly. Timings are not asserted (noisy
machines); a queue smaller than the streams shows QUEUE_FULL counted as by design."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import CATALOG_MIX, BenchConfig, render_report, run_benchmark, unexpected_errors

pytestmark = [pytest.mark.integration, pytest.mark.llm]


def test_tiny_run_reports_both_loads_and_counts_queue_full_as_by_design(tmp_path: Path) -> None:
    config = BenchConfig(
        seconds=3.0,
        warmup=0.5,
        streams=4,
        queue_size=1,  # 4 streams, 1 running + 1 waiting: the rest are refused at once
        catalog_rps=100.0,
        models=50,
        tokens=4,
        workdir=tmp_path,
    )
    result = run_benchmark(config)

    assert unexpected_errors(result) == 0, render_report(result, "test")
    assert result.generate.ok > 0 and result.generate.tokens >= 4 * result.generate.ok
    assert set(result.generate.expected) <= {"RESOURCE_EXHAUSTED/QUEUE_FULL"}
    assert sum(result.generate.expected.values()) > 0  # 4 streams into room for 2
    for name, _share in CATALOG_MIX:
        assert result.catalog.stats[name].ok > 0, name
    assert result.catalog.sent > 0
    for memory in result.memory:
        assert memory.idle > 0 and 0 < memory.before <= memory.peak and memory.after > 0

    report = render_report(result, "python -m bench.load --seconds 3")
    for label in (
        "Generate x4 streams",
        "time to first token",
        "catalog, all",
        "rbee-worker",
        "rbee-catalog",
        "target no unexpected errors: 0  PASS",
    ):
        assert label in report, label
