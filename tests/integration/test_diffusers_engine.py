"""DiffusersEngine on a tiny random StableDiffusionPipeline (CPU, float32), in process."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.worker.engines.diffusers_engine import SCHEDULERS, DiffusersEngine
from services.worker.engines.image_base import ImageLoadOptions, ImageParams, ImageProgress
from tests.fixtures.sd_models import tiny_sd_pipeline_under

pytestmark = [pytest.mark.integration, pytest.mark.sd]

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The engines here use one torch thread (see DiffusersEngine); restored afterwards, since
    the setting is process-wide."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_pipeline_under(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def engine(sd_folder: Path) -> DiffusersEngine:
    engine = DiffusersEngine("cpu", threads=1)
    reports: list[float] = []
    engine.load(
        sd_folder,
        ImageLoadOptions(attention_slicing=True),
        progress=lambda fraction, _message: reports.append(fraction),
        cancel=threading.Event(),
    )
    assert reports[0] == 0.0 and reports[-1] == 1.0
    return engine


def run(
    engine: DiffusersEngine, **fields: object
) -> tuple[list[ImageProgress], list[np.ndarray], list[int]]:
    """Generate with `fields` over the defaults; (progress events, pixel arrays, seeds)."""
    params = ImageParams.model_validate(
        {"prompt": "a red cube", "steps": STEPS, "width": 64, "height": 64, **fields}
    )
    events: list[ImageProgress] = []
    result = engine.generate(params, on_progress=events.append, cancel=threading.Event())
    pixels = [np.asarray(Image.open(io.BytesIO(image.png))) for image in result.images]
    return events, pixels, [image.seed for image in result.images]


def test_load_reports_the_pipeline(engine: DiffusersEngine, sd_folder: Path) -> None:
    loaded = engine.loaded
    assert loaded is not None and loaded.path == str(sd_folder)
    assert loaded.name == "StableDiffusionPipeline" and loaded.memory_bytes > 10_000


def test_steps_progress_and_png_of_the_requested_size(engine: DiffusersEngine) -> None:
    events, pixels, seeds = run(engine, width=96, height=64, count=2, seed=7, preview_interval=2)
    assert [(e.image_index, e.step) for e in events] == [
        (i, s) for i in range(2) for s in range(1, STEPS + 1)
    ]
    assert all(e.total_steps == STEPS and e.image_count == 2 for e in events)
    assert [e.elapsed_s for e in events] == sorted(e.elapsed_s for e in events)
    previews = [e.preview_png for e in events if e.preview_png is not None]
    assert [e.step for e in events if e.preview_png] == [2, 2]
    preview = Image.open(io.BytesIO(previews[0]))
    assert preview.format == "PNG" and max(preview.size) == 256
    assert [p.shape for p in pixels] == [(64, 96, 3), (64, 96, 3)]
    assert seeds == [7, 8]


def test_same_seed_same_image_other_seed_differs(engine: DiffusersEngine) -> None:
    _, first, _ = run(engine, seed=42)
    _, again, _ = run(engine, seed=42)
    _, other, _ = run(engine, seed=43)
    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_unset_seed_is_random_and_reported(engine: DiffusersEngine) -> None:
    _, first, (seed,) = run(engine)
    _, _, (other_seed,) = run(engine)
    assert seed != other_seed
    _, replay, _ = run(engine, seed=seed)
    assert np.array_equal(first[0], replay[0])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_named_scheduler_runs(engine: DiffusersEngine, scheduler: str) -> None:
    events, pixels, _ = run(engine, scheduler=scheduler, seed=1, steps=2)
    assert events and events[-1].step == events[-1].total_steps == len(events)
    assert pixels[0].shape == (64, 64, 3)


def test_cancel_stops_within_a_step_and_the_next_request_works(engine: DiffusersEngine) -> None:
    cancel = threading.Event()
    events: list[ImageProgress] = []

    def on_progress(event: ImageProgress) -> None:
        events.append(event)
        if event.step == 2:
            cancel.set()

    params = ImageParams(prompt="x", steps=20, width=64, height=64, count=2, seed=1)
    with pytest.raises(Cancelled):
        engine.generate(params, on_progress=on_progress, cancel=cancel)
    assert len(events) == 2
    after, pixels, _ = run(engine, seed=1)
    assert len(after) == STEPS and pixels[0].shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 100}, "params.width"),
        ({"height": 32}, "params.height"),
        ({"width": 4096}, "params.width"),
        ({"steps": 0}, "params.steps"),
        ({"steps": 201}, "params.steps"),
        ({"count": 9}, "params.count"),
        ({"scheduler": "warp"}, "params.scheduler"),
        ({"prompt": ""}, "params.prompt"),
        ({"loras": [{"path": "/x.safetensors", "scale": 0.5}]}, "params.loras"),
    ],
)
def test_bad_params_name_the_field(
    engine: DiffusersEngine, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        run(engine, **fields)
    assert field in str(caught.value)
    if field == "params.scheduler":
        assert "euler_a" in str(caught.value) and "dpm++2m_karras" in str(caught.value)


def test_load_errors(sd_folder: Path, tmp_path: Path) -> None:
    engine = DiffusersEngine("cpu", threads=1)
    no_progress = lambda _f, _m: None  # noqa: E731
    with pytest.raises(InvalidArgument, match=r"image\.scheduler"):
        engine.load(
            sd_folder,
            ImageLoadOptions(scheduler="nope"),
            progress=no_progress,
            cancel=threading.Event(),
        )
    with pytest.raises(InvalidArgument, match=r"image\.dtype"):
        engine.load(
            sd_folder,
            ImageLoadOptions(dtype="int8"),
            progress=no_progress,
            cancel=threading.Event(),
        )
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 16)
    with pytest.raises(FailedPrecondition, match="single file") as single_file:
        engine.load(single, ImageLoadOptions(), progress=no_progress, cancel=threading.Event())
    assert single_file.value.reason == "INCOMPATIBLE_MODEL"
    with pytest.raises(FailedPrecondition, match=r"model_index\.json") as not_a_pipeline:
        engine.load(tmp_path, ImageLoadOptions(), progress=no_progress, cancel=threading.Event())
    assert not_a_pipeline.value.reason == "INCOMPATIBLE_MODEL"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(FailedPrecondition) as invalid:
        engine.load(broken, ImageLoadOptions(), progress=no_progress, cancel=threading.Event())
    assert invalid.value.reason == "MODEL_FILE_INVALID"
    assert engine.loaded is None


def test_load_default_scheduler_and_unload(sd_folder: Path) -> None:
    engine = DiffusersEngine("cpu", threads=1)
    engine.load(
        sd_folder,
        ImageLoadOptions(scheduler="ddim", dtype="float32"),
        progress=lambda _f, _m: None,
        cancel=threading.Event(),
    )
    result = engine.generate(
        ImageParams(prompt="x", steps=2, seed=3),
        on_progress=lambda _e: None,
        cancel=threading.Event(),
    )
    assert result.scheduler == "ddim" and result.steps == 2 and result.guidance_scale == 7.5
    assert (result.images[0].width, result.images[0].height) == (64, 64)  # native size
    engine.unload()
    engine.unload()
    assert engine.loaded is None
    with pytest.raises(FailedPrecondition):
        engine.generate(
            ImageParams(prompt="x"), on_progress=lambda _e: None, cancel=threading.Event()
        )
