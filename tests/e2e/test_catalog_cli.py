"""The console scripts as a user runs them: `rbee models inspect` with no service, then
`rbee-catalog` as a subprocess (gated on grpc.health.v1) driven by the `rbee` CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.catalog.domain import Model, ModelSource, SourceKind
from services.catalog.message_cache import MODEL_ENCODING
from services.catalog.store import CatalogStore
from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.gguf_models import LLAMA3_8B, write_header_only_gguf, write_tiny_llama_gguf
from tests.fixtures.safetensors_models import sdxl_tensors, write_header_only_safetensors

pytestmark = pytest.mark.e2e

RBEE = str(BIN / "rbee")
RBEE_CATALOG = str(BIN / "rbee-catalog")
WORKER_TYPES = {"cpu-llm", "cuda-llm", "metal-llm", "cpu-sd", "cuda-sd", "metal-sd"}


def run_rbee(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RBEE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_inspect_gguf_json_without_a_service(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", chat_template="{{ bos_token }}")
    result = run_rbee("models", "inspect", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in (
        "format",
        "model_type",
        "architecture",
        "family",
        "variant",
        "quantization",
        "parameter_count",
        "context_length",
        "block_count",
        "kv_cache_bytes_per_token",
        "needs_components",
        "size_bytes",
        "compatibility",
    ):
        assert key in doc, key
    assert doc["format"] == "gguf" and doc["model_type"] == "llm"
    assert doc["architecture"] == "llama" and doc["block_count"] == 2
    assert doc["family"] is None and doc["variant"] is None  # absent values are null
    assert doc["size_bytes"] == path.stat().st_size
    verdicts = {c["worker_type"]: c["verdict"] for c in doc["compatibility"]}
    assert set(verdicts) == WORKER_TYPES
    assert verdicts["cpu-llm"] == "compatible"
    assert verdicts["cpu-sd"] == "unsupported_model_type"
    assert all(isinstance(c["reasons"], list) for c in doc["compatibility"])


def test_inspect_header_only_8b_and_sdxl(tmp_path: Path) -> None:
    gguf = write_header_only_gguf(tmp_path / "llama3-8b.Q4_K_M.gguf", **LLAMA3_8B)
    doc = json.loads(run_rbee("models", "inspect", str(gguf), "--format", "json").stdout)
    assert doc["quantization"] == "Q4_K_M"
    assert doc["kv_cache_bytes_per_token"] == 131072
    assert 8.0e9 < doc["parameter_count"] < 8.1e9

    sdxl = write_header_only_safetensors(tmp_path / "sdxl.safetensors", sdxl_tensors())
    doc = json.loads(run_rbee("models", "inspect", str(sdxl), "--format", "json").stdout)
    assert (doc["format"], doc["model_type"], doc["family"]) == ("safetensors", "image", "sdxl")
    verdicts = {c["worker_type"]: c["verdict"] for c in doc["compatibility"]}
    assert verdicts["cpu-sd"] == "compatible" and verdicts["cpu-llm"] != "compatible"


def test_inspect_bad_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    result = run_rbee("models", "inspect", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr

    result = run_rbee("models", "inspect", str(bad), "--format", "json")
    assert result.returncode == 1
    err = json.loads(result.stdout)["error"]
    assert err["reason"] == "MODEL_FILE_INVALID" and err["message"]

    missing = run_rbee("models", "inspect", str(tmp_path / "nope.gguf"), "--format", "json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"]["reason"] == "FILE_NOT_FOUND"


@dataclass
class Catalog:
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    env: dict[str, str]
    stderr_path: Path


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with catalog_process(tmp_path) as started:
        yield started


@contextmanager
def catalog_process(tmp_path: Path) -> Iterator[Catalog]:
    """`rbee-catalog` with RBEE_HOME=tmp_path/home, gated on health; killed on exit."""
    port, metrics_port = free_port(), free_port()
    env = {
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{port}",
        "RBEE_CATALOG_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{port}",
    }
    stderr_path = tmp_path / "catalog.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [RBEE_CATALOG], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        wait_healthy(f"127.0.0.1:{port}", process, name="rbee-catalog", timeout=30)
        yield Catalog(process, f"127.0.0.1:{port}", metrics_port, env, stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_catalog_service_through_the_cli(catalog: Catalog, tmp_path: Path) -> None:
    env = catalog.env
    model_path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    added = run_rbee("models", "add", str(model_path), "--id", "tiny", "--format", "json", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["state"] == "ready"

    listed = json.loads(run_rbee("models", "ls", "--format", "json", env=env).stdout)
    assert [m["id"] for m in listed["models"]] == ["tiny"] and listed["total_size"] == 1
    human = run_rbee("models", "ls", env=env)
    assert human.returncode == 0 and "tiny" in human.stdout and "gguf" in human.stdout

    shown = json.loads(run_rbee("models", "show", "tiny", "--format", "json", env=env).stdout)
    assert shown["metadata"]["architecture"] == "llama"

    compat = run_rbee("compat", "tiny", "--format", "json", env=env)
    assert compat.returncode == 0, compat.stderr
    results = {r["worker_type"]: r["verdict"] for r in json.loads(compat.stdout)["results"]}
    assert results["cpu-llm"] == "compatible" and set(results) == WORKER_TYPES

    big = write_header_only_gguf(tmp_path / "llama3-8b.gguf", **LLAMA3_8B)
    assert run_rbee("models", "add", str(big), "--id", "big", env=env).returncode == 0
    fit = run_rbee(
        "compat", "big", "--worker-type", "cuda-llm", "--device", "cuda",
        "--vram", "24GiB", "--ram", "64GiB", "--ctx", "8192", "--format", "json", env=env,
    )  # fmt: skip
    (result,) = json.loads(fit.stdout)["results"]
    assert result["verdict"] == "fits_gpu"
    assert result["memory"]["kv_cache_bytes"] == 1024**3

    matrix = json.loads(run_rbee("compat", "--matrix", "--format", "json", env=env).stdout)
    assert {row["model"] for row in matrix["rows"]} == {"models/tiny", "models/big"}

    types = json.loads(run_rbee("workers", "types", "--format", "json", env=env).stdout)
    assert {t["id"] for t in types["worker_types"]} == WORKER_TYPES

    missing = run_rbee("models", "show", "nope", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")

    removed = run_rbee("models", "rm", "tiny", env=env)
    assert removed.returncode == 0 and model_path.exists()
    remaining = json.loads(run_rbee("models", "ls", "--format", "json", env=env).stdout)
    assert remaining["total_size"] == 1

    # Graceful stop on SIGTERM: exits 0 well within the grace period.
    catalog.process.send_signal(signal.SIGTERM)
    assert catalog.process.wait(timeout=20) == 0
    log = catalog.stderr_path.read_text()
    assert "stopped" in log


def test_cli_reports_an_unreachable_catalog() -> None:
    result = run_rbee(
        "models", "ls", "--timeout", "2", env={"RBEE_CATALOG_ADDR": f"127.0.0.1:{free_port()}"}
    )
    assert result.returncode == 3
    assert "rbee serve catalog" in result.stderr and "Traceback" not in result.stderr


def test_a_catalog_written_before_stored_encodings_is_upgraded_while_it_serves(
    tmp_path: Path,
) -> None:
    # A database as rbee before schema version 2 left it: models, no encodings.
    database = tmp_path / "home" / "catalog" / "catalog.db"
    with CatalogStore.open(database) as store:
        created = store.create_models(
            [
                Model(
                    id=f"old-{index}",
                    source=ModelSource(kind=SourceKind.URL, url=f"https://example.invalid/{index}"),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                    updated_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
                for index in range(3)
            ]
        )
    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE model_encodings")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")

    with catalog_process(tmp_path) as catalog:
        shown = run_rbee("models", "show", "old-1", "--format", "json", env=catalog.env)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["etag"] == created[1].etag
        deadline = time.monotonic() + 20
        while "encoded 3 stored models" not in catalog.stderr_path.read_text():
            assert time.monotonic() < deadline, catalog.stderr_path.read_text()
            time.sleep(0.05)
        with sqlite3.connect(database) as connection:
            rows = connection.execute(
                "SELECT e.encoding FROM model_encodings AS e JOIN models AS m"
                " ON m.id = e.model_id AND m.etag = e.etag"
            ).fetchall()
        assert rows == [(MODEL_ENCODING,)] * 3
        listed = json.loads(run_rbee("models", "ls", "--format", "json", env=catalog.env).stdout)
        assert [m["etag"] for m in listed["models"]] == [m.etag for m in created]
