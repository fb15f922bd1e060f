"""DiffusersEngine on a tiny random StableDiffusionPipeline (CPU, float32), in process."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from services.worker.engines.diffusers_engine import SCHEDULERS, DiffusersEngine
from services.worker.engines.image_base import ImageLoadOptions, ImageParams, ImageProgress
from tests.fixtures.sd_models import tiny_sd_pipeline_under, write_foreign_lora, write_tiny_lora

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
        ({"loras": [{"path": "/x.safetensors", "scale": 4.5}]}, "params.loras[0].weight"),
        ({"loras": [{"path": "/x.safetensors", "scale": float("nan")}]}, "params.loras[0].weight"),
        ({"loras": [{"path": "x.safetensors"}]}, "params.loras[0].path"),
        ({"loras": [{"path": "/x.safetensors"}, {"path": "/y.bin"}]}, "params.loras[1].path"),
        ({"loras": [{"path": f"/{i}.safetensors"} for i in range(9)]}, "params.loras"),
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


# ---- LoRAs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(sd_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_lora(folder / "unet.safetensors", sd_folder, seed=1)
    write_tiny_lora(folder / "both.safetensors", sd_folder, seed=2, with_text_encoder=True)
    write_tiny_lora(
        folder / "both-kohya.safetensors", sd_folder, seed=2, with_text_encoder=True, kohya=True
    )
    write_foreign_lora(folder / "foreign.safetensors")
    return folder


def lora(path: Path, scale: float = 1.0) -> dict[str, object]:
    return {"path": str(path), "scale": scale}


def test_a_lora_changes_the_image_only_while_it_is_requested(
    engine: DiffusersEngine, lora_dir: Path
) -> None:
    unet_lora = lora_dir / "unet.safetensors"
    _, (base,), _ = run(engine, seed=5)
    events, (with_lora,), _ = run(engine, seed=5, loras=[lora(unet_lora)])
    _, (after,), _ = run(engine, seed=5)
    _, (at_zero,), _ = run(engine, seed=5, loras=[lora(unet_lora, 0.0)])
    _, (negative,), _ = run(engine, seed=5, loras=[lora(unet_lora, -1.0)])
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert not np.array_equal(with_lora, base)
    assert np.array_equal(after, base)  # nothing left active by the LoRA request
    assert np.array_equal(at_zero, base)
    assert not np.array_equal(negative, base) and not np.array_equal(negative, with_lora)
    # A LoRA with text encoder layers, alone and stacked with the first one.
    _, (both,), _ = run(engine, seed=5, loras=[lora(lora_dir / "both.safetensors", 0.7)])
    _, (stacked,), _ = run(
        engine, seed=5, loras=[lora(unet_lora), lora(lora_dir / "both.safetensors", 0.7)]
    )
    assert len({a.tobytes() for a in (base, with_lora, both, stacked)}) == 4
    # The same LoRA in kohya's key format (as most CivitAI LoRAs) is the same LoRA.
    _, (kohya,), _ = run(engine, seed=5, loras=[lora(lora_dir / "both-kohya.safetensors", 0.7)])
    assert np.array_equal(kohya, both)
    _, (again,), _ = run(engine, seed=5, loras=[lora(unet_lora)])
    assert np.array_equal(again, with_lora)
    _, (base_again,), _ = run(engine, seed=5)
    assert np.array_equal(base_again, base)


def test_lora_adapters_are_loaded_once_and_the_cache_is_bounded(
    sd_folder: Path, lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = DiffusersEngine("cpu", threads=1, max_cached_loras=1)
    engine.load(
        sd_folder, ImageLoadOptions(), progress=lambda _f, _m: None, cancel=threading.Event()
    )
    first, second = lora_dir / "unet.safetensors", lora_dir / "both.safetensors"
    caplog.set_level("INFO", logger="services.worker.engines.diffusers_engine")

    def loads() -> int:
        return sum(r.getMessage().startswith("loaded LoRA") for r in caplog.records)

    run(engine, steps=1, seed=1, loras=[lora(first)])
    _, (cached,), _ = run(engine, steps=1, seed=1, loras=[lora(first)])
    assert loads() == 1 and engine.cached_loras == [str(first)]
    run(engine, steps=1, seed=1, loras=[lora(second)])
    assert loads() == 2 and engine.cached_loras == [str(second)]  # `first` evicted
    # One request may hold more than the bound; the next one trims the others.
    run(engine, steps=1, seed=1, loras=[lora(first), lora(second)])
    assert engine.cached_loras == [str(first), str(second)]
    _, (reloaded,), _ = run(engine, steps=1, seed=1, loras=[lora(first)])
    assert engine.cached_loras == [str(first)] and np.array_equal(reloaded, cached)
    # A rewritten file is another LoRA: a fresh adapter, not the cached one.
    copy = tmp_path / "rewritten.safetensors"
    copy.write_bytes(first.read_bytes())
    _, (from_copy,), _ = run(engine, steps=1, seed=1, loras=[lora(copy)])
    write_tiny_lora(copy, sd_folder, seed=9)
    _, (rewritten,), _ = run(engine, steps=1, seed=1, loras=[lora(copy)])
    assert np.array_equal(from_copy, cached) and not np.array_equal(rewritten, cached)


def test_a_file_that_is_no_lora_for_this_pipeline_is_incompatible_and_harmless(
    engine: DiffusersEngine, lora_dir: Path, sd_folder: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    other_layers = tmp_path / "other-layers.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 8),
            "transformer.blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 2),
        },
        str(other_layers),
    )
    _, (base,), _ = run(engine, seed=8)
    cached = engine.cached_loras
    for path, why in (
        (lora_dir / "foreign.safetensors", "size mismatch"),
        (sd_folder / "unet" / "diffusion_pytorch_model.safetensors", "lora"),  # a checkpoint
        (garbage, "header"),
        (other_layers, "none of its tensors"),
    ):
        with pytest.raises(FailedPrecondition) as caught:
            run(engine, seed=8, loras=[lora(lora_dir / "unet.safetensors"), lora(path)])
        assert caught.value.reason == "INCOMPATIBLE_MODEL", path
        assert "params.loras[1]" in str(caught.value) and why in str(caught.value), path
        assert len(str(caught.value)) < 700
    assert set(engine.cached_loras) == {*cached, str(lora_dir / "unet.safetensors")}
    _, (after,), _ = run(engine, seed=8)
    assert np.array_equal(after, base)


def test_a_missing_lora_file_is_not_found(engine: DiffusersEngine, tmp_path: Path) -> None:
    params = ImageParams(prompt="x", steps=1, loras=[{"path": str(tmp_path / "no.safetensors")}])
    with pytest.raises(NotFound) as checked:
        engine.check_params(params)
    assert checked.value.reason == "FILE_NOT_FOUND"
    with pytest.raises(NotFound):
        engine.generate(params, on_progress=lambda _e: None, cancel=threading.Event())


def test_cancel_with_a_lora_active_and_the_next_request_runs_the_base_weights(
    engine: DiffusersEngine, lora_dir: Path
) -> None:
    _, (base,), _ = run(engine, seed=4)
    cancel = threading.Event()
    events: list[ImageProgress] = []

    def on_progress(event: ImageProgress) -> None:
        events.append(event)
        if event.step == 2:
            cancel.set()

    params = ImageParams(
        prompt="a red cube",
        steps=20,
        width=64,
        height=64,
        count=2,
        seed=4,
        loras=[{"path": str(lora_dir / "unet.safetensors"), "scale": 2.0}],
    )
    with pytest.raises(Cancelled):
        engine.generate(params, on_progress=on_progress, cancel=cancel)
    assert len(events) == 2
    _, (after,), _ = run(engine, seed=4)
    assert np.array_equal(after, base)


def test_loras_at_load_are_fused_with_their_weights(
    engine: DiffusersEngine, sd_folder: Path, lora_dir: Path, tmp_path: Path
) -> None:
    unet_lora = lora_dir / "unet.safetensors"
    _, (base,), _ = run(engine, seed=6)
    _, (per_request,), _ = run(engine, seed=6, loras=[lora(unet_lora, 1.5)])
    fused = DiffusersEngine("cpu", threads=1)
    fused.load(
        sd_folder,
        ImageLoadOptions.model_validate({"loras": [lora(unet_lora, 1.5)]}),
        progress=lambda _f, _m: None,
        cancel=threading.Event(),
    )
    _, (from_fused,), _ = run(fused, seed=6)
    # Fusing reorders the float arithmetic: equal up to rounding, far from the base image.
    difference = np.abs(from_fused.astype(int) - per_request.astype(int))
    assert difference.max() <= 2 and np.abs(from_fused.astype(int) - base).mean() > 1.0
    # A request's LoRA applies on top: the same LoRA at -1.5 cancels the fused one.
    _, (cancelled_out,), _ = run(fused, seed=6, loras=[lora(unet_lora, -1.5)])
    assert np.abs(cancelled_out.astype(int) - base.astype(int)).max() <= 2
    assert fused.cached_loras == [str(unet_lora)]
    no_progress = lambda _f, _m: None  # noqa: E731
    with pytest.raises(NotFound) as missing:
        fused.load(
            sd_folder,
            ImageLoadOptions.model_validate({"loras": [lora(tmp_path / "no.safetensors")]}),
            progress=no_progress,
            cancel=threading.Event(),
        )
    assert missing.value.reason == "FILE_NOT_FOUND" and "image.loras" in str(missing.value)
    with pytest.raises(FailedPrecondition) as foreign:
        fused.load(
            sd_folder,
            ImageLoadOptions.model_validate({"loras": [lora(lora_dir / "foreign.safetensors")]}),
            progress=no_progress,
            cancel=threading.Event(),
        )
    assert foreign.value.reason == "INCOMPATIBLE_MODEL" and "image.loras[0]" in str(foreign.value)
    with pytest.raises(InvalidArgument, match=r"image\.loras\[0\]\.weight"):
        fused.load(
            sd_folder,
            ImageLoadOptions.model_validate({"loras": [lora(unet_lora, 7.0)]}),
            progress=no_progress,
            cancel=threading.Event(),
        )
