"""File-level choices: quantization from names, GGUF auto-selection, repo file selection."""

from __future__ import annotations

import pytest

from services.catalog.domain import ModelFormat
from services.provisioner.sources.context import DEFAULT_QUANTIZATION_PREFERENCE
from services.provisioner.sources.files import (
    choose_gguf,
    drop_model_suffix,
    format_from_name,
    gguf_candidates,
    model_slug,
    quantization_from_name,
    sanitize_filename,
    select_diffusers_files,
    select_transformers_files,
    split_part,
    split_set_for,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", "Q4_K_M"),
        ("Llama-3-8B-Instruct-q5_k_s.gguf", "Q5_K_S"),
        ("model-Q8_0.gguf", "Q8_0"),
        ("model.IQ4_XS.gguf", "IQ4_XS"),
        ("sub/Qwen3-8B-IQ2_XXS.gguf", "IQ2_XXS"),
        ("Qwen3-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("model-Q6_K.gguf", "Q6_K"),
        ("model-f16.gguf", "F16"),
        ("model-BF16-00001-of-00002.gguf", "BF16"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("model.gguf", None),
        ("Q4_K_M/model.gguf", None),  # folders do not count: the file name does
        ("flux1-dev-fp16.safetensors", "F16"),
    ],
)
def test_quantization_from_name(name: str, label: str | None) -> None:
    assert quantization_from_name(name) == label


def test_format_from_name() -> None:
    assert format_from_name("a/B.GGUF") is ModelFormat.GGUF
    assert format_from_name("x.safetensors") is ModelFormat.SAFETENSORS
    assert format_from_name("model_index.json") is ModelFormat.DIFFUSERS
    assert format_from_name("config.json") is None


def test_split_part_and_sets() -> None:
    assert split_part("m-Q8_0-00002-of-00003.gguf") == ("m-Q8_0", 2, 3)
    assert split_part("m-00004-of-00003.gguf") is None
    assert split_part("m.gguf") is None
    paths = ["m-00002-of-00002.gguf", "m-00001-of-00002.gguf", "x.gguf"]
    assert split_set_for("m-00002-of-00002.gguf", paths) == [
        "m-00001-of-00002.gguf",
        "m-00002-of-00002.gguf",
    ]
    assert split_set_for("x.gguf", paths) == ["x.gguf"]


REPO = [
    "README.md",
    "model.Q2_K.gguf",
    "model.Q4_K_M.gguf",
    "model.Q5_K_M.gguf",
    "model.Q8_0.gguf",
    "mmproj-model-f16.gguf",
    "imatrix.gguf",
]


def test_choose_gguf_follows_the_preference_list() -> None:
    choice = choose_gguf(REPO, DEFAULT_QUANTIZATION_PREFERENCE)
    assert choice is not None
    assert choice.candidate.paths == ("model.Q4_K_M.gguf",)
    assert choice.reason.startswith("Q4_K_M: first match of the preference list [Q4_K_M, Q5_K_M")

    choice = choose_gguf(REPO, ["IQ4_XS", "Q8_0", "Q4_K_M"])
    assert choice is not None and choice.candidate.first == "model.Q8_0.gguf"
    assert "match #2" in choice.reason


def test_choose_gguf_skips_projectors_and_imatrix() -> None:
    candidates = gguf_candidates(REPO)
    assert all("mmproj" not in c.first and "imatrix" not in c.first for c in candidates)
    only_aux = ["mmproj-x-f16.gguf", "x.imatrix.gguf"]
    assert choose_gguf(only_aux, ["F16"]) is None


def test_choose_gguf_pulls_every_part_of_a_split_model_in_order() -> None:
    paths = [
        "big-Q4_K_M-00003-of-00003.gguf",
        "big-Q4_K_M-00001-of-00003.gguf",
        "big-Q4_K_M-00002-of-00003.gguf",
        "big-Q8_0-00001-of-00002.gguf",  # incomplete set: never a candidate
        "big-Q3_K_M.gguf",
    ]
    choice = choose_gguf(paths, ["Q8_0", "Q4_K_M"])
    assert choice is not None
    assert choice.candidate.paths == (
        "big-Q4_K_M-00001-of-00003.gguf",
        "big-Q4_K_M-00002-of-00003.gguf",
        "big-Q4_K_M-00003-of-00003.gguf",
    )
    assert "split into 3 parts" in choice.reason


def test_choose_gguf_single_candidate_and_no_match() -> None:
    choice = choose_gguf(["only-IQ1_S.gguf"], ["Q4_K_M"])
    assert choice is not None and choice.candidate.first == "only-IQ1_S.gguf"
    assert "only GGUF" in choice.reason
    with pytest.raises(LookupError, match="available: Q2_K, Q8_0"):
        choose_gguf(["m.Q2_K.gguf", "m.Q8_0.gguf"], ["Q4_K_M"])
    assert choose_gguf(["README.md", "config.json"], ["Q4_K_M"]) is None


SD_REPO = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.safetensors",  # root single-file checkpoint: a duplicate of the folders
    "v1-5-pruned-emaonly.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/model.onnx",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",  # only a variant: kept
    "vae/diffusion_pytorch_model.ema.safetensors",
    "onnx/unet/model.onnx",
    "unused/config.json",
]


def test_diffusers_selection_has_no_duplicate_weights() -> None:
    components = [
        "feature_extractor",
        "safety_checker",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    selected = select_diffusers_files(SD_REPO, components)
    assert selected == [
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    # Without model_index components: every top-level folder except known exports.
    everything = select_diffusers_files(SD_REPO, None)
    assert "unused/config.json" in everything
    assert not any(p.startswith("onnx/") for p in everything)


def test_diffusers_sharded_weights_keep_their_index() -> None:
    paths = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    assert select_diffusers_files(paths, ["transformer"]) == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]


def test_transformers_selection() -> None:
    paths = [
        "README.md",
        "LICENSE.txt",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "model.Q4_K_M.gguf",
        "modeling_custom.py",
    ]
    assert select_transformers_files(paths) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    # Only .bin weights: those are what the model has.
    bins = select_transformers_files(["config.json", "pytorch_model.bin", "flax_model.msgpack"])
    assert bins == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("model.safetensors", "model.safetensors"),
        ("../../etc/passwd", "passwd"),
        ("..", "download"),
        ("a\\b\\c.gguf", "c.gguf"),
        ("we:ird*na?me.gguf", "we_ird_na_me.gguf"),
        (".hidden", "hidden"),
        ("", "download"),
        ("x\x00y.gguf", "x_y.gguf"),
    ],
)
def test_sanitize_filename(raw: str, safe: str) -> None:
    assert sanitize_filename(raw) == safe


def test_model_slug_and_suffixes() -> None:
    assert drop_model_suffix("TinyLlama-1.1B-Chat-GGUF") == "TinyLlama-1.1B-Chat"
    assert drop_model_suffix("tinyllama.Q4_K_M.gguf") == "tinyllama"
    assert drop_model_suffix("big-Q8_0-00001-of-00002.gguf") == "big"
    assert model_slug("TinyLlama-1.1B-Chat", "Q4_K_M") == "tinyllama-1-1b-chat-q4-k-m"
    slug = model_slug("x" * 100)
    assert len(slug) <= 63
    assert model_slug("", None) == "model"
