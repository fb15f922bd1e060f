"""bench.catalog_servers at a tiny scale (seconds): the real rbee-catalog started alternately as
the threaded and the event-loop server on one database, a line per start and a summary per
server. Values are not asserted (noisy machines), only that each start was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.catalog_servers import main

pytestmark = pytest.mark.integration


def test_tiny_run_measures_each_server_in_alternating_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--models", "40", "--rounds", "2", "--iterations", "20", "--threads", "2"]

    assert main([*argv, "--workdir", str(tmp_path)]) == 0

    lines = capsys.readouterr().out.splitlines()
    starts = [line.split("  ")[0].strip() for line in lines if line.endswith(" ms")]
    assert starts[:4] == ["threaded 1", "event loop 1", "threaded 2", "event loop 2"]
    summary = [line.strip() for line in lines if "starts" in line and "GetModel p50" in line]
    assert [line.split()[0] for line in summary] == ["threaded", "event"]
    assert all(line.endswith("of 2 starts") for line in summary)
