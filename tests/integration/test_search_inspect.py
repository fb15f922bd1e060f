"""Search (Hub and CivitAI) and remote inspection over Range requests, against the fakes."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.catalog.domain import ModelFormat, SourceKind
from services.catalog.inspect import inspect_path
from services.common.errors import InvalidArgument
from services.provisioner.domain import Credentials, PullOptions, SearchQuery, SearchSort
from services.provisioner.remote_inspect import inspect_remote
from services.provisioner.search import search
from services.provisioner.sources import SourceContext, parse_source
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.folder_models import write_diffusers_folder, write_transformers_folder
from tests.fixtures.gguf_models import write_header_only_gguf, write_split_gguf
from tests.fixtures.safetensors_models import sdxl_tensors, write_header_only_safetensors

pytestmark = pytest.mark.integration
FAKE_SHA = "ab" * 32  # header-only files are sparse: skip hashing hundreds of MB of holes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    # A 7B-shaped header (~1.6 MB of tokenizer arrays: more than the first 1 MiB prefix).
    write_header_only_gguf(
        root / "llama.Q4_K_M.gguf",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        n_vocab=128_256,
        n_ff=14_336,
        vocab_arrays=True,
        name="Big Llama",
    )
    (root / "split").mkdir()
    write_split_gguf(root / "split", "s-Q8_0", 2, n_embd=1024, n_ff=2048, n_vocab=4096)
    write_header_only_safetensors(root / "sdxl.safetensors", sdxl_tensors())
    write_diffusers_folder(root / "sdxl", "sdxl")
    write_transformers_folder(root / "llm", n_embd=2048, n_ff=8192, n_layer=8, n_vocab=32_000)
    return root


def _tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub(models: Path) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo(
            "acme/Big-Llama-GGUF",
            {"llama.Q4_K_M.gguf": models / "llama.Q4_K_M.gguf", "README.md": b"hi"},
            sha256={"llama.Q4_K_M.gguf": FAKE_SHA},
            tags=["gguf"],
            pipeline_tag="text-generation",
            downloads=500,
            likes=5,
            license="apache-2.0",
        )
        hub.add_repo(
            "acme/Split-GGUF",
            {p.name: p for p in (models / "split").glob("*.gguf")},
            tags=["gguf"],
            pipeline_tag="text-generation",
            downloads=100,
            likes=50,
        )
        sdxl = _tree(models / "sdxl")
        hub.add_repo(
            "acme/tiny-sdxl",
            sdxl,
            sha256={
                k: hashlib.sha256(k.encode()).hexdigest()
                for k in sdxl
                if k.endswith(".safetensors")
            },
            library_name="diffusers",
            pipeline_tag="text-to-image",
            downloads=300,
        )
        llm = _tree(models / "llm")
        hub.add_repo(
            "acme/tiny-llm",
            llm,
            sha256={
                k: hashlib.sha256(k.encode()).hexdigest() for k in llm if k.endswith(".safetensors")
            },
            pipeline_tag="text-generation",
            downloads=10,
        )
        yield hub


@pytest.fixture(scope="module")
def civitai(models: Path) -> Iterator[FakeCivitai]:
    with FakeCivitai() as fake:
        for i, base in enumerate(["SDXL 1.0", "SD 1.5", "SDXL 1.0"], start=1):
            fake.add_version(
                1000 + i,
                model_id=i,
                model_name=f"Model {i}",
                base_model=base,
                downloads=10 * i,
                files=[CivitaiFile(f"model{i}.safetensors", models / "sdxl.safetensors")],
            )
        fake.add_version(
            2000,
            model_id=9,
            model_name="A LoRA",
            model_type="LORA",
            base_model="SD 1.5",
            files=[CivitaiFile("lora.safetensors", b"x" * 2000)],
            downloads=1,
        )
        yield fake


@pytest.fixture()
def ctx(tmp_path: Path, hub: FakeHub, civitai: FakeCivitai) -> SourceContext:
    return SourceContext(
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        hf_cache=tmp_path / "hf",
        models_dir=tmp_path / "models",
        credentials=Credentials(),
        timeout=5.0,
    )


# --- search -----------------------------------------------------------------------------------


def test_hf_search_filters_sorts_and_pages(ctx: SourceContext) -> None:
    query = SearchQuery(
        source=SourceKind.HUGGINGFACE,
        format=ModelFormat.GGUF,
        sort=SearchSort.DOWNLOADS,
        page_size=1,
    )
    first = search(query, ctx)
    assert [h.id for h in first.hits] == ["acme/Big-Llama-GGUF"]
    hit = first.hits[0]
    assert hit.source == "hf:acme/Big-Llama-GGUF" and parse_source(hit.source)
    assert (hit.downloads, hit.likes, hit.license, hit.task) == (
        500,
        5,
        "apache-2.0",
        "text-generation",
    )
    assert [(f.path, f.quantization, f.format) for f in hit.files] == [
        ("llama.Q4_K_M.gguf", "Q4_K_M", ModelFormat.GGUF)
    ]
    assert first.next_page_token
    second = search(SearchQuery(**{**query.__dict__, "page_token": first.next_page_token}), ctx)
    assert [h.id for h in second.hits] == ["acme/Split-GGUF"] and not second.next_page_token
    likes = search(
        SearchQuery(source=SourceKind.HUGGINGFACE, format=ModelFormat.GGUF, sort=SearchSort.LIKES),
        ctx,
    )
    assert [h.id for h in likes.hits] == ["acme/Split-GGUF", "acme/Big-Llama-GGUF"]
    images = search(SearchQuery(source=SourceKind.HUGGINGFACE, task="text-to-image"), ctx)
    assert [h.id for h in images.hits] == ["acme/tiny-sdxl"]
    named = search(SearchQuery(source=SourceKind.HUGGINGFACE, query="tiny-llm"), ctx)
    assert [h.id for h in named.hits] == ["acme/tiny-llm"]


def test_page_tokens_are_validated(ctx: SourceContext) -> None:
    query = SearchQuery(source=SourceKind.HUGGINGFACE, format=ModelFormat.GGUF, page_size=1)
    token = search(query, ctx).next_page_token
    for bad in ("garbage!", "eyJ2IjoxfQ", token[:-3]):
        with pytest.raises(InvalidArgument) as info:
            search(SearchQuery(**{**query.__dict__, "page_token": bad}), ctx)
        assert info.value.reason == "INVALID_PAGE_TOKEN"
    other = SearchQuery(source=SourceKind.HUGGINGFACE, query="x", page_size=1, page_token=token)
    with pytest.raises(InvalidArgument):
        search(other, ctx)  # a token from another query


def test_civitai_search(ctx: SourceContext) -> None:
    query = SearchQuery(
        source=SourceKind.CIVITAI, family="SDXL 1.0", sort=SearchSort.DOWNLOADS, page_size=1
    )
    first = search(query, ctx)
    [hit] = first.hits
    assert (hit.id, hit.source, hit.base_model, hit.civitai_type) == (
        "3",
        "civitai:1003",
        "SDXL 1.0",
        "Checkpoint",
    )
    assert hit.civitai_version_id == 1003 and hit.downloads == 30
    assert (
        hit.files[0].path == "model3.safetensors" and hit.files[0].format is ModelFormat.SAFETENSORS
    )
    second = search(SearchQuery(**{**query.__dict__, "page_token": first.next_page_token}), ctx)
    assert [h.id for h in second.hits] == ["1"] and not second.next_page_token
    images = search(SearchQuery(source=SourceKind.CIVITAI, task="text-to-image"), ctx)
    assert "9" not in [h.id for h in images.hits] and len(images.hits) == 3


# --- remote inspection ------------------------------------------------------------------------


def test_inspect_remote_gguf_reads_only_the_header(
    ctx: SourceContext, hub: FakeHub, models: Path
) -> None:
    local = inspect_path(models / "llama.Q4_K_M.gguf")
    size = (models / "llama.Q4_K_M.gguf").stat().st_size
    hub.cdn.requests.clear()
    result = inspect_remote(parse_source("hf:acme/Big-Llama-GGUF"), PullOptions(), ctx)
    meta = result.metadata
    assert (meta.architecture, meta.block_count, meta.quantization) == ("llama", 32, "Q4_K_M")
    assert meta.vocab_size == 128_256 and meta.name == "Big Llama"
    assert meta.weights == local.weights and meta.size_bytes == size == local.size_bytes
    assert not meta.warnings or meta.warnings == local.warnings
    assert result.resolution.chosen_file == "llama.Q4_K_M.gguf"
    assert 1024 * 1024 < result.bytes_read <= 4 * 1024 * 1024 < size // 100  # grew past 1 MiB
    assert hub.cdn.body_bytes_sent() == result.bytes_read
    assert all(r.range for r in hub.cdn.requests)
    assert not ctx.hf_cache.exists()  # inspection writes nothing to the cache


def test_inspect_remote_split_gguf(ctx: SourceContext, models: Path) -> None:
    first = sorted((models / "split").glob("*.gguf"))[0]
    local = inspect_path(first)
    result = inspect_remote(parse_source("hf:acme/Split-GGUF"), PullOptions(), ctx)
    assert result.metadata.split == local.split and result.metadata.split is not None
    assert result.metadata.split.files_found == 2
    assert result.metadata.size_bytes == local.size_bytes
    assert result.bytes_read <= 2 * 1024 * 1024 < local.size_bytes


def test_inspect_remote_safetensors_reads_length_then_json(
    ctx: SourceContext, civitai: FakeCivitai, models: Path
) -> None:
    path = models / "sdxl.safetensors"
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    civitai.cdn.requests.clear()
    result = inspect_remote(parse_source("civitai:1001"), PullOptions(), ctx)
    assert result.metadata.family == inspect_path(path).family == "sdxl"
    assert result.bytes_read == 8 + header_length
    assert civitai.cdn.body_bytes_sent() == 8 + header_length
    assert result.metadata.size_bytes == path.stat().st_size
    assert result.resolution.family_hint == "SDXL 1.0"


def test_inspect_remote_url(ctx: SourceContext, civitai: FakeCivitai, models: Path) -> None:
    key = civitai.cdn.add_blob(models / "sdxl.safetensors", sha256=FAKE_SHA)
    url = civitai.cdn.url_for(key, "checkpoint.safetensors")
    result = inspect_remote(parse_source(url), PullOptions(), ctx)
    assert result.metadata.family == "sdxl"
    assert result.bytes_read < 64 * 1024


def test_inspect_remote_diffusers_and_transformers_repos(
    ctx: SourceContext, hub: FakeHub, models: Path
) -> None:
    local = inspect_path(models / "sdxl")
    hub.cdn.requests.clear()
    result = inspect_remote(parse_source("hf:acme/tiny-sdxl"), PullOptions(), ctx)
    assert result.metadata.format is ModelFormat.DIFFUSERS
    assert result.metadata.family == local.family == "sdxl"
    weights = sum(p.stat().st_size for p in (models / "sdxl").rglob("*.safetensors"))
    assert result.bytes_read < weights // 100
    assert result.metadata.size_bytes == sum(p.size or 0 for p in result.resolution.planned)

    llm_local = inspect_path(models / "llm")
    llm = inspect_remote(parse_source("hf:acme/tiny-llm"), PullOptions(), ctx)
    assert llm.metadata.architecture == llm_local.architecture
    assert llm.metadata.parameter_count == llm_local.parameter_count
    assert llm.metadata.context_length == llm_local.context_length
    assert llm.bytes_read < 64 * 1024
