"""What a safetensors state dict is, from its tensor names and shapes (reference §4.2-4.3).

Tensor keys and shapes are the ground truth; `__metadata__` (modelspec, kohya `ss_*`) and the
file name are only hints, used when the keys cannot decide (a VAE's base model, a LoRA that
touches only the text encoder). Rules follow diffusers `infer_diffusers_model_type`, InvokeAI's
probes and ComfyUI's `detect_unet_config`.

Families: sd1, sd2, sdxl, sdxl-refiner, playground-v2.5, sd3, sd3.5-medium, sd3.5-large,
flux-dev, flux-schnell, flux2, chroma. LoRAs, ControlNets and embeddings get their base family;
Flux LoRAs say "flux" (the keys cannot tell dev from schnell, and most load on both).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.catalog.domain import ModelType

Shapes = Mapping[str, tuple[int, ...]]

# Single-file checkpoints store the UNet/DiT under one of these prefixes (or none).
_IMAGE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")

_LORA_PREFIXES = (
    "lora_unet_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_transformer_",
)
_LORA_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_mid.weight",
)
_LYCORIS_MARKERS = (".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w2", ".lokr_w1_a")

# Cross-attention (text embedding) width -> base family of SD UNets.
_CROSS_ATTN_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
# UNet input channels -> variant (4 = plain text-to-image).
_IN_CHANNELS_VARIANT = {9: "inpaint", 8: "instruct-pix2pix", 5: "depth"}

_LLM_KEY = re.compile(r"^(?:model\.)?layers\.\d+\.")


@dataclass
class Classification:
    """The verdict on one state dict."""

    model_type: ModelType
    family: str | None = None
    variant: str | None = None
    architecture: str | None = None
    needs_components: list[str] = field(default_factory=list)
    hints: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Keys:
    """Lookups by key with the single-file prefixes stripped."""

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes

    def get(self, key: str) -> tuple[int, ...] | None:
        for prefix in _IMAGE_PREFIXES:
            shape = self.shapes.get(prefix + key)
            if shape is not None:
                return shape
        return None

    def has(self, *keys: str) -> bool:
        return any(self.get(k) is not None for k in keys)

    def any_startswith(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.shapes)

    def dim(self, key: str, axis: int) -> int | None:
        shape = self.get(key)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]


def family_from_name(file_name: str) -> str | None:
    """A family guessed from a file name (VAEs carry no better evidence)."""
    name = file_name.lower()
    if "sdxl" in name or re.search(r"(?<![a-z])xl(?![a-z])", name):
        return "sdxl"
    if "sd3" in name or "sd35" in name:
        return "sd3"
    if "flux" in name:
        return "flux"
    if re.search(r"sd-?(?:v)?1[._-]?5|sd15|sd1(?![0-9])", name):
        return "sd1"
    if re.search(r"sd-?(?:v)?2(?:[._-]?1)?(?![0-9])|sd21", name):
        return "sd2"
    return None


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The base family kohya or ModelSpec metadata names, if any."""
    base = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    for text in (base, arch):
        if not text:
            continue
        if "sdxl" in text or "stable-diffusion-xl" in text:
            return "sdxl-refiner" if "refiner" in text else "sdxl"
        if text.startswith("sd_v1") or "stable-diffusion-v1" in text:
            return "sd1"
        if text.startswith("sd_v2") or "stable-diffusion-v2" in text:
            return "sd2"
        if "flux" in text:
            return "flux"
        if "sd3" in text or "stable-diffusion-3" in text:
            return "sd3"
    return None


def classify(shapes: Shapes, metadata: Mapping[str, str], file_name: str) -> Classification:
    """Say what a safetensors state dict is: model type, family, variant, missing parts."""
    keys = _Keys(shapes)
    names = shapes.keys()
    if any(k.startswith(_LORA_PREFIXES) or k.endswith(_LORA_SUFFIXES) for k in names) or any(
        m in k for k in names for m in _LYCORIS_MARKERS
    ):
        return _classify_lora(shapes, metadata)
    embedding = _classify_embedding(shapes)
    if embedding is not None:
        return embedding
    if keys.any_startswith("control_model.", "controlnet_") or any(
        "input_hint_block" in k for k in names
    ):
        return _classify_controlnet(shapes)
    image = _classify_image(keys, file_name)
    if image is not None:
        return image
    if keys.any_startswith("encoder.conv_in.", "decoder.conv_in.") and not keys.any_startswith(
        "first_stage_model.", "model.diffusion_model."
    ):
        return _classify_vae(shapes, file_name)
    if "lm_head.weight" in shapes or any(_LLM_KEY.match(k) for k in names):
        return Classification(ModelType.LLM)
    text_encoder = _classify_text_encoder(shapes)
    if text_encoder is not None:
        return text_encoder
    return Classification(ModelType.UNKNOWN, warnings=["tensor names match no known model family"])


def _classify_lora(shapes: Shapes, metadata: Mapping[str, str]) -> Classification:
    names = list(shapes)
    hints: dict[str, str] = {}
    if any(m in k for k in names for m in _LYCORIS_MARKERS):
        hints["lora_format"] = "lycoris"
    elif any(k.startswith(_LORA_PREFIXES) for k in names):
        hints["lora_format"] = "kohya"
    else:
        hints["lora_format"] = "peft"

    family: str | None = None
    if any(
        "double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k
        for k in names
    ):
        family = "flux"
    elif any("joint_blocks" in k for k in names) or any(
        k.startswith("transformer.transformer_blocks.") and ".attn.add_" in k for k in names
    ):
        family = "sd3"
    else:
        family = _lora_unet_family(shapes)
        if family is None:
            family = _lora_text_encoder_family(shapes)
    if family is None:
        family = family_from_metadata(metadata)
    warnings = [] if family else ["LoRA base model not recognised"]
    return Classification(ModelType.LORA, family=family, hints=hints, warnings=warnings)


def _lora_unet_family(shapes: Shapes) -> str | None:
    """The cross-attention width a LoRA's attn2 to_k/to_v down matrix takes as input."""
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        if not ("attn2_to_k" in flat or "attn2_to_v" in flat) or len(shape) < 2:
            continue
        if key.endswith((".lora_down.weight", ".lora_A.weight", ".hada_w1_b", ".hada_w2_b")):
            family = _CROSS_ATTN_FAMILY.get(shape[1])
            if family:
                return family
    return None


def _lora_text_encoder_family(shapes: Shapes) -> str | None:
    names = list(shapes)
    if any(k.startswith("lora_te2_") for k in names):
        return "sdxl"
    for key, shape in shapes.items():
        if key.startswith("lora_te_") and key.endswith(".lora_down.weight") and len(shape) >= 2:
            return {768: "sd1", 1024: "sd2"}.get(shape[1])
    return None


def _classify_embedding(shapes: Shapes) -> Classification | None:
    """Textual inversion: a handful of vectors (emb_params, string_to_param, clip_l/clip_g)."""
    names = set(shapes)
    if not names or len(names) > 4:
        return None
    if "clip_g" in names:
        return Classification(ModelType.EMBEDDING, family="sdxl")
    if names == {"clip_l"}:
        return Classification(ModelType.EMBEDDING, family=None, hints={"clip": "clip_l"})
    vectors = [shapes[k] for k in names if k == "emb_params" or k.startswith("string_to_param")]
    if not vectors:
        return None
    dim = vectors[0][-1] if vectors[0] else 0
    family = {768: "sd1", 1024: "sd2"}.get(dim)
    warnings = [] if family else [f"embedding width {dim} matches no known text encoder"]
    return Classification(ModelType.EMBEDDING, family=family, warnings=warnings)


def _classify_controlnet(shapes: Shapes) -> Classification:
    names = list(shapes)
    family: str | None = None
    if any(k.startswith(("controlnet_x_embedder", "controlnet_single_blocks")) for k in names):
        family = "flux"
    else:
        for key, shape in shapes.items():
            if key.endswith("attn2.to_k.weight") and len(shape) >= 2:
                family = _CROSS_ATTN_FAMILY.get(shape[-1])
                break
    warnings = [] if family else ["ControlNet base model not recognised"]
    return Classification(ModelType.CONTROLNET, family=family, warnings=warnings)


def _missing(keys: _Keys, text_encoder_prefixes: tuple[str, ...]) -> list[str]:
    missing = []
    if not keys.any_startswith(*text_encoder_prefixes):
        missing.append("text_encoder")
    if not keys.any_startswith("first_stage_model.", "vae."):
        missing.append("vae")
    return missing


def _classify_image(keys: _Keys, file_name: str) -> Classification | None:
    for classify_family in (_classify_flux_like, _classify_sd3, _classify_unet):
        found = classify_family(keys, file_name)
        if found is not None:
            return found
    return None


def _classify_flux_like(keys: _Keys, file_name: str) -> Classification | None:
    te = ("text_encoders.", "conditioner.", "cond_stage_model.")
    if keys.has("single_stream_modulation.lin.weight"):
        return Classification(ModelType.IMAGE, family="flux2", needs_components=_missing(keys, te))
    if keys.has("distilled_guidance_layer.in_proj.bias"):
        return Classification(ModelType.IMAGE, family="chroma", needs_components=_missing(keys, te))
    if keys.has("double_blocks.0.img_attn.norm.key_norm.scale"):
        dev = keys.has("guidance_in.in_layer.bias")
        in_channels = keys.dim("img_in.weight", 1)
    elif keys.has("single_transformer_blocks.0.attn.to_k.weight") and keys.has("x_embedder.weight"):
        # diffusers-format FluxTransformer2DModel weights
        dev = keys.has("time_text_embed.guidance_embedder.linear_1.weight")
        in_channels = keys.dim("x_embedder.weight", 1)
    else:
        return None
    variant = None
    if in_channels == 384:
        variant = "fill"
    elif in_channels == 128:
        variant = "canny" if "canny" in file_name.lower() else "depth"
    return Classification(
        ModelType.IMAGE,
        family="flux-dev" if dev else "flux-schnell",
        variant=variant,
        needs_components=_missing(keys, te),
    )


def _classify_sd3(keys: _Keys, file_name: str) -> Classification | None:
    te = ("text_encoders.",)
    if keys.has(
        "joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "joint_blocks.0.context_block.attn.qkv.weight",
    ):
        if keys.has("joint_blocks.37.x_block.mlp.fc1.weight"):
            family = "sd3.5-large"
        elif keys.dim("pos_embed", 1) == 147456 or keys.has(
            "joint_blocks.0.x_block.attn2.qkv.weight"
        ):
            family = "sd3.5-medium"
        else:
            family = "sd3"
    elif keys.has("transformer_blocks.0.attn.add_q_proj.weight") and keys.has(
        "pos_embed.pos_embed"
    ):
        # diffusers-format SD3Transformer2DModel weights
        if keys.has("transformer_blocks.37.ff.net.0.proj.weight"):
            family = "sd3.5-large"
        elif keys.has("transformer_blocks.0.attn2.to_q.weight"):
            family = "sd3.5-medium"
        else:
            family = "sd3"
    else:
        return None
    return Classification(ModelType.IMAGE, family=family, needs_components=_missing(keys, te))


def _classify_unet(keys: _Keys, file_name: str) -> Classification | None:
    hints: dict[str, str] = {}
    family: str | None = None
    xl_k = keys.dim("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", -1)
    sd_k = keys.dim("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", -1) or keys.dim(
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", -1
    )
    diffusers_k = keys.dim("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", -1)
    ldm = xl_k is not None or sd_k is not None or keys.has("input_blocks.0.0.weight")
    if keys.has("edm_mean") and (xl_k is not None or keys.any_startswith("conditioner.")):
        family = "playground-v2.5"
    elif (
        keys.has(
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
            "conditioner.embedders.1.model.ln_final.weight",
        )
        or xl_k == 2048
    ):
        family = "sdxl"
    elif xl_k == 1280 or keys.has("conditioner.embedders.0.model.ln_final.weight"):
        family = "sdxl-refiner"
    elif sd_k is not None:
        family = _CROSS_ATTN_FAMILY.get(sd_k)
    elif diffusers_k is not None:
        family = _CROSS_ATTN_FAMILY.get(diffusers_k)
    elif not ldm:
        return None

    in_channels = keys.dim("input_blocks.0.0.weight", 1) or keys.dim("conv_in.weight", 1)
    variant = _IN_CHANNELS_VARIANT.get(in_channels or 4)
    if family == "sd2" and variant is None:
        # v-prediction cannot be read from the weights (A1111 runs a test step); the 768-px
        # SD2 checkpoints are v-prediction, the 512-px base is epsilon. Hint only.
        hints["prediction_type_guess"] = "v_prediction"
    warnings = [] if family else ["UNet found but its base model is not recognised"]
    te_prefixes = (
        ("conditioner.",)
        if family and family.startswith(("sdxl", "playground"))
        else ("cond_stage_model.",)
    )
    return Classification(
        ModelType.IMAGE,
        family=family,
        variant=variant,
        needs_components=_missing(keys, te_prefixes),
        hints=hints,
        warnings=warnings,
    )


def _classify_vae(shapes: Shapes, file_name: str) -> Classification:
    latent = None
    shape = shapes.get("decoder.conv_in.weight")
    if shape is not None and len(shape) >= 2:
        latent = shape[1]
    hints = {"latent_channels": str(latent)} if latent is not None else {}
    family = family_from_name(file_name)
    if latent == 32:
        family = "flux2"
    elif latent == 16 and family not in ("flux", "sd3"):
        family = None  # 16 channels: Flux.1 or SD3; only the name could say which
    elif latent == 4 and family in ("flux", "sd3"):
        family = None
    warnings = [] if family else ["VAE base model is not recorded in the file"]
    return Classification(ModelType.VAE, family=family, hints=hints, warnings=warnings)


def _classify_text_encoder(shapes: Shapes) -> Classification | None:
    clip = shapes.get("text_model.encoder.layers.0.self_attn.q_proj.weight")
    if clip is not None and len(clip) == 2:
        arch = {768: "clip-l", 1024: "clip-h", 1280: "clip-g"}.get(clip[1], "clip")
        return Classification(ModelType.TEXT_ENCODER, architecture=arch)
    open_clip = shapes.get("transformer.resblocks.0.attn.in_proj_weight")
    if open_clip is not None and len(open_clip) == 2:
        arch = {768: "clip-l", 1024: "clip-h", 1280: "clip-g"}.get(open_clip[1], "clip")
        return Classification(ModelType.TEXT_ENCODER, architecture=arch)
    t5 = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if t5 is not None and len(t5) == 2:
        return Classification(
            ModelType.TEXT_ENCODER, architecture="t5-xxl" if t5[1] == 4096 else "t5"
        )
    return None
