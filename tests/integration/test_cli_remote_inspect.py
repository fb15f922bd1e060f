"""`rbee search --inspect N` and `rbee compat SOURCE`: the header of a remote model read through
the provisioner's InspectRemote (no download), against a real catalog + provisioner and the fake
Hub; the CLI runs in-process (its `main`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee.provisioner.v1 import provisioner_pb2 as ppb
from rbee_client.cli.main import main
from tests.fixtures.fake_civitai import FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_header_only_gguf, write_tiny_llama_gguf
from tests.integration.provisioner_harness import Mesh, running_mesh

pytestmark = pytest.mark.integration


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.Q8_0.gguf")
    alien = write_header_only_gguf(
        tmp_path / "alien.Q4_K_M.gguf",
        arch="nosucharch",
        n_layer=2,
        n_embd=256,
        n_head=4,
        n_head_kv=4,
        n_vocab=512,
        n_ff=512,
    )
    with FakeHub() as fake:
        for repo, files, downloads in (
            ("acme/tiny-llama-GGUF", {"tiny.Q8_0.gguf": tiny}, 300),
            ("acme/alien-llama-GGUF", {"alien.Q4_K_M.gguf": alien}, 200),
            ("acme/empty-llama", {"README.md": b"nothing here"}, 100),
        ):
            fake.add_repo(
                repo, files, downloads=downloads, tags=["gguf"], pipeline_tag="text-generation"
            )
        yield fake


@pytest.fixture
def mesh(tmp_path: Path, hub: FakeHub) -> Iterator[Mesh]:
    with (
        FakeCivitai() as civitai,
        running_mesh(
            tmp_path / "home", hf_endpoint=hub.endpoint, civitai_endpoint=civitai.endpoint
        ) as running,
    ):
        yield running


def test_search_inspect_badges_the_top_hits(
    mesh: Mesh, hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["search", "llama", "--sort", "downloads", "--provisioner", mesh.address]
    assert main([*argv, "--inspect", "3", "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    badges = {r["source"]: r["hive"] for r in results}
    tiny = badges["hf:acme/tiny-llama-GGUF"]
    assert tiny["badge"].startswith("runs: cpu-llm on ")
    assert tiny["worker_type"] == "cpu-llm" and tiny["bytes_read"] > 0
    assert badges["hf:acme/alien-llama-GGUF"]["badge"] == "no worker type (unsupported_arch)"
    assert badges["hf:acme/empty-llama"]["badge"].startswith("not inspected: ")

    assert main([*argv, "--inspect", "1"]) == 0
    table = capsys.readouterr().out
    assert "THIS HIVE" in table
    tiny_line = next(line for line in table.splitlines() if "tiny-llama" in line)
    alien_line = next(line for line in table.splitlines() if "alien-llama" in line)
    assert "runs: cpu-llm" in tiny_line and "runs:" not in alien_line  # only the top 1

    assert main(argv) == 0
    assert "THIS HIVE" not in capsys.readouterr().out  # no inspection unless asked


def test_compat_source_inspects_the_header_before_any_download(
    mesh: Mesh, hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = (tmp_path / "tiny.Q8_0.gguf").stat().st_size
    source = "hf:acme/tiny-llama-GGUF:tiny.Q8_0.gguf"
    base = ["--provisioner", mesh.address, "--catalog", mesh.catalog_address]
    code = main(["compat", source, *base, "--device", "cpu", "--ram", "8GiB", "--format", "json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metadata"]["format"] == "gguf" and doc["metadata"]["architecture"] == "llama"
    assert doc["files"] == ["tiny.Q8_0.gguf"]
    (device,) = doc["devices"]
    verdicts = {r["worker_type"]: r for r in device["results"]}
    assert verdicts["cpu-llm"]["verdict"] in {"cpu_only", "compatible"}
    assert verdicts["cpu-llm"]["memory"]["weights_bytes"] > 0
    assert verdicts["cpu-sd"]["verdict"] == "unsupported_model_type"
    assert doc["summary"].startswith("runs: cpu-llm")

    # The KV cache type is not an InspectRemote option: the catalog evaluates the inline
    # metadata (a q8_0 cache is half the f16 one).
    f16 = verdicts["cpu-llm"]["memory"]["kv_cache_bytes"]
    code = main(
        [
            *("compat", source, *base, "--device", "cpu", "--ram", "8GiB"),
            *("--kv-type", "q8_0", "--worker-type", "cpu-llm", "--format", "json"),
        ]
    )
    assert code == 0
    (device,) = json.loads(capsys.readouterr().out)["devices"]
    (q8,) = device["results"]
    assert q8["worker_type"] == "cpu-llm" and 0 < q8["memory"]["kv_cache_bytes"] < f16

    assert main(["compat", "acme/tiny-llama-GGUF:tiny.Q8_0.gguf", *base, "--ctx", "256"]) == 0
    human = capsys.readouterr().out
    assert "this hive" in human and "runs: cpu-llm" in human
    assert "WORKER TYPE" in human and "context 256 tokens" in human

    # Nothing was pulled or written: the header was read into memory only.
    assert not list(mesh.hf_cache.rglob("*.gguf")) and not list(mesh.hf_cache.rglob("*.partial"))
    assert not mesh.provisioner.ListPulls(ppb.ListPullsRequest(), timeout=10).pulls
    assert 0 < doc["bytes_read"] <= size


def test_compat_source_errors_are_one_line(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compat", "hf:acme/missing-GGUF", "--provisioner", mesh.address])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
