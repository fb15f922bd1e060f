"""Where a single-file image checkpoint's configs come from, and how the catalog carries them.

The lookup order of `find_single_file_config`: an explicit image.config wins; then the folder
the catalog records for the model (Model.config_folder, fetched by the provisioner into ITS HF
cache); then the family's config repo in the worker's own HF cache. A refusal names every folder
it looked in. The worker service hands the recorded folder on only when the request sets no
image.config and no other family; the catalog's converters carry the field both ways.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2

from rbee.catalog.v1 import catalog_pb2 as pb
from services.catalog import convert
from services.catalog.domain import (
    DeviceKind,
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
)
from services.catalog.service import CatalogService, HostInfo, ModelDraft, ModelPatch
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.errors import FailedPrecondition, InvalidArgument
from services.worker.engines.diffusers_engine import find_single_file_config
from services.worker.engines.image_base import SINGLE_FILE_CONFIG_REPOS, ImageLoadOptions
from services.worker.service import LoadTarget, with_recorded_config

pytestmark = pytest.mark.unit

SD1_REPO = SINGLE_FILE_CONFIG_REPOS["sd1"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# What a single file needs from a config folder (model_index.json names the components).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
}


def write_config_folder(folder: Path) -> Path:
    """A diffusers config folder (configs only, tiny JSON files) at `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / component).mkdir(exist_ok=True)
        (folder / component / "config.json").write_text("{}")
    return folder


def write_cached_repo(hf_cache: Path, repo: str) -> Path:
    """`repo` at COMMIT in the HF cache `hf_cache`, refs/main pointing at it; its snapshot."""
    repo_folder = hf_cache / ("models--" + repo.replace("/", "--"))
    snapshot = write_config_folder(repo_folder / "snapshots" / COMMIT)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)
    return snapshot


CHECKPOINT = Path("/models/tiny-sd1.safetensors")  # never read: the family is given


def test_explicit_config_wins_over_the_recorded_folder_and_the_cache(tmp_path: Path) -> None:
    explicit = write_config_folder(tmp_path / "explicit")
    recorded = write_config_folder(tmp_path / "recorded")
    cache = tmp_path / "cache"
    write_cached_repo(cache, SD1_REPO)
    found = find_single_file_config(
        CHECKPOINT, "sd1", config=str(explicit), hf_cache=cache, recorded=str(recorded)
    )
    assert found == explicit


def test_the_recorded_folder_comes_before_the_workers_own_cache(tmp_path: Path) -> None:
    recorded = write_config_folder(tmp_path / "provisioner-cache" / "sd1-snapshot")
    cache = tmp_path / "worker-cache"
    cached = write_cached_repo(cache, SD1_REPO)
    assert (
        find_single_file_config(CHECKPOINT, "sd1", config=None, hf_cache=cache, recorded=None)
        == cached
    )
    assert (
        find_single_file_config(
            CHECKPOINT, "sd1", config=None, hf_cache=cache, recorded=str(recorded)
        )
        == recorded
    )
    # Only the recorded folder has them: still found (the bug this order fixes).
    assert (
        find_single_file_config(
            CHECKPOINT, "sd1", config=None, hf_cache=tmp_path / "empty", recorded=str(recorded)
        )
        == recorded
    )
    # Even when the family is unknown here: the recorded folder is the model's own.
    assert (
        find_single_file_config(
            CHECKPOINT, None, config=None, hf_cache=tmp_path / "empty", recorded=str(recorded)
        )
        == recorded
    )


def test_an_unusable_recorded_folder_falls_back_to_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "worker-cache"
    cached = write_cached_repo(cache, SD1_REPO)
    incomplete = write_config_folder(tmp_path / "incomplete")
    (incomplete / "tokenizer" / "config.json").unlink()
    for recorded in (str(tmp_path / "gone"), str(incomplete), "relative/folder"):
        found = find_single_file_config(
            CHECKPOINT, "sd1", config=None, hf_cache=cache, recorded=recorded
        )
        assert found == cached, recorded


def test_the_refusal_names_every_folder_it_looked_in(tmp_path: Path) -> None:
    incomplete = write_config_folder(tmp_path / "provisioner-cache" / "snapshot")
    (incomplete / "tokenizer" / "config.json").unlink()
    cache = tmp_path / "worker-cache"
    with pytest.raises(FailedPrecondition) as refused:
        find_single_file_config(
            CHECKPOINT, "sd1", config=None, hf_cache=cache, recorded=str(incomplete)
        )
    error = refused.value
    message = str(error)
    assert str(incomplete) in message and "lacks tokenizer/" in message
    assert str(cache) in message and f"hf download {SD1_REPO}" in message
    assert [v.subject for v in error.violations] == [f"hf:{SD1_REPO}"]
    assert str(incomplete) in error.violations[0].description
    assert str(cache) in error.violations[0].description
    assert error.metadata == {
        "family": "sd1",
        "config_repo": SD1_REPO,
        "recorded_config": str(incomplete),
    }

    gone = tmp_path / "gone"
    with pytest.raises(FailedPrecondition, match="does not exist on this host") as unknown:
        find_single_file_config(CHECKPOINT, None, config=None, hf_cache=cache, recorded=str(gone))
    assert str(gone) in str(unknown.value) and unknown.value.reason == "INCOMPATIBLE_MODEL"


# ---- the worker service: when the recorded folder reaches the engine ---------------------------


def target(config_folder: str, family: str | None = "sd1") -> LoadTarget:
    metadata = ModelMetadata(format=ModelFormat.SAFETENSORS, model_type=ModelType.IMAGE)
    return LoadTarget(
        model="models/tiny-sd1",
        paths=[str(CHECKPOINT)],
        path=CHECKPOINT,
        metadata=metadata.model_copy(update={"family": family}),
        config_folder=config_folder,
    )


def test_the_service_hands_on_the_recorded_folder_unless_the_request_says_otherwise() -> None:
    recorded = "/cache/models--x/snapshots/abc"
    inspected = ImageLoadOptions(family="sd1")  # as _with_inspected_family leaves it
    assert with_recorded_config(inspected, target(recorded)).recorded_config == recorded
    assert with_recorded_config(inspected, target("")).recorded_config is None  # none recorded
    explicit = ImageLoadOptions(family="sd1", config="/my/configs")
    assert with_recorded_config(explicit, target(recorded)) == explicit  # image.config wins
    other_family = ImageLoadOptions(family="sd2")
    assert with_recorded_config(other_family, target(recorded)) == other_family


# ---- the catalog carries it ----------------------------------------------------------------------


def test_the_catalog_converters_carry_the_config_folder_both_ways() -> None:
    now = datetime.now(UTC)
    model = Model(
        id="tiny-sd1",
        source=ModelSource(kind=SourceKind.HUGGINGFACE, repo="civit/tiny-sd1"),
        paths=["/cache/tiny-sd1.safetensors"],
        created_at=now,
        updated_at=now,
        config_folder="/cache/models--x/snapshots/abc",
    )
    msg = convert.model_to_pb(model)
    assert msg.config_folder == model.config_folder
    assert convert.model_from_pb(msg).config_folder == model.config_folder
    assert convert.model_draft_from_pb(msg).config_folder == model.config_folder

    update = pb.UpdateModelRequest(
        model=pb.Model(name=model.name, config_folder="/other"),
        update_mask=field_mask_pb2.FieldMask(paths=["config_folder"]),
    )
    patch = convert.model_patch_from_pb(update)
    assert patch.fields == {"config_folder"} and patch.values.config_folder == "/other"
    legacy = Model.model_validate_json(model.model_dump_json(exclude={"config_folder"}))
    assert legacy.config_folder == ""  # records stored before the field: none recorded


async def test_the_catalog_records_an_absolute_config_folder_and_refuses_a_relative_one(
    tmp_path: Path,
) -> None:
    service = CatalogService(
        CatalogStore.open(tmp_path / "db" / "catalog.db"),
        WorkerTypeRegistry(),
        host=HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU})),
    )
    try:
        source = ModelSource(kind=SourceKind.HUGGINGFACE, repo="civit/tiny-sd1")
        created = await service.create_model(
            ModelDraft(source=source, state=ModelState.DOWNLOADING), model_id="tiny-sd1"
        )
        assert created.config_folder == ""
        folder = str(tmp_path / "cache" / "snapshots" / "abc")

        def patch(value: str) -> ModelPatch:
            return ModelPatch(
                fields=frozenset({"config_folder"}),
                values=ModelDraft(source=source, config_folder=value),
            )

        updated = await service.update_model(created.name, patch(folder + "/"))
        assert updated.config_folder == folder  # normalised, as paths are
        assert (await service.get_model(created.name)).config_folder == folder  # stored
        with pytest.raises(InvalidArgument) as relative:
            await service.update_model(created.name, patch("cache/snapshots/abc"))
        assert relative.value.field_violations[0].field == "model.config_folder"
        cleared = await service.update_model(created.name, patch(""))
        assert cleared.config_folder == ""
    finally:
        await service.close()
