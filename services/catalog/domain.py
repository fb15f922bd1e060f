"""The catalog's domain types: plain pydantic models, no grpc, no protobuf.

`convert.py` is the only place that maps these to and from `rbee.catalog.v1` messages.
"""

from __future__ import annotations

import enum
import json
import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

# AIP-122 style resource ids: lower-case letters, digits and hyphens, 1..63 chars, starting
# with a letter or digit and not ending with a hyphen. Never a raw path, so never joined raw.
ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class ModelFormat(enum.StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"
    DIFFUSERS = "diffusers"


class ModelType(enum.StrEnum):
    LLM = "llm"
    IMAGE = "image"
    LORA = "lora"
    ADAPTER = "adapter"  # a GGUF LoRA adapter for an LLM (general.type = adapter)
    PROJECTOR = "projector"  # a multimodal projector (mmproj, general.architecture = clip)
    VAE = "vae"
    CONTROLNET = "controlnet"
    TEXT_ENCODER = "text_encoder"
    EMBEDDING = "embedding"  # textual inversion embeddings
    UNKNOWN = "unknown"


class SplitInfo(BaseModel):
    """Split GGUF: this file is shard `index` (1-based) of `count`."""

    model_config = ConfigDict(frozen=True)

    index: int
    count: int
    files_found: int = Field(description="how many shards of the set exist beside this one")
    tensors_total: int | None = None


class WeightsBreakdown(BaseModel):
    """Where the weight bytes live, for the memory estimate (GGUF only; others: total only).

    `layer_bytes[i]` is the sum of the `blk.{i}.*` tensors; `input_bytes` the token embedding
    (always host RAM in llama.cpp); `output_bytes` the output head and final norm; `other_bytes`
    everything else.
    """

    model_config = ConfigDict(frozen=True)

    total_bytes: int
    input_bytes: int = 0
    output_bytes: int = 0
    other_bytes: int = 0
    layer_bytes: list[int] = Field(default_factory=list)


class ModelMetadata(BaseModel):
    """What inspection found in a model file or folder. Absent values are None."""

    model_config = ConfigDict(frozen=True)

    format: ModelFormat
    model_type: ModelType
    name: str | None = None
    architecture: str | None = None
    # Image families: sd1, sd2, sdxl, sdxl-refiner, sd3, sd3.5-medium, sd3.5-large, flux-dev,
    # flux-schnell, flux2, playground-v2.5, ...; for LoRAs/VAEs/ControlNets: the base family.
    family: str | None = None
    variant: str | None = None  # inpaint, instruct-pix2pix, depth, fill, ...
    quantization: str | None = None  # Q4_K_M, Q8_0, F16, BF16, ... (GGUF) / dominant dtype
    file_type: int | None = None  # raw general.file_type
    parameter_count: int | None = None
    context_length: int | None = None
    block_count: int | None = None
    embedding_length: int | None = None
    feed_forward_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None  # max over layers when the file stores an array
    key_length: int | None = None
    value_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    vocab_size: int | None = None
    sliding_window: int | None = None
    tokenizer_model: str | None = None
    has_chat_template: bool | None = None
    kv_cache_bytes_per_token: int | None = None  # f16 K+V over all layers
    needs_components: list[str] = Field(default_factory=list)  # e.g. ["text_encoder", "vae"]
    dtypes: dict[str, int] = Field(default_factory=dict)  # dtype -> tensor count
    tensor_count: int | None = None
    split: SplitInfo | None = None
    weights: WeightsBreakdown | None = None
    size_bytes: int = 0  # all files of the model
    hints: dict[str, str] = Field(default_factory=dict)  # bounded metadata hints (modelspec...)
    warnings: list[str] = Field(default_factory=list)


class SourceKind(enum.StrEnum):
    HUGGINGFACE = "huggingface"
    CIVITAI = "civitai"
    URL = "url"
    LOCAL = "local"


class ModelSource(BaseModel):
    """Where a model came from. Coordinates are fields, never folded into the id."""

    model_config = ConfigDict(frozen=True)

    kind: SourceKind
    repo: str | None = None  # huggingface: org/name
    revision: str | None = None  # huggingface: branch, tag or commit
    commit: str | None = None  # huggingface: resolved commit sha
    files: list[str] = Field(default_factory=list)  # huggingface: files within the repo
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    base_model: str | None = None  # civitai baseModel (a family hint, checked by inspection)
    url: str | None = None
    path: str | None = None  # local: what the user gave

    def canonical(self) -> str:
        """A stable string identifying the source; two different sources never share it."""
        # JSON, not a joined string: a separator inside a value (a file named "a,b") must not
        # make two different sources share a key.
        return json.dumps(
            [
                self.kind.value,
                self.repo,
                self.revision,
                sorted(self.files),
                self.civitai_version_id,
                self.url,
                self.path,
            ],
            separators=(",", ":"),
            ensure_ascii=False,
        )


class ModelState(enum.StrEnum):
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


class Model(BaseModel):
    """A model known to the catalog: `models/{id}`."""

    id: str
    display_name: str = ""
    source: ModelSource
    paths: list[str] = Field(default_factory=list)  # absolute paths of the model's files/folder
    size_bytes: int = 0
    sha256: str | None = None  # of the single file, when known
    state: ModelState = ModelState.READY
    state_message: str = ""  # why FAILED, or a note while DOWNLOADING
    metadata: ModelMetadata | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    etag: str = ""
    # A single-file image checkpoint's config folder (absolute: a local diffusers folder of
    # configs and tokenizers the file loads with, e.g. its family's config repo snapshot that the
    # provisioner fetched); "" when none is recorded.
    config_folder: str = ""

    @property
    def name(self) -> str:
        return f"models/{self.id}"


class DeviceKind(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    METAL = "metal"


class Backend(enum.StrEnum):
    LLAMA_CPP = "llama_cpp"
    DIFFUSERS = "diffusers"


class WorkerType(BaseModel):
    """One of the six worker types (`worker-types/{id}`): what a worker backend can run."""

    model_config = ConfigDict(frozen=True)

    id: str  # cpu-llm, cuda-llm, metal-llm, cpu-sd, cuda-sd, metal-sd
    display_name: str
    description: str
    backend: Backend
    device_kind: DeviceKind
    platforms: list[str]  # linux, macos, windows
    cpu_architectures: list[str]  # x86_64, aarch64
    formats: list[ModelFormat]
    model_types: list[ModelType]
    # Loaded on top of a base model, never alone (LoRA, GGUF adapter, mmproj projector).
    addon_model_types: list[ModelType] = Field(default_factory=list)
    families: list[str] = Field(default_factory=list)  # image families (sd workers)
    llm_architectures: list[str] = Field(default_factory=list)  # llm workers
    llm_architectures_source: str = ""  # e.g. "llama-cpp-python 0.3.36 (installed)"
    quantizations: list[str] = Field(default_factory=list)
    max_context_length: int | None = None
    streaming: bool = True
    batching: bool = False

    @property
    def name(self) -> str:
        return f"worker-types/{self.id}"


class Install(BaseModel):
    """An installed worker backend: `installs/{id}` (filled by the provisioner)."""

    id: str
    worker_type: str  # worker type id
    version: str = ""
    path: str = ""
    backend_version: str = ""  # e.g. llama-cpp-python 0.3.36
    python_version: str = ""
    platform: str = ""
    cpu_architecture: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return f"installs/{self.id}"


class Device(BaseModel):
    """A device to evaluate against. Memory in bytes; None when unknown."""

    model_config = ConfigDict(frozen=True)

    kind: DeviceKind
    name: str = ""
    total_ram_bytes: int | None = None
    free_ram_bytes: int | None = None
    total_vram_bytes: int | None = None
    free_vram_bytes: int | None = None
    unified_memory: bool = False  # Apple silicon: one pool


class KvCacheType(enum.StrEnum):
    F16 = "f16"
    BF16 = "bf16"
    F32 = "f32"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    IQ4_NL = "iq4_nl"


class Verdict(enum.StrEnum):
    COMPATIBLE = "compatible"
    UNSUPPORTED_FORMAT = "unsupported_format"
    UNSUPPORTED_ARCH = "unsupported_arch"
    UNSUPPORTED_MODEL_TYPE = "unsupported_model_type"
    UNSUPPORTED_DEVICE = "unsupported_device"  # the device kind is not this worker type's
    NEEDS_COMPONENTS = "needs_components"
    FITS_GPU = "fits_gpu"
    PARTIAL_OFFLOAD = "partial_offload"
    CPU_ONLY = "cpu_only"
    TOO_LARGE = "too_large"


class MemoryEstimate(BaseModel):
    """The numbers behind a verdict, in bytes, for the context actually used."""

    model_config = ConfigDict(frozen=True)

    context_length: int = 0
    kv_cache_type: KvCacheType = KvCacheType.F16
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    compute_bytes: int = 0
    ram_bytes: int = 0  # needed in host RAM with the chosen offload
    vram_bytes: int = 0  # needed in device memory with the chosen offload
    gpu_layers: int = 0  # layers offloaded (llm)
    total_layers: int = 0  # block_count (+1 for the output layer, as llama.cpp counts)
    available_ram_bytes: int | None = None
    available_vram_bytes: int | None = None


class CompatibilityResult(BaseModel):
    """One (model, worker type[, device]) answer."""

    model_config = ConfigDict(frozen=True)

    worker_type: str
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    memory: MemoryEstimate | None = None

    @property
    def runnable(self) -> bool:
        return self.verdict in {
            Verdict.COMPATIBLE,
            Verdict.FITS_GPU,
            Verdict.PARTIAL_OFFLOAD,
            Verdict.CPU_ONLY,
        }
