"""Smoke test of the catalog benchmark at a tiny scale: every row is measured and printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.catalog import ROW_METRICS, BenchConfig, render_table, run_benchmark

pytestmark = pytest.mark.integration


def test_benchmark_runs_end_to_end_and_reports_every_row(tmp_path: Path) -> None:
    config = BenchConfig(
        models=200,
        iterations=20,
        baseline_list_iterations=2,
        inspect_runs=2,
        workdir=tmp_path,
        realistic_tokenizer=False,
    )
    result = run_benchmark(config)

    assert len(result.rows) == len(ROW_METRICS)
    for row, metric in zip(result.rows, ROW_METRICS, strict=True):
        assert row.metric.strip().startswith(metric), (row, metric)
    for row in result.rows:
        assert row.rbee.endswith(("ms", " s")) or row.rbee == "-", row
        assert row.result in {"", "PASS", "MISS"}, row
        assert (row.target == "info") == (row.result == ""), row
    # Every issue target has a verdict.
    targeted = {row.metric for row in result.rows if row.result}
    assert {"GetModel p99", "ListModels page 100 + filter p99"} <= targeted
    assert any("open" in metric for metric in targeted)
    assert any("inspect" in metric for metric in targeted)
    assert dict(result.facts)["models"] == "200"

    text = render_table(result, "python -m bench.catalog --models 200")
    assert "python -m bench.catalog --models 200" in text
    for row in result.rows:
        assert row.metric in text
    # The work directory is removed unless --keep.
    assert not result.workdir.exists()
    assert list(tmp_path.iterdir()) == []
