"""Folder inspection: diffusers pipelines and HF transformers checkpoints."""

from __future__ import annotations

import json
import pathlib

import pytest

from services.catalog.domain import ModelFormat, ModelType
from services.catalog.inspect import InspectError, inspect_path
from services.catalog.inspect.safetensors import read_safetensors_header
from tests.fixtures.folder_models import write_diffusers_folder, write_transformers_folder

pytestmark = pytest.mark.unit


def _all_file_sizes(root: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _params(files: list[pathlib.Path]) -> int:
    total = 0
    for f in files:
        for t in read_safetensors_header(f).tensors.values():
            total += t.n_elements
    return total


@pytest.mark.parametrize(
    "family", ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux-dev", "flux-schnell"]
)
def test_diffusers_families(tmp_path: pathlib.Path, family: str) -> None:
    root = write_diffusers_folder(tmp_path / family, family)
    meta = inspect_path(root)
    assert meta.format is ModelFormat.DIFFUSERS
    assert meta.model_type is ModelType.IMAGE
    assert meta.family == family
    assert meta.variant is None
    assert meta.needs_components == []
    assert meta.size_bytes == _all_file_sizes(root)
    weights = sorted(root.rglob("*.safetensors"))
    assert meta.parameter_count == _params(weights)
    assert meta.tensor_count == sum(len(read_safetensors_header(w).tensors) for w in weights)
    assert meta.quantization in meta.dtypes


def test_diffusers_inpaint_variant(tmp_path: pathlib.Path) -> None:
    meta = inspect_path(write_diffusers_folder(tmp_path / "inp", "sd1", in_channels=9))
    assert (meta.family, meta.variant) == ("sd1", "inpaint")
    assert meta.hints["pipeline"] == "StableDiffusionInpaintPipeline"


def test_diffusers_missing_components(tmp_path: pathlib.Path) -> None:
    root = write_diffusers_folder(tmp_path / "flux", "flux-dev", omit=("text_encoder_2", "vae"))
    meta = inspect_path(root)
    assert meta.family == "flux-dev"
    assert meta.needs_components == ["text_encoder_2", "vae"]


def test_diffusers_component_without_weights_is_needed(tmp_path: pathlib.Path) -> None:
    root = write_diffusers_folder(tmp_path / "sd", "sd1")
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert inspect_path(root).needs_components == ["unet"]


def test_diffusers_variant_files_are_not_counted_twice(tmp_path: pathlib.Path) -> None:
    plain = inspect_path(write_diffusers_folder(tmp_path / "a", "sdxl"))
    both = inspect_path(write_diffusers_folder(tmp_path / "b", "sdxl", fp16_variant_too=True))
    assert both.parameter_count == plain.parameter_count
    assert both.size_bytes > plain.size_bytes


def test_diffusers_bad_model_index(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "model_index.json").write_text("{broken")
    with pytest.raises(InspectError, match="not valid JSON") as info:
        inspect_path(root)
    assert info.value.reason == "MODEL_FILE_INVALID"
    (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
    with pytest.raises(InspectError, match="_class_name"):
        inspect_path(root)


def test_diffusers_unknown_pipeline_warns(tmp_path: pathlib.Path) -> None:
    root = write_diffusers_folder(tmp_path / "x", "sd1")
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    meta = inspect_path(root)
    assert meta.family is None and any("WanPipeline" in w for w in meta.warnings)


def test_transformers_folder(tmp_path: pathlib.Path) -> None:
    root = write_transformers_folder(
        tmp_path / "llama", n_layer=3, n_embd=128, n_head=8, n_head_kv=2, n_ctx=4096
    )
    meta = inspect_path(root)
    assert meta.format is ModelFormat.SAFETENSORS
    assert meta.model_type is ModelType.LLM
    assert meta.architecture == "llama"
    assert (meta.context_length, meta.block_count, meta.embedding_length) == (4096, 3, 128)
    assert (meta.head_count, meta.head_count_kv, meta.key_length) == (8, 2, 16)
    assert meta.kv_cache_bytes_per_token == 3 * 2 * (16 + 16) * 2
    assert meta.has_chat_template is True
    assert meta.quantization == "BF16"
    assert meta.parameter_count == _params([root / "model.safetensors"])
    assert meta.size_bytes == _all_file_sizes(root)


@pytest.mark.parametrize(
    ("hf_type", "arch"), [("mistral", "llama"), ("qwen2", "qwen2"), ("gemma2", "gemma2")]
)
def test_transformers_architecture_names(tmp_path: pathlib.Path, hf_type: str, arch: str) -> None:
    root = write_transformers_folder(tmp_path / hf_type, model_type=hf_type, architectures=())
    meta = inspect_path(root)
    assert meta.architecture == arch and meta.model_type is ModelType.LLM


def test_transformers_sharded_with_missing_shard(tmp_path: pathlib.Path) -> None:
    complete = inspect_path(write_transformers_folder(tmp_path / "a", shards=3))
    partial = inspect_path(write_transformers_folder(tmp_path / "b", shards=3, missing_shards=1))
    assert (
        complete.parameter_count
        == inspect_path(write_transformers_folder(tmp_path / "c")).parameter_count
    )
    assert partial.parameter_count is not None and complete.parameter_count is not None
    assert partial.parameter_count < complete.parameter_count
    assert any("1 of 3 weight shards are missing" in w for w in partial.warnings)


def test_transformers_text_encoder_and_unknown(tmp_path: pathlib.Path) -> None:
    te = write_transformers_folder(
        tmp_path / "te", model_type="t5", architectures=("T5EncoderModel",), chat_template=None
    )
    assert inspect_path(te).model_type is ModelType.TEXT_ENCODER
    bert = write_transformers_folder(
        tmp_path / "bert", model_type="bert", architectures=("BertModel",)
    )
    meta = inspect_path(bert)
    assert meta.model_type is ModelType.UNKNOWN and meta.kv_cache_bytes_per_token is None


def test_unknown_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(InspectError) as info:
        inspect_path(tmp_path)
    assert info.value.reason == "UNSUPPORTED_FILE_FORMAT"
    assert "readme.md" in info.value.message
