"""Model folders: diffusers pipelines and HF transformers checkpoints (reference §4.4).

Only small JSON files (bounded by `MAX_JSON_BYTES`) and safetensors headers are read.
A diffusers folder's family comes from `model_index.json` `_class_name`, refined by the
component configs (`unet/config.json` cross_attention_dim, `transformer/config.json`
guidance_embeds / num_layers); a transformers folder's shape from `config.json`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from services.catalog.domain import ModelFormat, ModelMetadata, ModelType, WeightsBreakdown
from services.catalog.inspect import MODEL_FILE_INVALID, InspectError
from services.catalog.inspect.safetensors import (
    SafetensorsHeader,
    read_safetensors_header,
    summarize,
)

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_FOLDER_FILES = 100_000  # size_bytes walks at most this many files
HINT_MAX_CHARS = 256

# Components that carry no weights (a folder is enough) or that pipelines can run without.
_NO_WEIGHTS_MARKERS = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")
_OPTIONAL_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "image_encoder"})

# HF `model_type` -> the llama.cpp architecture name its converter writes (where obvious).
HF_TO_LLAMA_CPP_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # convert_hf_to_gguf writes MistralForCausalLM as "llama"
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi": "phi2",
    "phi3": "phi3",
    "phimoe": "phimoe",
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gptneox",
    "falcon": "falcon",
    "starcoder2": "starcoder2",
    "stablelm": "stablelm",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "cohere": "command-r",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "granite": "granite",
    "gpt_oss": "gpt-oss",
    "smollm3": "smollm3",
}
_TEXT_ENCODER_CLASSES = frozenset(
    {"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"}
)
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def _fail(path: pathlib.Path, message: str) -> InspectError:
    return InspectError(f"{path}: {message}", reason=MODEL_FILE_INVALID)


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """A small JSON object file, bounded in size."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise _fail(path, f"{size} bytes, more than the {MAX_JSON_BYTES}-byte limit")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise _fail(path, "not a JSON object")
    return data


def _optional_json(path: pathlib.Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def describe_directory(path: pathlib.Path, limit: int = 10) -> str:
    """A short listing for error messages: the first few entry names."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not names:
        return "nothing"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def folder_size(path: pathlib.Path) -> int:
    """Bytes of every file under `path` (symlinks followed to their targets, as in the HF cache)."""
    total = 0
    seen = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            seen += 1
            if seen > MAX_FOLDER_FILES:
                return total
            try:
                total += (pathlib.Path(root) / name).stat().st_size
            except OSError:
                continue  # a dangling link: not part of the model's size
    return total


def _weight_group(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of one component: the plain set, else the first variant set.

    `diffusion_pytorch_model.safetensors` and `diffusion_pytorch_model.fp16.safetensors` are
    the same weights twice; counting both would double the parameters.
    """
    groups: dict[str, list[pathlib.Path]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        stem = _SHARD_SUFFIX.sub("", file.name[: -len(".safetensors")])
        variant = stem.split(".", 1)[1] if "." in stem else ""
        groups.setdefault(variant, []).append(file)
    if not groups:
        return []
    return groups.get("", groups[min(groups)])


def _headers(files: list[pathlib.Path]) -> list[SafetensorsHeader]:
    return [read_safetensors_header(f) for f in files]


def _dominant(headers: list[SafetensorsHeader]) -> tuple[int, dict[str, int], str | None, int]:
    summary = summarize(headers)
    return summary.parameter_count, summary.dtypes, summary.dominant_dtype, summary.total_bytes


def _int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


# --- diffusers -----------------------------------------------------------------------------


def _diffusers_family(
    class_name: str, components: dict[str, list[Any]], folder: pathlib.Path
) -> tuple[str | None, str | None, list[str]]:
    """(family, variant, warnings) from the pipeline class and the component configs."""
    unet = _optional_json(folder / "unet" / "config.json")
    transformer = _optional_json(folder / "transformer" / "config.json")
    scheduler = _optional_json(folder / "scheduler" / "scheduler_config.json")
    family: str | None = None
    variant: str | None = None
    warnings: list[str] = []

    if class_name.startswith("StableDiffusionXL"):
        if "text_encoder" not in components and "text_encoder_2" in components:
            family = "sdxl-refiner"
        elif str(scheduler.get("_class_name", "")).startswith("EDM"):
            family = "playground-v2.5"
        else:
            family = "sdxl"
    elif class_name.startswith("StableDiffusion3"):
        layers = _int(transformer, "num_layers")
        if layers is not None and layers >= 38:
            family = "sd3.5-large"
        elif transformer.get("dual_attention_layers"):
            family = "sd3.5-medium"
        else:
            family = "sd3"
    elif class_name.startswith("Flux2"):
        family = "flux2"
    elif class_name.startswith("Chroma"):
        family = "chroma"
    elif class_name.startswith("Flux"):
        family = "flux-dev" if transformer.get("guidance_embeds") else "flux-schnell"
        in_channels = _int(transformer, "in_channels")
        if "Fill" in class_name or in_channels == 384:
            variant = "fill"
        elif in_channels == 128:
            variant = "canny" if "canny" in folder.name.lower() else "depth"
    elif class_name.startswith("StableDiffusion"):
        cross = _int(unet, "cross_attention_dim")
        family = {768: "sd1", 1024: "sd2"}.get(cross or 0)
        if family is None:
            warnings.append(f"unet cross_attention_dim {cross} matches neither SD1 nor SD2")
    else:
        warnings.append(f"pipeline {class_name[:80]!r} is not a recognised family")

    if variant is None and unet:
        in_channels = _int(unet, "in_channels")
        variant = {9: "inpaint", 8: "instruct-pix2pix", 5: "depth"}.get(in_channels or 4)
    if variant is None:
        for marker, name in (
            ("Inpaint", "inpaint"),
            ("InstructPix2Pix", "instruct-pix2pix"),
            ("Depth2Img", "depth"),
        ):
            if marker in class_name:
                variant = name
    return family, variant, warnings


def inspect_diffusers_folder(path: pathlib.Path) -> ModelMetadata:
    """Inspect a diffusers pipeline folder (model_index.json + component folders)."""
    index = read_json(path / "model_index.json")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise _fail(path / "model_index.json", "_class_name is missing")
    components = {
        name: spec
        for name, spec in index.items()
        if not name.startswith("_")
        and isinstance(spec, list)
        and len(spec) == 2
        and all(isinstance(s, str) for s in spec)
    }
    warnings: list[str] = []
    needs: list[str] = []
    headers: list[SafetensorsHeader] = []
    for name, (_library, component_class) in sorted(components.items()):
        directory = path / name
        needs_weights = not any(m in component_class for m in _NO_WEIGHTS_MARKERS)
        files = _weight_group(directory) if directory.is_dir() else []
        if directory.is_dir() and (files or not needs_weights):
            headers.extend(_headers(files))
            continue
        if directory.is_dir() and any(directory.glob("*.bin")):
            warnings.append(f"{name}: only .bin weights, not inspected")
            continue
        if name in _OPTIONAL_COMPONENTS:
            warnings.append(f"{name} is listed in model_index.json but not present")
            continue
        needs.append(name)

    family, variant, family_warnings = _diffusers_family(class_name, components, path)
    warnings.extend(family_warnings)
    for header in headers:
        warnings.extend(header.warnings[:5])
    params, dtypes, dominant, total_bytes = _dominant(headers)
    hints = {"pipeline": class_name[:HINT_MAX_CHARS]}
    version = index.get("_diffusers_version")
    if isinstance(version, str):
        hints["diffusers_version"] = version[:HINT_MAX_CHARS]
    return ModelMetadata(
        format=ModelFormat.DIFFUSERS,
        model_type=ModelType.IMAGE,
        family=family,
        variant=variant,
        quantization=dominant,
        parameter_count=params if headers else None,
        needs_components=needs,
        dtypes=dtypes,
        tensor_count=sum(len(h.tensors) for h in headers) if headers else None,
        weights=WeightsBreakdown(total_bytes=total_bytes) if headers else None,
        size_bytes=folder_size(path),
        hints=hints,
        warnings=warnings,
    )


# --- HF transformers -----------------------------------------------------------------------


def _transformers_weights(path: pathlib.Path, warnings: list[str]) -> list[pathlib.Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise _fail(index_file, "weight_map is missing")
        shards = sorted({v for v in weight_map.values() if isinstance(v, str)})
        present = []
        for shard in shards:
            file = path / shard
            # Shard names come from the file: keep them inside the folder.
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise _fail(index_file, f"shard name {shard[:80]!r} is not a plain file name")
            if file.is_file():
                present.append(file)
        missing = len(shards) - len(present)
        if missing:
            warnings.append(f"{missing} of {len(shards)} weight shards are missing")
        return present
    files = _weight_group(path)
    if not files:
        if any(path.glob("*.bin")):
            warnings.append("only .bin weights, not inspected")
        else:
            warnings.append("no safetensors weights found")
    return files


def _has_chat_template(path: pathlib.Path) -> bool:
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if file.is_file() and file.stat().st_size > 0:
            return True
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file() and tokenizer_config.stat().st_size <= MAX_JSON_BYTES:
        template = read_json(tokenizer_config).get("chat_template")
        return bool(template)
    return False


def inspect_transformers_folder(path: pathlib.Path) -> ModelMetadata:
    """Inspect an HF transformers checkpoint folder (config.json + safetensors weights)."""
    config = read_json(path / "config.json")
    text = config.get("text_config")
    # Multimodal LLMs keep the language model's shape in text_config.
    shape = {**config, **text} if isinstance(text, dict) else config
    hf_type = config.get("model_type")
    hf_type = hf_type if isinstance(hf_type, str) else None
    classes = [c for c in config.get("architectures") or [] if isinstance(c, str)]
    warnings: list[str] = []

    if any(c.endswith(("ForCausalLM", "ForConditionalGeneration")) for c in classes) or (
        not classes and hf_type in HF_TO_LLAMA_CPP_ARCH
    ):
        model_type = ModelType.LLM
    elif any(c in _TEXT_ENCODER_CLASSES for c in classes):
        model_type = ModelType.TEXT_ENCODER
    else:
        model_type = ModelType.UNKNOWN
        warnings.append(f"architectures {classes[:3]} are not a causal LM")
    architecture = HF_TO_LLAMA_CPP_ARCH.get(hf_type or "", hf_type)

    hidden = _int(shape, "hidden_size")
    n_head = _int(shape, "num_attention_heads")
    n_head_kv = _int(shape, "num_key_value_heads") or n_head
    head_dim = _int(shape, "head_dim") or (hidden // n_head if hidden and n_head else None)
    layers = _int(shape, "num_hidden_layers")
    kv_per_token = None
    if model_type is ModelType.LLM and layers and n_head_kv and head_dim:
        kv_per_token = layers * n_head_kv * (head_dim + head_dim) * 2

    files = _transformers_weights(path, warnings)
    headers = _headers(files)
    for header in headers:
        warnings.extend(header.warnings[:5])
    params, dtypes, dominant, total_bytes = _dominant(headers)
    hints: dict[str, str] = {}
    torch_dtype = config.get("torch_dtype") or config.get("dtype")
    if isinstance(torch_dtype, str):
        hints["torch_dtype"] = torch_dtype[:HINT_MAX_CHARS]
    if hf_type:
        hints["model_type"] = hf_type[:HINT_MAX_CHARS]
    return ModelMetadata(
        format=ModelFormat.SAFETENSORS,
        model_type=model_type,
        architecture=architecture,
        quantization=dominant,
        parameter_count=params if headers else None,
        context_length=_int(shape, "max_position_embeddings"),
        block_count=layers,
        embedding_length=hidden,
        feed_forward_length=_int(shape, "intermediate_size"),
        head_count=n_head,
        head_count_kv=n_head_kv,
        key_length=head_dim,
        value_length=head_dim,
        expert_count=_int(shape, "num_local_experts") or _int(shape, "num_experts"),
        expert_used_count=_int(shape, "num_experts_per_tok"),
        vocab_size=_int(shape, "vocab_size"),
        sliding_window=_int(shape, "sliding_window"),
        has_chat_template=_has_chat_template(path) if model_type is ModelType.LLM else None,
        kv_cache_bytes_per_token=kv_per_token,
        dtypes=dtypes,
        tensor_count=sum(len(h.tensors) for h in headers) if headers else None,
        weights=WeightsBreakdown(total_bytes=total_bytes) if headers else None,
        size_bytes=folder_size(path),
        hints=hints,
        warnings=warnings,
    )
