"""Resolving every source form against the fake Hub, the fake CivitAI and real local files."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from pydantic import SecretStr

from services.catalog.domain import SourceKind
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RbeeError,
    Unauthenticated,
    Unavailable,
)
from services.provisioner.domain import AuthScope, Credentials, PlannedFile, PullOptions, Resolution
from services.provisioner.sources import SourceContext, parse_source, resolve
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.folder_models import write_diffusers_folder, write_transformers_folder
from tests.fixtures.gguf_models import write_split_gguf, write_tiny_llama_gguf
from tests.fixtures.safetensors_models import sd1_tensors, write_header_only_safetensors

pytestmark = pytest.mark.integration

TOKEN = "hf_secret_token_value_123"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_llama_gguf(root / "tiny.gguf", n_layer=1, n_vocab=260)
    (root / "split").mkdir()
    write_split_gguf(root / "split", "big-Q4_K_M", 3)
    write_diffusers_folder(root / "sd", "sd1", fp16_variant_too=True)
    write_transformers_folder(root / "llm")
    write_header_only_safetensors(root / "sd1.safetensors", sd1_tensors())
    return root


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub(models: Path) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        tiny = models / "tiny.gguf"
        hub.add_repo(
            "acme/TinyLlama-1.1B-Chat-GGUF",
            {
                "README.md": b"# tiny\n",
                "tinyllama.Q8_0.gguf": tiny,
                "tinyllama.Q4_K_M.gguf": tiny,
                "tinyllama.Q2_K.gguf": tiny,
                "mmproj-tinyllama-f16.gguf": tiny,
            },
            library_name="gguf",
            pipeline_tag="text-generation",
        )
        hub.add_repo(
            "acme/big-GGUF",
            {p.name: p for p in sorted((models / "split").glob("*.gguf"))}
            | {"big-Q8_0.gguf": tiny},
        )
        sd_files: dict[str, bytes | Path] = dict(_folder_files(models / "sd"))
        sd_files["v1-5-pruned.safetensors"] = models / "sd1.safetensors"
        sd_files["unet/diffusion_pytorch_model.bin"] = b"pickle" * 300
        hub.add_repo("acme/tiny-sd", sd_files, library_name="diffusers")
        hub.add_repo("acme/tiny-llm", _folder_files(models / "llm"))
        hub.add_repo("acme/gated", {"m.Q4_K_M.gguf": tiny}, gated=True)
        hub.add_repo("acme/private", {"m.Q4_K_M.gguf": tiny}, private=True)
        hub.valid_tokens.add(TOKEN)
        yield hub


@pytest.fixture(scope="module")
def civitai(models: Path) -> Iterator[FakeCivitai]:
    with FakeCivitai() as fake:
        fake.add_version(
            4242,
            model_id=77,
            model_name="Dream Shaper",
            base_model="SD 1.5",
            files=[
                CivitaiFile("dreamshaper_8.safetensors", models / "sd1.safetensors"),
                CivitaiFile(
                    "dreamshaper_8_vae.safetensors", b"vae" * 400, type="VAE", primary=False
                ),
            ],
        )
        yield fake


def _ctx(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, token: str | None = None
) -> SourceContext:
    return SourceContext(
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        hf_cache=tmp_path / "hf",
        models_dir=tmp_path / "models",
        credentials=Credentials(hf_token=SecretStr(token) if token else None),
        timeout=5.0,
    )


def _resolve(text: str, ctx: SourceContext, **options: object) -> Resolution:
    return resolve(parse_source(text), PullOptions(**options), ctx)  # type: ignore[arg-type]


def _fake_download(planned: PlannedFile, data: bytes) -> None:
    """What the transfer does: the blob, then a relative snapshot symlink."""
    planned.dest.parent.mkdir(parents=True, exist_ok=True)
    planned.dest.write_bytes(data)
    if planned.link is not None:
        planned.link.parent.mkdir(parents=True, exist_ok=True)
        planned.link.symlink_to(os.path.relpath(planned.dest, planned.link.parent))


# --- HuggingFace ------------------------------------------------------------------------------


def test_gguf_repo_auto_choice_plans_the_standard_cache_layout(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF", ctx)
    commit = res.source.commit
    assert commit is not None and len(commit) == 40
    assert res.chosen_file == "tinyllama.Q4_K_M.gguf"
    assert res.choice_reason.startswith("Q4_K_M: first match of the preference list [Q4_K_M")
    assert res.source.files == ["tinyllama.Q4_K_M.gguf"] and res.source.revision == "main"
    [planned] = res.planned
    data = (models / "tiny.gguf").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = ctx.hf_cache / "models--acme--TinyLlama-1.1B-Chat-GGUF"
    assert (
        planned.url
        == f"{hub.endpoint}/acme/TinyLlama-1.1B-Chat-GGUF/resolve/{commit}/tinyllama.Q4_K_M.gguf"
    )
    assert planned.dest == folder / "blobs" / digest
    assert planned.link == folder / "snapshots" / commit / "tinyllama.Q4_K_M.gguf"
    assert (planned.sha256, planned.size, planned.auth) == (
        digest,
        len(data),
        AuthScope.HUGGINGFACE,
    )
    assert not planned.cached
    assert res.model_paths == [str(planned.link)]
    assert res.model_id_hint == "tinyllama-1-1b-chat-q4-k-m"
    assert (folder / "refs" / "main").read_text() == commit
    selected = [f.path for f in res.files if f.selected]
    assert selected == ["tinyllama.Q4_K_M.gguf"]
    assert {f.path: f.quantization for f in res.files}["tinyllama.Q8_0.gguf"] == "Q8_0"

    # After the transfer, huggingface_hub finds the file, and a second resolve says "cached".
    _fake_download(planned, data)
    found = try_to_load_from_cache(
        "acme/TinyLlama-1.1B-Chat-GGUF", "tinyllama.Q4_K_M.gguf", cache_dir=ctx.hf_cache
    )
    assert found == str(planned.link)
    info = scan_cache_dir(ctx.hf_cache)
    [repo] = [r for r in info.repos if r.repo_id == "acme/TinyLlama-1.1B-Chat-GGUF"]
    assert repo.size_on_disk == len(data) and {r.commit_hash for r in repo.revisions} == {commit}
    again = _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF", ctx)
    assert again.planned[0].cached
    assert again.files[
        [f.path for f in again.files].index("tinyllama.Q4_K_M.gguf")
    ].present_bytes == len(data)


def test_preference_from_options_and_explicit_files(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF", ctx, quantization_preference=["Q8_0"])
    assert res.chosen_file == "tinyllama.Q8_0.gguf"
    res = _resolve("acme/TinyLlama-1.1B-Chat-GGUF:tinyllama.Q2_K.gguf", ctx)
    assert [p.path for p in res.planned] == ["tinyllama.Q2_K.gguf"] and res.chosen_file == ""
    res = _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF:Q8_0", ctx)  # a quantization label
    assert [p.path for p in res.planned] == ["tinyllama.Q8_0.gguf"]
    res = _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF", ctx, files=["*.Q2_K.gguf", "README.md"])
    assert [p.path for p in res.planned] == ["tinyllama.Q2_K.gguf", "README.md"]
    readme = res.planned[1]
    assert readme.sha256 is None and len(readme.dest.name) == 40  # a git blob sha1
    with pytest.raises(NotFound) as info:
        _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF:nope.gguf", ctx)
    assert info.value.reason == "REMOTE_FILE_NOT_FOUND"
    assert "tinyllama.Q4_K_M.gguf" in info.value.message  # the hint lists model files


def test_split_gguf_pulls_every_part_in_order(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/big-GGUF", ctx)
    names = [f"big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert [p.path for p in res.planned] == names
    assert res.model_paths == [str(res.planned[0].link)]
    assert "split into 3 parts" in res.choice_reason
    # Naming one shard pulls the whole set.
    res = _resolve(f"hf:acme/big-GGUF:{names[1]}", ctx)
    assert [p.path for p in res.planned] == names


def test_diffusers_repo_pulls_one_set_of_weights_and_diffusers_loads_the_layout(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/tiny-sd", ctx)
    paths = [p.path for p in res.planned]
    assert paths[0] == "model_index.json"
    assert "unet/diffusion_pytorch_model.safetensors" in paths
    assert not any(p.endswith((".bin", ".fp16.safetensors")) for p in paths)
    assert "v1-5-pruned.safetensors" not in paths  # a root single-file duplicate
    assert res.source.commit is not None
    assert res.model_paths == [
        str(ctx.hf_cache / "models--acme--tiny-sd" / "snapshots" / res.source.commit)
    ]
    assert res.source.files == paths
    for planned in res.planned:
        _fake_download(planned, (models / "sd" / planned.path).read_bytes())
    snapshot = Path(res.model_paths[0])
    assert (snapshot / "unet" / "config.json").is_file()
    found = try_to_load_from_cache("acme/tiny-sd", "unet/config.json", cache_dir=ctx.hf_cache)
    assert found == str(snapshot / "unet" / "config.json")


def test_transformers_repo(tmp_path: Path, hub: FakeHub, civitai: FakeCivitai) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/tiny-llm", ctx)
    paths = [p.path for p in res.planned]
    assert "config.json" in paths and any(p.endswith(".safetensors") for p in paths)
    assert Path(res.model_paths[0]).name == res.source.commit


def test_hub_errors_map_to_reasons_without_leaking_the_token(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    anonymous = _ctx(tmp_path, hub, civitai)
    with pytest.raises(PermissionDenied) as gated:
        _resolve("hf:acme/gated", anonymous)
    assert gated.value.reason == "GATED_REPO"
    granted = "hf_granted_token_789"
    hub.granted_tokens.add(granted)
    assert _resolve("hf:acme/gated", _ctx(tmp_path, hub, civitai, granted)).planned
    with pytest.raises(PermissionDenied) as refused:
        _resolve("hf:acme/gated", _ctx(tmp_path, hub, civitai, TOKEN))
    assert refused.value.reason == "GATED_REPO" and TOKEN not in refused.value.message
    with pytest.raises(NotFound) as private:
        _resolve("hf:acme/private", anonymous)
    assert private.value.reason == "REPO_NOT_FOUND" and "HF_TOKEN" in private.value.message
    assert _resolve("hf:acme/private", _ctx(tmp_path, hub, civitai, TOKEN)).planned
    bad = "hf_wrong_token_456"
    with pytest.raises(Unauthenticated) as rejected:
        _resolve("hf:acme/private", _ctx(tmp_path, hub, civitai, bad))
    assert rejected.value.reason == "TOKEN_INVALID" and bad not in rejected.value.message
    with pytest.raises(NotFound) as missing:
        _resolve("hf:acme/nothing-here", _ctx(tmp_path, hub, civitai, TOKEN))
    assert missing.value.reason == "REPO_NOT_FOUND"
    with pytest.raises(NotFound) as revision:
        _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF@v9", anonymous)
    assert revision.value.reason == "REVISION_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF@main", anonymous, revision="dev")
    hub.faults.fail_status, hub.faults.fail_count = 503, 100
    try:
        with pytest.raises(Unavailable) as down:
            _resolve("hf:acme/TinyLlama-1.1B-Chat-GGUF", anonymous)
    finally:
        hub.faults.fail_status, hub.faults.fail_count = None, 1
    assert down.value.reason == "UPSTREAM_UNAVAILABLE"


def test_unreachable_hub_is_unavailable(tmp_path: Path, civitai: FakeCivitai, hub: FakeHub) -> None:
    ctx = SourceContext(
        hf_endpoint="http://127.0.0.1:9",  # discard port: nothing listens
        civitai_endpoint=civitai.endpoint,
        hf_cache=tmp_path / "hf",
        models_dir=tmp_path / "models",
        credentials=Credentials(),
        timeout=2.0,
    )
    with pytest.raises(Unavailable) as info:
        _resolve("hf:acme/anything", ctx)
    assert info.value.reason == "UPSTREAM_UNAVAILABLE"


def test_ambiguous_repo_asks_for_a_file(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    hub.add_repo(
        "acme/many", {"a.safetensors": models / "sd1.safetensors", "b.safetensors": b"x" * 10}
    )
    with pytest.raises(InvalidArgument) as info:
        _resolve("hf:acme/many", _ctx(tmp_path, hub, civitai))
    assert info.value.reason == "INVALID_SOURCE" and "a.safetensors" in info.value.message


# --- CivitAI ----------------------------------------------------------------------------------


def test_civitai_primary_and_named_files(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("civitai:4242", ctx)
    [planned] = res.planned
    data = (models / "sd1.safetensors").read_bytes()
    assert planned.url == f"{civitai.endpoint}/api/download/models/4242"
    assert planned.sha256 == hashlib.sha256(data).hexdigest()
    assert planned.dest == ctx.models_dir / "civitai" / "4242" / "dreamshaper_8.safetensors"
    assert planned.auth is AuthScope.CIVITAI and planned.size is None
    assert res.family_hint == "SD 1.5" and res.source.base_model == "SD 1.5"
    assert (res.source.civitai_model_id, res.source.civitai_version_id) == (77, 4242)
    assert res.model_id_hint == "civitai-4242-dream-shaper"
    approx = {f.path: f.size for f in res.files}["dreamshaper_8.safetensors"]
    assert approx is not None and abs(approx - len(data)) <= 1

    vae = _resolve("civitai:4242:dreamshaper_8_vae.safetensors", ctx).planned[0]
    assert vae.url.startswith(f"{civitai.endpoint}/api/download/models/4242?")
    assert "type=VAE" in vae.url

    with pytest.raises(NotFound) as info:
        _resolve("civitai:999999", ctx)
    assert info.value.reason == "REMOTE_FILE_NOT_FOUND"
    assert info.value.resource_type == "civitai model version"
    with pytest.raises(NotFound) as named:
        _resolve("civitai:4242:other.safetensors", ctx)
    assert "dreamshaper_8.safetensors" in named.value.message


# --- URL and local ----------------------------------------------------------------------------


def test_url_source_size_and_name_from_headers(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    key = civitai.cdn.add_blob(models / "tiny.gguf")
    url = civitai.cdn.url_for(key, "Tiny Model.Q8_0.gguf")
    res = _resolve(url, ctx)
    [planned] = res.planned
    assert planned.path == "Tiny Model.Q8_0.gguf"
    assert planned.size == (models / "tiny.gguf").stat().st_size and planned.sha256 is None
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert planned.dest == ctx.models_dir / "url" / folder / "Tiny Model.Q8_0.gguf"
    assert res.model_id_hint == "tiny-model-q8-0" and res.source.kind is SourceKind.URL
    with pytest.raises(NotFound):
        _resolve(f"{civitai.cdn.base_url}/blobs/unknown", ctx)


def test_local_sources_in_place_and_copied(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, models: Path
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve(f"file:{models / 'tiny.gguf'}", ctx)
    assert res.planned == [] and res.model_paths == [str(models / "tiny.gguf")]
    folder = tmp_path / "my-sd"
    shutil.copytree(models / "sd", folder)
    copied = _resolve(str(folder), ctx, copy_files=True)
    target = ctx.models_dir / "local" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    assert copied.model_paths == [str(target / "my-sd")]
    assert {p.path for p in copied.planned} == set(_folder_files(folder))
    unet = next(p for p in copied.planned if p.path == "unet/config.json")
    assert unet.url == (folder / "unet" / "config.json").as_uri()
    assert unet.dest == target / "my-sd" / "unet" / "config.json"
    with pytest.raises(NotFound) as info:
        _resolve(f"file:{tmp_path / 'missing.gguf'}", ctx)
    assert info.value.reason == "FILE_NOT_FOUND"


def test_local_sources_that_are_not_models_are_refused(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    # A device file would be copied forever; a FIFO would block the provisioner.
    for special in ("/dev/zero", "/dev/null"):
        with pytest.raises(InvalidArgument, match="not a regular file"):
            _resolve(f"file:{special}", ctx)
    fifo = tmp_path / "folder" / "pipe.gguf"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        _resolve(str(fifo.parent), ctx)
    # Too deep to be a model folder: refused without walking further.
    deep = tmp_path / "deep"
    leaf = deep.joinpath(*(f"d{i}" for i in range(12)))
    leaf.mkdir(parents=True)
    (leaf / "x.bin").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="not a model folder"):
        _resolve(str(deep), ctx)
    # A broken link inside a folder is named, not a crash.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(InvalidArgument, match="broken link"):
        _resolve(str(broken), ctx)


def test_every_error_is_ours(tmp_path: Path, hub: FakeHub, civitai: FakeCivitai) -> None:
    ctx = _ctx(tmp_path, hub, civitai)
    for text in ("hf:acme/x", "civitai:1", f"{hub.endpoint}/nope", "file:/nonexistent/x"):
        with pytest.raises(RbeeError):
            _resolve(text, ctx)


@pytest.mark.sd
def test_diffusers_loads_a_pipeline_from_our_cache_layout(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline

    from tests.fixtures.sd_models import tiny_sd_pipeline_under

    folder = tiny_sd_pipeline_under(tmp_path_factory.getbasetemp())
    hub.add_repo("acme/real-tiny-sd", _folder_files(folder), library_name="diffusers")
    ctx = _ctx(tmp_path, hub, civitai)
    res = _resolve("hf:acme/real-tiny-sd", ctx)
    for planned in res.planned:
        _fake_download(planned, (folder / planned.path).read_bytes())
    # By repo id, offline: diffusers finds refs/main -> snapshots/<commit> -> blobs.
    pipe = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        "acme/real-tiny-sd", cache_dir=ctx.hf_cache, local_files_only=True
    )
    assert type(pipe).__name__ == "StableDiffusionPipeline"
