"""`rbee compat --chart` against a real catalog on 127.0.0.1:0: the live chart (ListWorkerTypes)
equals the offline one (in-process registry), really comes from the catalog, and falls back to
the registry when the catalog cannot be reached."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rbee_client.cli.chart import build_chart_parser, cmd_compat_chart
from services.catalog.domain import DeviceKind
from services.catalog.llm_architectures import ArchitectureList
from services.catalog.service import CatalogService, HostInfo
from services.catalog.servicer import CatalogServicer, catalog_binding
from services.catalog.settings import DEFAULT_HANDLER_THREADS
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.server import RunningServer, start_server
from tests.integration.catalog_harness import running_catalog
from tests.integration.server_harness import serve_in_thread

pytestmark = pytest.mark.integration


@contextmanager
def catalog_with_registry(home: Path, registry: WorkerTypeRegistry) -> Iterator[str]:
    """A real catalog serving `registry` (not the in-process default); yields its address."""

    async def build() -> tuple[RunningServer, None]:
        store = CatalogStore.open(home / "catalog.db")
        service = CatalogService(
            store, registry, host=HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU}))
        )
        running = await start_server(
            [catalog_binding(CatalogServicer(service))],
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            registry=CollectorRegistry(),
            handler_threads=DEFAULT_HANDLER_THREADS,
        )
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    with serve_in_thread(build, name="chart-catalog") as (running, _):
        yield f"127.0.0.1:{running.port}"


def run_chart(capsys: pytest.CaptureFixture[str], catalog: str, *flags: str) -> tuple[str, str]:
    """The chart command's (stdout, stderr), as `rbee compat --chart FLAGS` runs it."""
    args: argparse.Namespace = build_chart_parser().parse_args(
        ["--catalog", catalog, "--timeout", "10", *flags]
    )
    assert cmd_compat_chart(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def closed_port() -> int:
    # Bound then released: nothing listens there for the rest of the test.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_live_chart_equals_the_offline_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_catalog(tmp_path / "home") as server:
        for fmt in ("markdown", "json", "human"):
            live, live_err = run_chart(capsys, server.address, "--format", fmt)
            offline, _ = run_chart(capsys, server.address, "--offline", "--format", fmt)
            assert live == offline, fmt
            assert "not reachable" not in live_err
    assert (
        "## rbee, Ollama and LM Studio"
        in run_chart(capsys, server.address, "--offline", "--format", "markdown")[0]
    )


def test_the_live_chart_comes_from_the_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A catalog whose LLM workers know two architectures only: the live chart must show that
    # list, the offline chart (this process's registry) the full one.
    served = WorkerTypeRegistry(
        ArchitectureList(
            names=frozenset({"llama", "qwen3", "clip"}),
            source="a two-architecture test list",
            list_version="test",
            installed_version=None,
        )
    )
    with catalog_with_registry(tmp_path, served) as address:
        live, _ = run_chart(capsys, address, "--format", "json")
        offline, _ = run_chart(capsys, address, "--offline", "--format", "json")
        live_md, _ = run_chart(capsys, address, "--format", "markdown")
    live_data, offline_data = json.loads(live), json.loads(offline)
    cpu = next(w for w in live_data["worker_types"] if w["id"] == "cpu-llm")
    assert cpu["llm_architectures"] == ["clip", "llama", "qwen3"]
    assert cpu["llm_architectures_source"] == "a two-architecture test list"
    assert [n["name"] for n in live_data["llm_architectures_not_served"]] == ["clip"]
    assert "**cpu-llm, cuda-llm, metal-llm** (2 architectures):" in live_md
    assert live_data != offline_data
    # Everything else is the same registry on both sides.
    for side in (live_data, offline_data):
        for wt in side["worker_types"]:
            wt.pop("llm_architectures")
            wt.pop("llm_architectures_source")
        side.pop("llm_architectures_not_served")
        side.pop("peers")
    assert live_data == offline_data


def test_an_unreachable_catalog_falls_back_to_the_registry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    fallback, err = run_chart(capsys, address, "--format", "markdown")
    offline, offline_err = run_chart(capsys, address, "--offline", "--format", "markdown")
    assert fallback == offline
    assert f"the catalog at {address} is not reachable" in err
    assert "not reachable" not in offline_err
