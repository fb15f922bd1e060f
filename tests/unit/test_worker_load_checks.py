"""The worker's load checks: catalog lookup by name, inspection, and the compatibility refusal.

`require_compatible` is tested on real (tiny or header-only) files inspected by the catalog's
inspector; the service-level tests use engines that record what reaches them, with a real
backend name (so the checks apply, as they do for llama_cpp and diffusers), and an in-memory
catalog at the catalog seam.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.catalog.compat import evaluate
from services.catalog.domain import (
    DeviceKind,
    Model,
    ModelMetadata,
    ModelSource,
    ModelState,
    SourceKind,
    Verdict,
)
from services.catalog.inspect import inspect_path
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.worker.__main__ import settings_from_args
from services.worker.devices import DeviceSpec
from services.worker.engines.base import LlmLoadOptions, LoadedModel, ProgressCallback
from services.worker.engines.fake import FakeEngine
from services.worker.engines.image_base import (
    ImageEngine,
    ImageLoadOptions,
    ImageParams,
    ImageProgressCallback,
    ImageResult,
)
from services.worker.metrics import WorkerMetrics
from services.worker.service import (
    LoadRequest,
    OptionsKind,
    WorkerInfo,
    WorkerService,
    WorkerState,
    require_compatible,
    worker_type_id,
)
from tests.fixtures.folder_models import write_diffusers_folder, write_transformers_folder
from tests.fixtures.gguf_models import (
    LLAMA3_70B,
    write_corrupt_gguf,
    write_header_only_gguf,
    write_tiny_llama_gguf,
)
from tests.fixtures.safetensors_models import write_family

pytestmark = pytest.mark.unit

REGISTRY = WorkerTypeRegistry()


def refusal(path: Path, worker_type: str) -> tuple[FailedPrecondition, list[str]]:
    """Inspect `path`, expect `worker_type` to refuse it; also the rules' own reasons."""
    metadata = inspect_path(path)
    wt = REGISTRY.get(worker_type)
    with pytest.raises(FailedPrecondition) as refused:
        require_compatible(metadata, wt, subject=path.name)
    return refused.value, evaluate(metadata, wt).reasons


# ---- the pure check --------------------------------------------------------------------------


@pytest.mark.parametrize("worker_type", ["cpu-sd", "cuda-sd", "metal-sd"])
def test_a_gguf_llm_on_an_sd_worker_type_is_incompatible(tmp_path: Path, worker_type: str) -> None:
    error, reasons = refusal(write_tiny_llama_gguf(tmp_path / "tiny.gguf"), worker_type)
    assert error.reason == "INCOMPATIBLE_MODEL"
    assert error.metadata == {"verdict": "unsupported_model_type", "worker_type": worker_type}
    assert reasons and all(reason in error.message for reason in reasons)
    assert "llm worker" in error.message and "tiny.gguf" in error.message
    assert error.violations[0].subject == f"worker-types/{worker_type}"


def test_a_safetensors_llm_folder_on_cpu_llm_is_an_unsupported_format(tmp_path: Path) -> None:
    error, reasons = refusal(write_transformers_folder(tmp_path / "llm"), "cpu-llm")
    assert error.reason == "INCOMPATIBLE_MODEL"
    assert error.metadata["verdict"] == Verdict.UNSUPPORTED_FORMAT.value
    assert reasons[0] in error.message and "GGUF" in error.message


def test_an_sd_checkpoint_on_an_llm_worker_type_is_incompatible(tmp_path: Path) -> None:
    error, reasons = refusal(write_family(tmp_path / "sd1.safetensors", "sd1"), "cuda-llm")
    assert error.metadata["verdict"] == Verdict.UNSUPPORTED_MODEL_TYPE.value
    assert reasons[0] in error.message and "sd worker" in error.message


def test_a_flux_transformer_alone_needs_components(tmp_path: Path) -> None:
    error, reasons = refusal(write_family(tmp_path / "flux.safetensors", "flux-dev"), "cpu-sd")
    assert error.metadata["verdict"] == Verdict.NEEDS_COMPONENTS.value
    assert reasons[0] in error.message
    assert "vae" in error.message and "text_encoder" in error.message


def test_runnable_models_pass_and_memory_is_not_a_refusal(tmp_path: Path) -> None:
    tiny = inspect_path(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    for worker_type in ("cpu-llm", "cuda-llm", "metal-llm"):
        result = require_compatible(tiny, REGISTRY.get(worker_type), subject="tiny")
        assert result.verdict is Verdict.COMPATIBLE
    # A 70B header on a CPU worker: runnable by type; whether it fits is not this check's call.
    huge = inspect_path(write_header_only_gguf(tmp_path / "70b.gguf", **LLAMA3_70B))
    assert require_compatible(huge, REGISTRY.get("cpu-llm"), subject="70b").verdict in (
        Verdict.COMPATIBLE,
        Verdict.CPU_ONLY,
    )
    sd1 = inspect_path(write_diffusers_folder(tmp_path / "sd1", "sd1"))
    assert require_compatible(sd1, REGISTRY.get("cpu-sd"), subject="sd1").verdict is (
        Verdict.COMPATIBLE
    )


def _unidentified_sd_folder(root: Path, *, in_channels: int = 4) -> Path:
    """An SD pipeline folder whose UNet matches no released family (like tiny test pipes)."""
    folder = write_diffusers_folder(root, "sd1", in_channels=in_channels)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 32
    config_path.write_text(json.dumps(config))
    return folder


def test_a_pipeline_folder_of_unknown_family_is_left_to_the_engine(tmp_path: Path) -> None:
    metadata = inspect_path(_unidentified_sd_folder(tmp_path / "tiny-sd"))
    assert metadata.family is None  # the rules alone would refuse it (no family)
    assert evaluate(metadata, REGISTRY.get("cpu-sd")).verdict is Verdict.UNSUPPORTED_ARCH
    result = require_compatible(metadata, REGISTRY.get("cpu-sd"), subject="tiny-sd")
    assert result.verdict is Verdict.UNSUPPORTED_ARCH  # passed on, with the verdict
    # ...but not an image-input variant, which cannot run text-to-image whatever its family.
    inpaint = inspect_path(_unidentified_sd_folder(tmp_path / "inpaint", in_channels=9))
    with pytest.raises(FailedPrecondition) as refused:
        require_compatible(inpaint, REGISTRY.get("cpu-sd"), subject="inpaint")
    assert refused.value.reason == "INCOMPATIBLE_MODEL" and "inpaint" in refused.value.message


def test_worker_type_ids() -> None:
    assert worker_type_id(DeviceKind.CPU, image=False) == "cpu-llm"
    assert worker_type_id(DeviceKind.CUDA, image=True) == "cuda-sd"
    assert worker_type_id(DeviceKind.METAL, image=False) == "metal-llm"
    for kind in DeviceKind:
        for image in (False, True):
            REGISTRY.get(worker_type_id(kind, image=image))  # every one exists


# ---- the service -----------------------------------------------------------------------------


class RecordingLlama(FakeEngine):
    """A FakeEngine that says it is llama_cpp, so the worker applies the real checks."""

    backend = "llama_cpp"

    def __init__(self) -> None:
        super().__init__()
        self.loaded_paths: list[Path] = []

    def load(self, path: Path, options: LlmLoadOptions, **kwargs: Any) -> LoadedModel:
        self.loaded_paths.append(path)
        return super().load(path, options, **kwargs)


class RecordingDiffusers(ImageEngine):
    """An image engine that records loads and generates nothing (load checks only)."""

    backend = "diffusers"

    def __init__(self) -> None:
        self.loaded_paths: list[Path] = []
        self._loaded: LoadedModel | None = None

    def load(
        self,
        path: Path,
        options: ImageLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        self.loaded_paths.append(path)
        self._loaded = LoadedModel(path=str(path), name="recorded")
        return self._loaded

    def unload(self) -> None:
        self._loaded = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def check_params(self, params: ImageParams) -> None:
        return None

    def generate(
        self,
        params: ImageParams,
        *,
        on_progress: ImageProgressCallback,
        cancel: threading.Event,
    ) -> ImageResult:
        raise NotImplementedError("load checks only")


class MemoryCatalog:
    """The catalog seam: models by name, and the names asked for."""

    def __init__(self, *models: Model) -> None:
        self.models = {model.name: model for model in models}
        self.asked: list[str] = []

    async def get_model(self, name: str) -> Model | None:
        self.asked.append(name)
        return self.models.get(name)


def catalog_model(
    model_id: str,
    paths: list[Path],
    *,
    state: ModelState = ModelState.READY,
    message: str = "",
    metadata: ModelMetadata | None = None,
) -> Model:
    now = datetime.now(UTC)
    return Model(
        id=model_id,
        source=ModelSource(kind=SourceKind.LOCAL, path=str(paths[0]) if paths else None),
        paths=[str(p) for p in paths],
        state=state,
        state_message=message,
        metadata=metadata,
        created_at=now,
        updated_at=now,
    )


def make_service(
    engine: FakeEngine | ImageEngine, catalog: MemoryCatalog | None = None
) -> WorkerService:
    return WorkerService(
        engine,
        device=DeviceSpec(kind=DeviceKind.CPU),
        engine_name=engine.backend,
        queue_size=2,
        metrics=WorkerMetrics(CollectorRegistry()),
        catalog=catalog,
    )


async def load(service: WorkerService, request: LoadRequest) -> WorkerInfo:
    events = [event async for event in service.load_model(request)]
    assert isinstance(events[-1], WorkerInfo)
    return events[-1]


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_llama_gguf(tmp_path / "tiny.gguf")


async def test_load_by_catalog_name_uses_its_paths_and_reports_its_name(tiny_gguf: Path) -> None:
    catalog = MemoryCatalog(catalog_model("tiny", [tiny_gguf]))
    engine = RecordingLlama()
    service = make_service(engine, catalog)
    info = await load(service, LoadRequest(model="tiny", options_kind=OptionsKind.LLM))
    assert catalog.asked == ["models/tiny"]
    assert engine.loaded_paths == [tiny_gguf]
    assert info.state is WorkerState.READY and info.model == "models/tiny"
    assert info.loaded is not None and info.loaded.paths == [str(tiny_gguf)]
    assert info.worker_type == "cpu-llm"


async def test_paths_win_over_the_catalog(tiny_gguf: Path, tmp_path: Path) -> None:
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    catalog = MemoryCatalog(catalog_model("tiny", [other]))
    engine = RecordingLlama()
    service = make_service(engine, catalog)
    info = await load(service, LoadRequest(model="models/tiny", paths=[str(tiny_gguf)]))
    assert catalog.asked == [] and engine.loaded_paths == [tiny_gguf]
    assert info.model == "models/tiny"


async def test_catalog_lookup_errors(tiny_gguf: Path) -> None:
    catalog = MemoryCatalog(
        catalog_model("pulling", [tiny_gguf], state=ModelState.DOWNLOADING, message="41% done"),
        catalog_model("broken", [tiny_gguf], state=ModelState.FAILED, message="hash mismatch"),
        catalog_model("elsewhere", [Path("/nonexistent/rbee/model.gguf")]),
    )
    engine = RecordingLlama()
    service = make_service(engine, catalog)
    with pytest.raises(NotFound) as unknown:
        await load(service, LoadRequest(model="models/nope"))
    assert unknown.value.reason == "MODEL_NOT_FOUND"
    assert unknown.value.resource_name == "models/nope"
    for name, state, note in (("pulling", "downloading", "41% done"), ("broken", "failed", "hash")):
        with pytest.raises(FailedPrecondition) as not_ready:
            await load(service, LoadRequest(model=name))
        assert not_ready.value.reason == "MODEL_NOT_READY"
        assert state in not_ready.value.message and note in not_ready.value.message
        assert not_ready.value.metadata["state"] == state
    with pytest.raises(NotFound) as missing:
        await load(service, LoadRequest(model="elsewhere"))
    assert missing.value.reason == "FILE_NOT_FOUND"
    assert engine.loaded_paths == [] and service.state is WorkerState.IDLE


async def test_without_a_catalog_a_name_alone_names_the_setting() -> None:
    service = make_service(RecordingLlama(), None)
    with pytest.raises(FailedPrecondition) as refused:
        await load(service, LoadRequest(model="models/tiny"))
    assert "RBEE_WORKER_CATALOG_ADDRESS" in refused.value.message
    assert "paths are required" in refused.value.message
    with pytest.raises(InvalidArgument):
        await load(service, LoadRequest())


async def test_an_llm_worker_refuses_an_sd_checkpoint_before_the_engine(tmp_path: Path) -> None:
    checkpoint = write_family(tmp_path / "sd1.safetensors", "sd1")
    catalog = MemoryCatalog(catalog_model("sd1", [checkpoint]))
    engine = RecordingLlama()
    service = make_service(engine, catalog)
    for request in (LoadRequest(paths=[str(checkpoint)]), LoadRequest(model="sd1")):
        with pytest.raises(FailedPrecondition) as refused:
            await load(service, request)
        assert refused.value.reason == "INCOMPATIBLE_MODEL"
        assert "cpu-llm cannot run" in refused.value.message
    assert "models/sd1" in refused.value.message  # a catalog load names the model
    assert engine.loaded_paths == [] and service.state is WorkerState.IDLE


async def test_an_sd_worker_refuses_a_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    engine = RecordingDiffusers()
    service = make_service(engine)
    assert service.get_worker().worker_type == "cpu-sd"
    with pytest.raises(FailedPrecondition) as refused:
        await load(service, LoadRequest(paths=[str(tiny_gguf)], options_kind=OptionsKind.IMAGE))
    assert refused.value.reason == "INCOMPATIBLE_MODEL"
    assert "llm worker" in refused.value.message
    folder = write_diffusers_folder(tmp_path / "sd1", "sd1")
    info = await load(service, LoadRequest(model="models/sd1", paths=[str(folder)]))
    assert engine.loaded_paths == [folder] and info.model == "models/sd1"


async def test_files_that_are_no_model_are_invalid_arguments(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    corrupt = write_corrupt_gguf(tmp_path / "corrupt.gguf", "huge_kv_count")
    service = make_service(RecordingLlama())
    with pytest.raises(InvalidArgument) as unsupported:
        await load(service, LoadRequest(paths=[str(text)]))
    assert unsupported.value.reason == "UNSUPPORTED_FILE_FORMAT"
    with pytest.raises(InvalidArgument) as invalid:
        await load(service, LoadRequest(paths=[str(corrupt)]))
    assert invalid.value.reason == "MODEL_FILE_INVALID"


async def test_a_too_large_model_is_not_refused_by_the_checks(tmp_path: Path) -> None:
    huge = write_header_only_gguf(tmp_path / "70b.gguf", **LLAMA3_70B)
    engine = RecordingLlama()
    await load(make_service(engine), LoadRequest(paths=[str(huge)]))
    assert engine.loaded_paths == [huge]  # the engine decides whether it fits


async def test_the_fake_engine_skips_inspection(tmp_path: Path) -> None:
    placeholder = tmp_path / "placeholder.gguf"
    placeholder.write_bytes(b"GGUF" + bytes(60))  # what the protocol tests load
    info = await load(make_service(FakeEngine()), LoadRequest(paths=[str(placeholder)]))
    assert info.state is WorkerState.READY


# ---- settings --------------------------------------------------------------------------------


def test_the_catalog_address_setting_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_WORKER_CATALOG_ADDRESS", raising=False)
    assert settings_from_args([]).catalog_address == "127.0.0.1:50061"
    monkeypatch.setenv("RBEE_WORKER_CATALOG_ADDRESS", "10.0.0.5:7000")
    assert settings_from_args([]).catalog_address == "10.0.0.5:7000"
    assert settings_from_args(["--catalog", "127.0.0.1:9"]).catalog_address == "127.0.0.1:9"
    assert settings_from_args(["--catalog", ""]).catalog_address == ""  # no catalog
