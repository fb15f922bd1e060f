"""safetensors inspection: every family and model type, and every broken-header path."""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.catalog.domain import ModelFormat, ModelType
from services.catalog.inspect import InspectError, inspect_path
from tests.fixtures.safetensors_models import (
    FAMILIES,
    llm_tensors,
    write_family,
    write_header_only_safetensors,
    write_raw_safetensors,
)

pytestmark = pytest.mark.unit

NEEDS_TE_VAE = ["text_encoder", "vae"]

# family fixture -> (model type, family, variant, needs_components)
EXPECTED: dict[str, tuple[ModelType, str | None, str | None, list[str]]] = {
    "sd1": (ModelType.IMAGE, "sd1", None, []),
    "sd1-inpaint": (ModelType.IMAGE, "sd1", "inpaint", []),
    "sd1-pix2pix": (ModelType.IMAGE, "sd1", "instruct-pix2pix", []),
    "sd1-depth": (ModelType.IMAGE, "sd1", "depth", []),
    "sd2": (ModelType.IMAGE, "sd2", None, []),
    "sdxl": (ModelType.IMAGE, "sdxl", None, []),
    "sdxl-inpaint": (ModelType.IMAGE, "sdxl", "inpaint", []),
    "sdxl-refiner": (ModelType.IMAGE, "sdxl-refiner", None, []),
    "playground-v2.5": (ModelType.IMAGE, "playground-v2.5", None, []),
    "sd3": (ModelType.IMAGE, "sd3", None, NEEDS_TE_VAE),
    "sd3-all-in-one": (ModelType.IMAGE, "sd3", None, []),
    "sd3.5-medium": (ModelType.IMAGE, "sd3.5-medium", None, NEEDS_TE_VAE),
    "sd3.5-large": (ModelType.IMAGE, "sd3.5-large", None, NEEDS_TE_VAE),
    "flux-dev": (ModelType.IMAGE, "flux-dev", None, NEEDS_TE_VAE),
    "flux-schnell": (ModelType.IMAGE, "flux-schnell", None, NEEDS_TE_VAE),
    "flux-dev-fill": (ModelType.IMAGE, "flux-dev", "fill", NEEDS_TE_VAE),
    "flux-dev-depth": (ModelType.IMAGE, "flux-dev", "depth", NEEDS_TE_VAE),
    "flux-dev-fp8": (ModelType.IMAGE, "flux-dev", None, NEEDS_TE_VAE),
    "flux2": (ModelType.IMAGE, "flux2", None, NEEDS_TE_VAE),
    "chroma": (ModelType.IMAGE, "chroma", None, NEEDS_TE_VAE),
    "lora-sd1": (ModelType.LORA, "sd1", None, []),
    "lora-sd2": (ModelType.LORA, "sd2", None, []),
    "lora-sdxl": (ModelType.LORA, "sdxl", None, []),
    "lora-flux-kohya": (ModelType.LORA, "flux", None, []),
    "lora-flux-peft": (ModelType.LORA, "flux", None, []),
    "lora-sd3-peft": (ModelType.LORA, "sd3", None, []),
    "lora-sdxl-loha": (ModelType.LORA, "sdxl", None, []),
    "vae-sd": (ModelType.VAE, None, None, []),
    "vae-flux2": (ModelType.VAE, "flux2", None, []),
    "controlnet-sd1": (ModelType.CONTROLNET, "sd1", None, []),
    "controlnet-sdxl-diffusers": (ModelType.CONTROLNET, "sdxl", None, []),
    "embedding-sd1": (ModelType.EMBEDDING, "sd1", None, []),
    "embedding-sd2": (ModelType.EMBEDDING, "sd2", None, []),
    "embedding-sdxl": (ModelType.EMBEDDING, "sdxl", None, []),
    "text-encoder-clip-l": (ModelType.TEXT_ENCODER, None, None, []),
    "text-encoder-t5xxl": (ModelType.TEXT_ENCODER, None, None, []),
    "llm": (ModelType.LLM, None, None, []),
}


def test_every_fixture_family_has_an_expectation() -> None:
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_family_detection(tmp_path: pathlib.Path, name: str) -> None:
    path = write_family(tmp_path / f"{name}.safetensors", name)
    meta = inspect_path(path)
    model_type, family, variant, needs = EXPECTED[name]
    assert meta.format is ModelFormat.SAFETENSORS
    assert (meta.model_type, meta.family, meta.variant) == (model_type, family, variant)
    assert meta.needs_components == needs
    assert meta.size_bytes == path.stat().st_size
    assert meta.tensor_count == len(FAMILIES[name]())


def test_dominant_dtype_and_counts(tmp_path: pathlib.Path) -> None:
    meta = inspect_path(write_family(tmp_path / "f.safetensors", "flux-dev-fp8"))
    assert meta.quantization == "F8_E4M3"
    assert meta.dtypes == {"F8_E4M3": 8}
    shapes = [shape for _, shape in FAMILIES["flux-dev-fp8"]().values()]
    assert meta.parameter_count == sum(int(np.prod(s)) for s in shapes)
    assert meta.weights is not None and meta.weights.total_bytes == meta.parameter_count


def test_mixed_dtypes_label_is_the_majority_by_elements(tmp_path: pathlib.Path) -> None:
    tensors = {"big": ("BF16", (1000, 100)), "a": ("F32", (10,)), "b": ("F32", (10,))}
    meta = inspect_path(write_header_only_safetensors(tmp_path / "m.safetensors", tensors))
    assert meta.quantization == "BF16"
    assert meta.dtypes == {"BF16": 1, "F32": 2}


def test_sd2_v_prediction_hint(tmp_path: pathlib.Path) -> None:
    meta = inspect_path(write_family(tmp_path / "sd2.safetensors", "sd2"))
    assert meta.hints["prediction_type_guess"] == "v_prediction"


def test_llm_checkpoint_fields(tmp_path: pathlib.Path) -> None:
    path = write_header_only_safetensors(tmp_path / "model.safetensors", llm_tensors(3, 64, 512))
    meta = inspect_path(path)
    assert meta.model_type is ModelType.LLM
    assert meta.architecture is None
    assert (meta.block_count, meta.embedding_length, meta.vocab_size) == (3, 64, 512)


def test_metadata_hints_are_bounded(tmp_path: pathlib.Path) -> None:
    metadata = {
        "modelspec.title": "My LoRA",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.thumbnail": "data:image/png;base64," + "A" * 100_000,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_tag_frequency": "{" + "x" * 10_000 + "}",
        "format": "pt",
        "modelspec.description": "d" * 5000,
    }
    meta = inspect_path(write_family(tmp_path / "l.safetensors", "lora-sdxl", metadata))
    assert meta.name == "My LoRA"
    assert meta.hints["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta.hints["ss_network_module"] == "networks.lora"
    assert meta.hints["format"] == "pt"
    assert "modelspec.thumbnail" not in meta.hints
    assert "ss_tag_frequency" not in meta.hints
    assert len(meta.hints["modelspec.description"]) == 256


def test_lora_family_from_metadata_when_keys_cannot_tell(tmp_path: pathlib.Path) -> None:
    tensors = {"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": ("F16", (8, 1280, 3, 3))}
    path = write_header_only_safetensors(
        tmp_path / "l.safetensors", tensors, {"ss_base_model_version": "sd_v1"}
    )
    assert inspect_path(path).family == "sd1"


def test_vae_family_from_file_name(tmp_path: pathlib.Path) -> None:
    meta = inspect_path(write_family(tmp_path / "sdxl_vae.safetensors", "vae-sd"))
    assert meta.model_type is ModelType.VAE and meta.family == "sdxl"


def test_unknown_state_dict(tmp_path: pathlib.Path) -> None:
    path = write_header_only_safetensors(tmp_path / "x.safetensors", {"foo.bar": ("F32", (3,))})
    meta = inspect_path(path)
    assert meta.model_type is ModelType.UNKNOWN and meta.warnings


def test_real_safetensors_library_file(tmp_path: pathlib.Path) -> None:
    """Cross-check the reader with a file written by the safetensors library itself."""
    path = tmp_path / "real.safetensors"
    save_file(
        {
            "emb_params": np.zeros((2, 768), dtype=np.float32),
        },
        str(path),
        metadata={"format": "pt"},
    )
    meta = inspect_path(path)
    assert meta.model_type is ModelType.EMBEDDING and meta.family == "sd1"
    assert meta.parameter_count == 1536 and meta.dtypes == {"F32": 1}


def _header(entries: dict[str, object]) -> bytes:
    return json.dumps(entries).encode()


@pytest.mark.parametrize(
    ("body", "declared", "words"),
    [
        (b"{not json}", None, "not valid JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (b"\xff\xfe{}", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON|not a JSON object"),
        (_header({"t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 3]}}), None, "needs 4"),
        (_header({"t": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 0]}}), None, "shape"),
        (_header({"t": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}), None, "offsets"),
        (_header({"t": {"shape": [2], "data_offsets": [0, 4]}}), None, "dtype"),
        (_header({"t": [1]}), None, "not an object"),
        (b"{}", 1 << 40, "exceeds the 100000000-byte limit"),
        (b"{}" + b" " * 30, 50_000_000, "exceeds the file size"),
        (b"{}", 1, "too small"),
    ],
)
def test_broken_headers(
    tmp_path: pathlib.Path, body: bytes, declared: int | None, words: str
) -> None:
    path = write_raw_safetensors(
        tmp_path / "bad.safetensors", declared if declared is not None else len(body), body
    )
    with pytest.raises(InspectError, match=words) as info:
        inspect_path(path)
    assert info.value.reason == "MODEL_FILE_INVALID"


def test_truncated_data(tmp_path: pathlib.Path) -> None:
    path = write_header_only_safetensors(
        tmp_path / "cut.safetensors", {"w": ("F16", (1024, 1024))}, truncate_data=10
    )
    with pytest.raises(InspectError, match="truncated") as info:
        inspect_path(path)
    assert str(path.stat().st_size) in info.value.message
    assert str(path.stat().st_size + 10) in info.value.message


def test_tiny_file_without_header(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(struct.pack("<I", 5))
    with pytest.raises(InspectError, match="truncated"):
        inspect_path(path)


def test_unsupported_file_names_what_it_found(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(InspectError) as info:
        inspect_path(path)
    assert info.value.reason == "UNSUPPORTED_FILE_FORMAT"
    assert b"hello wo".hex() in info.value.message
