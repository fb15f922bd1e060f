"""bench.rpc_cost at a tiny scale (a few seconds): the real rbee-catalog in its own process, both
client kinds, every operation, and a table with CPU per call. Values are not asserted (noisy
machines), only that each was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rpc_cost import main

pytestmark = pytest.mark.integration


def test_tiny_run_prints_a_row_per_client_and_operation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--calls", "30", "--concurrency", "4", "--models", "30", "--workdir", str(tmp_path)]

    assert main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("aio ", "sync "))]
    assert {(row[0], row[1]) for row in rows} == {
        (client, op)
        for client in ("aio", "sync")
        for op in ("GetModel", "ListModels", "EvaluateCompatibility")
    }
    for row in rows:
        assert row[2] == "30"  # calls measured
        assert row[-1] == "us" and row[-3] == "us"  # server and client CPU per call
