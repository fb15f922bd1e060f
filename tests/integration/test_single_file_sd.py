"""Single-file Stable Diffusion checkpoints (the ldm layout CivitAI serves) on the image worker.

The tiny SD1 pipeline (tests/fixtures/sd_single_file.py) is written once as a diffusers folder
and once as ONE ldm-layout .safetensors file. The real DiffusersEngine loads the file with
`from_single_file` and the folder's configs (given as image.config, or found as the sd1 config
repo in an HF cache holding only the config files), and must give the same image as the folder
for the same seed, steps and size; without configs the load fails saying what to fetch. Then the
same through a gRPC worker, and pulled by the provisioner then loaded by catalog name, also by a
worker whose HF cache is not the provisioner's (the catalog records the config folder).

Then SD2 and SDXL (tiny pipelines shaped so the catalog and diffusers name their families): the
single file gives the folder's image with the folder as image.config and with a configs-only HF
cache under the family's repo; SD2's prediction type is the config's unless the file's ModelSpec
header declares another; a pulled SDXL file brings both text encoders' configs.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from PIL import Image
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.provisioner.v1 import provisioner_pb2 as ppb
from rbee.worker.v1 import image_pb2, load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from services.catalog.domain import DeviceKind
from services.catalog.inspect import inspect_path
from services.catalog.link import GrpcCatalogLink
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.server import RunningServer, ServiceBinding, start_server
from services.worker.devices import DeviceSpec
from services.worker.engines.diffusers_engine import (
    DiffusersEngine,
    declared_prediction_type,
    missing_config_files,
)
from services.worker.engines.image_base import (
    SINGLE_FILE_CONFIG_REPOS,
    ImageLoadOptions,
    ImageParams,
)
from services.worker.metrics import WorkerMetrics
from services.worker.service import WorkerService
from services.worker.servicer import SERVICE_NAME, WorkerServicer
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.sd_single_file import (
    _component_state,
    config_files,
    ldm_state_dict,
    write_config_repo_cache,
    write_ldm_single_file,
    write_tiny_sd1_pipeline,
    write_tiny_sd1_single_file,
)
from tests.integration.provisioner_harness import Mesh
from tests.integration.server_harness import error_reason, serve_in_thread, serve_worker

pytestmark = [pytest.mark.integration, pytest.mark.sd, pytest.mark.slow]

SD1_REPO = SINGLE_FILE_CONFIG_REPOS["sd1"]
STEPS = 3
RPC_TIMEOUT = 30
PARAMS: dict[str, Any] = {
    "prompt": "a red cube",
    "steps": STEPS,
    "width": 64,
    "height": 64,
    "seed": 7,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread (see DiffusersEngine), restored afterwards: the setting is global."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd1_pipeline(tmp_path_factory.mktemp("sd1") / "tiny-sd1")


@pytest.fixture(scope="module")
def sd1_file(sd1_folder: Path) -> Path:
    return write_tiny_sd1_single_file(sd1_folder, sd1_folder.parent / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def hf_cache(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF cache holding the sd1 config repo: the tiny pipeline's config files only."""
    cache = tmp_path_factory.mktemp("hf-cache")
    write_config_repo_cache(sd1_folder, cache, SD1_REPO)
    return cache


@pytest.fixture(scope="module")
def folder_image(sd1_folder: Path) -> np.ndarray:
    """The folder's image for PARAMS: what every single-file load must reproduce."""
    engine = DiffusersEngine("cpu", threads=1)
    load(engine, sd1_folder)
    return generate(engine)


def no_progress(_fraction: float, _message: str) -> None:
    return None


def load(engine: DiffusersEngine, path: Path, **options: Any) -> None:
    engine.load(
        path,
        ImageLoadOptions(dtype="float32", **options),
        progress=no_progress,
        cancel=threading.Event(),
    )


def generate(engine: DiffusersEngine) -> np.ndarray:
    result = engine.generate(
        ImageParams.model_validate(PARAMS), on_progress=lambda _e: None, cancel=threading.Event()
    )
    return np.asarray(Image.open(io.BytesIO(result.images[0].png)))


# ---- the fixture itself ----------------------------------------------------------------------


def test_the_fixture_is_an_ldm_sd1_checkpoint_diffusers_converts_back_exactly(
    sd1_folder: Path, sd1_file: Path
) -> None:
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    checkpoint = ldm_state_dict(sd1_folder)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in checkpoint)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv
    configs = {c: json.loads((sd1_folder / c / "config.json").read_text()) for c in ("unet", "vae")}
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),  # type: ignore[no-untyped-call]
        "vae": convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),  # type: ignore[no-untyped-call]
        "text_encoder": {
            k.removeprefix("text_model."): v
            for k, v in convert_ldm_clip_checkpoint(checkpoint).items()  # type: ignore[no-untyped-call]
        },
    }
    for component, state in converted.items():
        original = _component_state(sd1_folder / component)
        assert state.keys() == original.keys(), component
        assert all(torch.equal(state[k], original[k]) for k in original), component
    metadata = inspect_path(sd1_file)
    assert metadata.family == "sd1" and metadata.needs_components == []


# ---- the engine ------------------------------------------------------------------------------


def test_single_file_with_a_config_folder_gives_the_folders_image(
    sd1_file: Path, sd1_folder: Path, folder_image: np.ndarray, tmp_path: Path
) -> None:
    engine = DiffusersEngine("cpu", threads=1, hf_cache=tmp_path)  # an empty cache: not used
    load(engine, sd1_file, config=str(sd1_folder))
    assert engine.loaded is not None
    assert engine.loaded.name == "StableDiffusionPipeline"
    assert engine.loaded.path == str(sd1_file)
    assert np.array_equal(generate(engine), folder_image)


def test_single_file_finds_its_family_configs_in_the_hf_cache(
    sd1_file: Path, hf_cache: Path, folder_image: np.ndarray
) -> None:
    snapshot = next((hf_cache / f"models--{SD1_REPO.replace('/', '--')}" / "snapshots").iterdir())
    assert not list(snapshot.rglob("*.safetensors"))  # configs only: no weights
    engine = DiffusersEngine("cpu", threads=1, hf_cache=hf_cache)
    load(engine, sd1_file)  # family from inspection: sd1
    assert np.array_equal(generate(engine), folder_image)
    load(engine, sd1_file, family="sd1")  # the same, said explicitly
    assert engine.loaded is not None and engine.loaded.name == "StableDiffusionPipeline"


def test_missing_configs_say_which_repo_and_how_to_fetch_it(
    sd1_file: Path, sd1_folder: Path, tmp_path: Path
) -> None:
    empty_cache = tmp_path / "empty-cache"
    engine = DiffusersEngine("cpu", threads=1, hf_cache=empty_cache)
    with pytest.raises(FailedPrecondition) as missing:
        load(engine, sd1_file)
    error = missing.value
    assert error.reason == "FAILED_PRECONDITION"
    assert SD1_REPO in str(error) and str(empty_cache) in str(error)
    assert f"hf download {SD1_REPO}" in str(error) and "image.config" in str(error)
    assert [v.subject for v in error.violations] == [f"hf:{SD1_REPO}"]
    assert error.metadata == {"family": "sd1", "config_repo": SD1_REPO}
    assert engine.loaded is None

    # A cached repo without its tokenizer: the message lists what is missing.
    partial = tmp_path / "partial-cache"
    snapshot = write_config_repo_cache(sd1_folder, partial, SD1_REPO)
    for file in (snapshot / "tokenizer").iterdir():
        file.unlink()
    assert missing_config_files(snapshot) == ["tokenizer/"]
    with pytest.raises(FailedPrecondition, match=r"lacks tokenizer/"):
        load(DiffusersEngine("cpu", threads=1, hf_cache=partial), sd1_file)


def test_bad_single_file_options(sd1_file: Path, sd1_folder: Path, tmp_path: Path) -> None:
    engine = DiffusersEngine("cpu", threads=1, hf_cache=tmp_path)
    with pytest.raises(InvalidArgument, match=r"image\.config"):
        load(engine, sd1_file, config="relative/folder")
    with pytest.raises(FailedPrecondition, match=r"lacks model_index\.json"):
        load(engine, sd1_file, config=str(tmp_path))
    with pytest.raises(FailedPrecondition, match="knows no config repo for sd9") as unknown:
        load(engine, sd1_file, family="sd9")
    assert unknown.value.reason == "INCOMPATIBLE_MODEL"
    # Configs of another shape than the file: diffusers' conversion fails, reported as such.
    other = tmp_path / "other"
    for relative in config_files(sd1_folder):
        (other / relative).parent.mkdir(parents=True, exist_ok=True)
        (other / relative).write_bytes((sd1_folder / relative).read_bytes())
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [16, 32]
    (other / "unet" / "config.json").write_text(json.dumps(unet_config))
    with pytest.raises(FailedPrecondition, match=r"cannot load tiny-sd1\.safetensors") as shapes:
        load(engine, sd1_file, config=str(other))
    assert shapes.value.reason == "MODEL_FILE_INVALID"
    assert engine.loaded is None


# ---- through a gRPC worker -------------------------------------------------------------------


def imagine(stub: worker_pb2_grpc.WorkerServiceStub) -> np.ndarray:
    request = image_pb2.GenerateImageRequest(params=image_pb2.ImageParams(**PARAMS))
    results = [
        message.result
        for message in stub.GenerateImage(request, timeout=RPC_TIMEOUT)
        if message.WhichOneof("event") == "result"
    ]
    assert len(results) == 1
    return np.asarray(Image.open(io.BytesIO(results[0].images[0].data)))


def test_a_grpc_worker_loads_the_single_file_and_generates(
    sd1_file: Path, sd1_folder: Path, hf_cache: Path, folder_image: np.ndarray, tmp_path: Path
) -> None:
    engine = DiffusersEngine("cpu", threads=1, hf_cache=hf_cache)
    with (
        serve_worker(engine, engine_name="diffusers", metrics_listen=None) as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        image = load_pb2.ImageLoadOptions(dtype="float32")
        responses = list(
            stub.LoadModel(
                pb.LoadModelRequest(paths=[str(sd1_file)], image=image), timeout=RPC_TIMEOUT
            )
        )
        worker = responses[-1].worker
        assert worker.state == pb.WORKER_STATE_READY
        assert worker.loaded_model.image.family == "sd1"  # inspection's, handed to the engine
        assert np.array_equal(imagine(stub), folder_image)

        # image.config over the wire: the folder's configs, the same image.
        with_config = load_pb2.ImageLoadOptions(dtype="float32", config=str(sd1_folder))
        list(
            stub.LoadModel(
                pb.LoadModelRequest(paths=[str(sd1_file)], image=with_config),
                timeout=RPC_TIMEOUT,
            )
        )
        assert np.array_equal(imagine(stub), folder_image)

    # A worker whose HF cache lacks the configs refuses the load with the reason.
    bare = DiffusersEngine("cpu", threads=1, hf_cache=tmp_path / "empty")
    with (
        serve_worker(bare, engine_name="diffusers", metrics_listen=None) as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(
                stub.LoadModel(
                    pb.LoadModelRequest(paths=[str(sd1_file)], image=image), timeout=RPC_TIMEOUT
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "FAILED_PRECONDITION"
        assert f"hf download {SD1_REPO}" in (refused.value.details() or "")


# ---- pulled by the provisioner, loaded by catalog name ---------------------------------------


@contextmanager
def worker_with_catalog(
    engine: DiffusersEngine, catalog_address: str
) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    """An image WorkerService with a GrpcCatalogLink, served on 127.0.0.1:0."""

    async def build() -> tuple[RunningServer, None]:
        catalog = GrpcCatalogLink(catalog_address, deadline=5.0)
        service = WorkerService(
            engine,
            device=DeviceSpec(kind=DeviceKind.CPU),
            engine_name="diffusers",
            queue_size=2,
            metrics=WorkerMetrics(CollectorRegistry()),
            catalog=catalog,
        )
        running = await start_server(
            [
                ServiceBinding(
                    worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                    WorkerServicer(service),
                    SERVICE_NAME,
                )
            ],
            listen="127.0.0.1:0",
            metrics_listen=None,
            registry=CollectorRegistry(),
        )
        running.on_stop(catalog.close)
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    with (
        serve_in_thread(build, name="single-file-catalog-worker") as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def test_a_pulled_single_file_brings_its_configs_and_loads_by_name(
    mesh: Mesh, hub: FakeHub, sd1_file: Path, sd1_folder: Path, folder_image: np.ndarray
) -> None:
    from huggingface_hub import try_to_load_from_cache

    configs = {str(r): sd1_folder / r for r in config_files(sd1_folder)}
    weights = sd1_folder / "unet" / "diffusion_pytorch_model.safetensors"
    hub.add_repo(SD1_REPO, {**configs, "unet/diffusion_pytorch_model.safetensors": weights})
    hub.add_repo("civit/tiny-sd1", {"tiny-sd1.safetensors": sd1_file})

    stream = mesh.provisioner.PullModel(
        ppb.PullModelRequest(source="hf:civit/tiny-sd1:tiny-sd1.safetensors"), timeout=60
    )
    messages = [m.progress.message for m in stream if m.HasField("progress")]
    assert any(f"fetching the sd1 configs from {SD1_REPO}" in m for m in messages)
    assert any(f"{len(configs)}/{len(configs)}" in m for m in messages)  # every file reported
    models = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
    model = next(m for m in models if m.source.repo == "civit/tiny-sd1")
    assert model.state == cpb.MODEL_STATE_READY and model.metadata.family == "sd1"

    index = try_to_load_from_cache(SD1_REPO, "model_index.json", cache_dir=mesh.hf_cache)
    assert isinstance(index, str)
    snapshot = Path(index).parent
    assert sorted(str(p) for p in config_files(snapshot)) == sorted(configs)
    assert not list(snapshot.rglob("*.safetensors"))  # never the config repo's weights

    engine = DiffusersEngine("cpu", threads=1, hf_cache=mesh.hf_cache)
    with worker_with_catalog(engine, mesh.catalog_address) as stub:
        image = load_pb2.ImageLoadOptions(dtype="float32")
        responses = list(
            stub.LoadModel(pb.LoadModelRequest(model=model.name, image=image), timeout=RPC_TIMEOUT)
        )
        assert responses[-1].worker.state == pb.WORKER_STATE_READY
        assert responses[-1].worker.model == model.name
        assert np.array_equal(imagine(stub), folder_image)


def test_a_pulled_single_file_loads_by_name_in_a_worker_whose_hf_cache_is_another(
    mesh: Mesh,
    hub: FakeHub,
    sd1_file: Path,
    sd1_folder: Path,
    folder_image: np.ndarray,
    tmp_path: Path,
) -> None:
    """The provisioner's HF cache (RBEE_PROVISIONER_HF_CACHE) is not the worker's: the catalog
    records the config folder the provisioner fetched (Model.config_folder), and a worker whose
    own cache is empty loads the model by name with it. A re-pull records a lost folder again;
    a recorded folder that is gone, with an empty cache, is refused naming both folders."""
    configs = {str(r): sd1_folder / r for r in config_files(sd1_folder)}
    hub.add_repo(SD1_REPO, configs)
    hub.add_repo("civit/tiny-sd1", {"tiny-sd1.safetensors": sd1_file})
    source = "hf:civit/tiny-sd1:tiny-sd1.safetensors"

    def pull() -> cpb.Model:
        stream = mesh.provisioner.PullModel(ppb.PullModelRequest(source=source), timeout=60)
        results: list[cpb.Model] = [m.model for m in stream if m.HasField("model")]
        assert len(results) == 1
        return results[0]

    model = pull()
    assert model.state == cpb.MODEL_STATE_READY and model.metadata.family == "sd1"
    recorded = Path(model.config_folder)
    assert recorded.is_absolute() and recorded.is_relative_to(mesh.hf_cache)
    assert sorted(str(p) for p in config_files(recorded)) == sorted(configs)
    assert mesh.catalog.GetModel(cpb.GetModelRequest(name=model.name), timeout=10) == model

    worker_cache = tmp_path / "worker-hf-cache"
    worker_cache.mkdir()
    engine = DiffusersEngine("cpu", threads=1, hf_cache=worker_cache)
    image = load_pb2.ImageLoadOptions(dtype="float32")
    by_name = pb.LoadModelRequest(model=model.name, image=image)
    with worker_with_catalog(engine, mesh.catalog_address) as stub:
        responses = list(stub.LoadModel(by_name, timeout=RPC_TIMEOUT))
        assert responses[-1].worker.state == pb.WORKER_STATE_READY
        assert responses[-1].worker.model == model.name
        assert np.array_equal(imagine(stub), folder_image)
    assert list(worker_cache.iterdir()) == []  # nothing fetched into the worker's cache

    # A model READY without a recorded folder (e.g. pulled before there was one): pulling it
    # again fetches nothing new but records the folder.
    cleared = mesh.catalog.UpdateModel(
        cpb.UpdateModelRequest(
            model=cpb.Model(name=model.name, config_folder=""),
            update_mask=field_mask_pb2.FieldMask(paths=["config_folder"]),
        ),
        timeout=10,
    )
    assert cleared.config_folder == ""
    assert pull().config_folder == str(recorded)

    # The recorded folder gone and the worker's cache empty: refused, naming both.
    recorded.rename(recorded.with_name("moved-away"))
    with (
        worker_with_catalog(engine, mesh.catalog_address) as stub,
        pytest.raises(grpc.RpcError) as refused,
    ):
        list(stub.LoadModel(by_name, timeout=RPC_TIMEOUT))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert str(recorded) in details and "does not exist" in details
    assert str(worker_cache) in details and f"hf download {SD1_REPO}" in details


# ---- SD2 and SDXL ----------------------------------------------------------------------------
# The same checks on an SD2-shaped and an SDXL-shaped tiny pipeline (tests/fixtures/sd_models.py),
# each built once per module: diffusers converts their ldm copies back exactly, the catalog and
# diffusers both name the family, and the engine gives the folder's image from the single file
# with the folder as image.config and with a configs-only HF cache under the family's repo.

# family -> (pipeline class, diffusers' model type for the ldm file)
FAMILIES = {
    "sd2": ("StableDiffusionPipeline", "v2"),
    "sdxl": ("StableDiffusionXLPipeline", "xl_base"),
}


class FamilyCase:
    """One family's tiny pipeline: the folder, its single file, a configs-only HF cache, and
    the folder's image for PARAMS."""

    def __init__(self, family: str, base: Path) -> None:
        from tests.fixtures.sd_models import write_tiny_sd2_pipeline, write_tiny_sdxl_pipeline

        writer = write_tiny_sd2_pipeline if family == "sd2" else write_tiny_sdxl_pipeline
        self.family = family
        self.pipeline_class, self.diffusers_type = FAMILIES[family]
        self.repo = SINGLE_FILE_CONFIG_REPOS[family]
        self.folder = writer(base / f"tiny-{family}")
        self.file = write_ldm_single_file(self.folder, base / f"tiny-{family}.safetensors")
        self.hf_cache = base / "hf-cache"
        write_config_repo_cache(self.folder, self.hf_cache, self.repo)
        engine = DiffusersEngine("cpu", threads=1)
        load(engine, self.folder)
        self.folder_image = generate(engine)
        self.folder_scheduler = dict(engine_pipe(engine).scheduler.config)


def engine_pipe(engine: DiffusersEngine) -> Any:
    """The engine's loaded diffusers pipeline (what the tests compare configs on)."""
    return engine._pipe


class FamilyCases:
    """Each family's FamilyCase, built on first use and kept for the module."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._cases: dict[str, FamilyCase] = {}

    def get(self, family: str) -> FamilyCase:
        if family not in self._cases:
            self._cases[family] = FamilyCase(family, self._factory.mktemp(family))
        return self._cases[family]


@pytest.fixture(scope="module")
def family_cases(tmp_path_factory: pytest.TempPathFactory) -> FamilyCases:
    return FamilyCases(tmp_path_factory)


@pytest.fixture(params=sorted(FAMILIES))
def case(request: pytest.FixtureRequest, family_cases: FamilyCases) -> FamilyCase:
    return family_cases.get(str(request.param))


def test_the_fixture_is_an_ldm_checkpoint_of_its_family_diffusers_converts_back_exactly(
    case: FamilyCase,
) -> None:
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = ldm_state_dict(case.folder)
    assert infer_diffusers_model_type(checkpoint) == case.diffusers_type  # type: ignore[no-untyped-call]
    configs = {
        c: json.loads((case.folder / c / "config.json").read_text()) for c in ("unet", "vae")
    }

    def without_wrapper(state: dict[str, Any]) -> dict[str, Any]:
        # transformers >= 5.6 CLIPTextModel has no `text_model.` level (see clip_to_ldm)
        return {k.removeprefix("text_model."): v for k, v in state.items()}

    converted: dict[str, dict[str, Any]] = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),  # type: ignore[no-untyped-call]
        "vae": convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),  # type: ignore[no-untyped-call]
    }
    if case.family == "sd2":
        assert any(
            k.startswith("cond_stage_model.model.transformer.resblocks.0.") for k in checkpoint
        )
        text = CLIPTextModel.from_pretrained(case.folder / "text_encoder", local_files_only=True)
        converted["text_encoder"] = without_wrapper(
            convert_open_clip_checkpoint(text, checkpoint)  # type: ignore[no-untyped-call]
        )
    else:
        assert checkpoint["model.diffusion_model.label_emb.0.0.weight"].ndim == 2
        converted["text_encoder"] = without_wrapper(
            convert_ldm_clip_checkpoint(checkpoint)  # type: ignore[no-untyped-call]
        )
        text_2 = CLIPTextModelWithProjection.from_pretrained(
            case.folder / "text_encoder_2", local_files_only=True
        )
        converted["text_encoder_2"] = convert_open_clip_checkpoint(  # type: ignore[no-untyped-call]
            text_2, checkpoint, prefix="conditioner.embedders.1.model."
        )
    for component, state in converted.items():
        original = _component_state(case.folder / component)
        assert state.keys() == original.keys(), component
        assert all(torch.equal(state[k], original[k]) for k in original), component
    for path in (case.file, case.folder):
        metadata = inspect_path(path)
        assert metadata.family == case.family, path
        assert metadata.needs_components == [], path


def test_the_single_file_gives_the_folders_image_with_the_folder_as_config(
    case: FamilyCase, tmp_path: Path
) -> None:
    engine = DiffusersEngine("cpu", threads=1, hf_cache=tmp_path)  # an empty cache: not used
    load(engine, case.file, config=str(case.folder))
    assert engine.loaded is not None and engine.loaded.name == case.pipeline_class
    assert dict(engine_pipe(engine).scheduler.config) == case.folder_scheduler
    assert np.array_equal(generate(engine), case.folder_image)


def test_the_single_file_finds_its_family_configs_in_a_configs_only_hf_cache(
    case: FamilyCase,
) -> None:
    snapshot = next(
        (case.hf_cache / f"models--{case.repo.replace('/', '--')}" / "snapshots").iterdir()
    )
    assert not list(snapshot.rglob("*.safetensors"))  # configs only: no weights
    if case.family == "sdxl":  # the second encoder's config and tokenizer come along
        assert missing_config_files(snapshot) == []
        assert (snapshot / "tokenizer_2" / "tokenizer_config.json").is_file()
    engine = DiffusersEngine("cpu", threads=1, hf_cache=case.hf_cache)
    load(engine, case.file)  # family from inspection
    assert engine.loaded is not None and engine.loaded.name == case.pipeline_class
    assert dict(engine_pipe(engine).scheduler.config) == case.folder_scheduler
    assert np.array_equal(generate(engine), case.folder_image)


def test_sd2_prediction_type_is_the_configs_unless_the_file_declares_its_own(
    family_cases: FamilyCases, tmp_path: Path
) -> None:
    """v-prediction cannot be read from an SD2 file's weights (diffusers' own guess looks at
    `global_step`): the single-file path takes the config's scheduler (v_prediction, as
    stable-diffusion-2-1's), and an epsilon config gives epsilon (and another image). A file
    whose ModelSpec header says epsilon (the 512-px SD2 base) gets epsilon with the family
    repo's v-prediction configs; with an explicit image.config the config decides."""
    case = family_cases.get("sd2")
    assert case.folder_scheduler["prediction_type"] == "v_prediction"
    engine = DiffusersEngine("cpu", threads=1, hf_cache=case.hf_cache)
    load(engine, case.file)
    assert engine_pipe(engine).scheduler.config.prediction_type == "v_prediction"
    # Per-request schedulers are built from the loaded config: still v-prediction.
    euler = ImageParams.model_validate({**PARAMS, "scheduler": "euler"})
    from_file = engine.generate(euler, on_progress=lambda _e: None, cancel=threading.Event())
    assert engine_pipe(engine).scheduler.config.prediction_type == "v_prediction"
    folder_engine = DiffusersEngine("cpu", threads=1)
    load(folder_engine, case.folder)
    from_folder = folder_engine.generate(
        euler, on_progress=lambda _e: None, cancel=threading.Event()
    )
    assert from_file.images[0].png == from_folder.images[0].png

    epsilon = tmp_path / "sd2-epsilon-configs"
    for relative in config_files(case.folder):
        (epsilon / relative).parent.mkdir(parents=True, exist_ok=True)
        (epsilon / relative).write_bytes((case.folder / relative).read_bytes())
    scheduler_file = epsilon / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler["prediction_type"] = "epsilon"
    scheduler_file.write_text(json.dumps(scheduler))
    load(engine, case.file, config=str(epsilon))
    assert engine_pipe(engine).scheduler.config.prediction_type == "epsilon"
    epsilon_image = generate(engine)
    assert not np.array_equal(epsilon_image, case.folder_image)

    base_512 = write_ldm_single_file(
        case.folder,
        tmp_path / "tiny-sd2-512.safetensors",
        metadata={
            "modelspec.architecture": "stable-diffusion-v2-512",
            "modelspec.prediction_type": "epsilon",
        },
    )
    assert declared_prediction_type(base_512) == "epsilon"
    assert declared_prediction_type(case.file) == "v_prediction"  # stable-diffusion-v2-768-v
    load(engine, base_512)  # the family repo's configs say v_prediction; the file says epsilon
    assert engine_pipe(engine).scheduler.config.prediction_type == "epsilon"
    assert np.array_equal(generate(engine), epsilon_image)
    load(engine, base_512, config=str(case.folder))  # an explicit config is taken as is
    assert engine_pipe(engine).scheduler.config.prediction_type == "v_prediction"
    assert np.array_equal(generate(engine), case.folder_image)


def test_a_pulled_sdxl_single_file_brings_both_encoders_configs_and_loads_by_name(
    mesh: Mesh, hub: FakeHub, family_cases: FamilyCases
) -> None:
    from huggingface_hub import try_to_load_from_cache

    case = family_cases.get("sdxl")
    configs = {str(r): case.folder / r for r in config_files(case.folder)}
    assert {"text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json"} <= set(configs)
    weights = case.folder / "text_encoder_2" / "model.safetensors"
    hub.add_repo(case.repo, {**configs, "text_encoder_2/model.safetensors": weights})
    hub.add_repo("civit/tiny-sdxl", {"tiny-sdxl.safetensors": case.file})

    stream = mesh.provisioner.PullModel(
        ppb.PullModelRequest(source="hf:civit/tiny-sdxl:tiny-sdxl.safetensors"), timeout=60
    )
    messages = [m.progress.message for m in stream if m.HasField("progress")]
    assert any(f"fetching the sdxl configs from {case.repo}" in m for m in messages)
    models = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
    model = next(m for m in models if m.source.repo == "civit/tiny-sdxl")
    assert model.state == cpb.MODEL_STATE_READY and model.metadata.family == "sdxl"
    index = try_to_load_from_cache(case.repo, "model_index.json", cache_dir=mesh.hf_cache)
    assert isinstance(index, str)
    snapshot = Path(index).parent
    assert sorted(str(p) for p in config_files(snapshot)) == sorted(configs)
    assert not list(snapshot.rglob("*.safetensors"))

    engine = DiffusersEngine("cpu", threads=1, hf_cache=mesh.hf_cache)
    with worker_with_catalog(engine, mesh.catalog_address) as stub:
        image = load_pb2.ImageLoadOptions(dtype="float32")
        responses = list(
            stub.LoadModel(pb.LoadModelRequest(model=model.name, image=image), timeout=RPC_TIMEOUT)
        )
        assert responses[-1].worker.state == pb.WORKER_STATE_READY
        assert responses[-1].worker.loaded_model.image.family == "sdxl"
        assert np.array_equal(imagine(stub), case.folder_image)
