"""`rbee imagine PROMPT -o FILE.png`: images from an image (Stable Diffusion-family) worker.

The worker is named by `--worker` (workers/ID, ID, HOST:PORT) or found for `--model` (models/ID,
ID or name: a serving worker is reused, else the pool spawns one, as for `rbee chat`); with
neither, a READY image worker of the pool is used. Every field of ImageParams has a flag.

Output files are never overwritten unless `--force`, and are written atomically (a temp file in
the same folder, fsync, rename): a reader never sees half an image. With `--count N` (N > 1) the
files are FILE-1.png ... FILE-N.png. The image format follows the output suffix (.png, .jpg,
.jpeg, .webp).

Progress: a step bar on stderr when it is a terminal, plain step lines otherwise; with
`--format json` none, but JSON lines on stdout: `{"target": ...}`, `{"progress": ...}` per step
(previews left out), then `{"result": ..., "files": [...]}` (image bytes left out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from rbee.worker.v1 import image_pb2 as img
from rbee.worker.v1 import load_pb2
from rbee_client.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, client_security
from rbee_client.cli.output import stderr_console
from rbee_client.cli.target import (
    ResolvedWorker,
    TargetKind,
    TargetResolver,
    Task,
    add_target_arguments,
    resolve_worker,
)

FORMATS_BY_SUFFIX: dict[str, int] = {
    ".png": img.IMAGE_FORMAT_PNG,
    ".jpg": img.IMAGE_FORMAT_JPEG,
    ".jpeg": img.IMAGE_FORMAT_JPEG,
    ".webp": img.IMAGE_FORMAT_WEBP,
}
LORA_WEIGHT_RANGE = (-4.0, 4.0)


# ---- parameters ------------------------------------------------------------------------------


def parse_lora(text: str) -> load_pb2.LoraAdapter:
    """`NAME_OR_PATH[:WEIGHT]` -> a LoraAdapter.

    A path (it contains a `/`, starts with `.` or `~`, or ends in `.safetensors`) is made
    absolute (the worker reads it on this host); anything else is a catalog model id.
    """
    spec, sep, weight_text = text.rpartition(":")
    weight: float | None = None
    if sep:
        try:
            weight = float(weight_text)
        except ValueError:
            spec = text  # a colon that is part of the name, not a weight
    else:
        spec = text
    if not spec:
        raise argparse.ArgumentTypeError(f"not NAME_OR_PATH[:WEIGHT]: {text!r}")
    if weight is not None and not LORA_WEIGHT_RANGE[0] <= weight <= LORA_WEIGHT_RANGE[1]:
        raise argparse.ArgumentTypeError(f"a LoRA weight is between -4 and 4: {text!r}")
    adapter = load_pb2.LoraAdapter()
    if "/" in spec or spec.startswith((".", "~")) or spec.endswith(".safetensors"):
        if spec.startswith("models/"):
            adapter.model = spec
        else:
            adapter.path = str(Path(spec).expanduser().resolve())
    else:
        adapter.model = f"models/{spec}"
    if weight is not None:
        adapter.weight = weight
    return adapter


def _dimension(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if value < 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 pixels: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def output_format(path: Path) -> int:
    """The ImageFormat the output file's suffix asks for."""
    try:
        return FORMATS_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise CliError(
            f"cannot tell the image format of {path.name!r} from its suffix",
            hint="end the output name in .png, .jpg or .webp",
            code=EXIT_USAGE,
        ) from None


def image_params_from_args(args: argparse.Namespace) -> img.ImageParams:
    """ImageParams from the flags; a flag not given stays unset (the pipeline's default)."""
    params = img.ImageParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        prompt_2=args.prompt_2 or "",
        negative_prompt_2=args.negative_prompt_2 or "",
        steps=args.steps or 0,
        width=args.width or 0,
        height=args.height or 0,
        scheduler=args.scheduler or "",
        count=args.count,
        preview_interval=args.preview_interval or 0,
        preview_size=args.preview_size or 0,
        loras=list(args.lora or ()),
        output_format=output_format(Path(args.output)),  # type: ignore[arg-type]
    )
    for name in ("guidance_scale", "guidance_rescale", "seed", "clip_skip", "eta"):
        value = getattr(args, name)
        if value is not None:
            setattr(params, name, value)
    return params


def output_paths(output: Path, count: int) -> list[Path]:
    """Where the images go: `output` for one, `stem-1.suffix` ... `stem-N.suffix` for more."""
    if count <= 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def check_writable(paths: Sequence[Path], *, force: bool) -> None:
    """Refuse before any work when a file would be overwritten (unless `force`) or a folder is
    missing."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise CliError(
            f"{shown} already exists",
            hint="--force overwrites, or choose another -o",
            reason="ALREADY_EXISTS",
        )
    for path in paths:
        if path.is_dir():
            raise CliError(f"{path} is a folder", hint="-o names a file")
        if not path.parent.is_dir():
            raise CliError(f"the folder {path.parent} does not exist", hint="create it, or fix -o")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, rename."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# ---- progress --------------------------------------------------------------------------------


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def progress_line(progress: img.ImageProgress) -> str:
    """Plain step line for a non-terminal stderr."""
    line = f"step {progress.step}/{progress.total_steps}"
    if progress.image_count > 1:
        line += f" (image {progress.image_index + 1}/{progress.image_count})"
    if progress.steps_per_second:
        line += f" {progress.steps_per_second:.2f} steps/s"
    return line


def summary_line(result: img.ImageResult) -> str:
    """One line about the finished request."""
    parts = [f"{len(result.images)} image{'s' if len(result.images) != 1 else ''}"]
    if result.images:
        first = result.images[0]
        parts.append(f"{first.width}x{first.height}")
        seeds = [str(i.seed) for i in result.images]
        parts.append(f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(seeds)}")
    parts.append(f"{result.steps} steps")
    if result.scheduler:
        parts.append(result.scheduler)
    parts.append(f"guidance {result.guidance_scale:g}")
    if result.timings.steps_per_second:
        parts.append(f"{result.timings.steps_per_second:.2f} steps/s")
    if result.timings.HasField("total_time"):
        parts.append(f"{_seconds(result.timings.total_time):.1f} s")
    return ", ".join(parts)


class _StepBar:
    """A rich progress bar on stderr (a terminal), one task per image."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=False,
        )
        self._tasks: dict[int, Any] = {}

    def __enter__(self) -> _StepBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, progress: img.ImageProgress) -> None:
        index = progress.image_index
        if index not in self._tasks:
            label = (
                f"image {index + 1}/{progress.image_count}" if progress.image_count > 1 else "steps"
            )
            self._tasks[index] = self._progress.add_task(
                label, total=progress.total_steps or None, rate=""
            )
        rate = f"{progress.steps_per_second:.2f} steps/s" if progress.steps_per_second else ""
        self._progress.update(
            self._tasks[index], completed=progress.step, total=progress.total_steps, rate=rate
        )


class _NoBar:
    def __init__(self, *, plain: bool) -> None:
        self._plain = plain

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, progress: img.ImageProgress) -> None:
        if self._plain:
            print(progress_line(progress), file=sys.stderr, flush=True)


def _json_line(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _progress_json(progress: img.ImageProgress) -> dict[str, Any]:
    shown = img.ImageProgress()
    shown.CopyFrom(progress)
    shown.ClearField("preview")  # bytes: a file's business, not a JSON line's
    return json_format.MessageToDict(shown)


def _result_json(result: img.ImageResult, files: Sequence[Path]) -> dict[str, Any]:
    shown = img.ImageResult()
    shown.CopyFrom(result)
    for image in shown.images:
        image.ClearField("data")
    return {"result": json_format.MessageToDict(shown), "files": [str(p) for p in files]}


def run_image_stream(
    events: Iterable[img.ImageProgress | img.ImageResult],
    *,
    as_json: bool,
    bar: bool,
    preview_path: Path | None = None,
) -> img.ImageResult | None:
    """Show the steps as they come; return the result (None if the stream ended without one)."""
    result: img.ImageResult | None = None
    display: _StepBar | _NoBar = _StepBar() if bar and not as_json else _NoBar(plain=not as_json)
    with display:
        for event in events:
            if isinstance(event, img.ImageProgress):
                if as_json:
                    _json_line({"progress": _progress_json(event)})
                else:
                    display.update(event)
                if preview_path is not None and event.preview:
                    write_atomically(preview_path, event.preview)
            else:
                result = event
    return result


# ---- the command -----------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> ResolvedWorker:
    if args.worker:
        return resolve_worker(args, Task.IMAGE, args.worker, only=TargetKind.WORKER)
    if args.model:
        return resolve_worker(args, Task.IMAGE, args.model, only=TargetKind.MODEL)
    with TargetResolver(args, Task.IMAGE) as resolver:
        found = resolver.any_serving_worker()
    if found is None:
        raise CliError(
            "no image worker is running and no model was named",
            hint="name one: `rbee imagine PROMPT --model MODEL -o out.png` (`rbee models ls` "
            "lists them)",
            code=EXIT_USAGE,
        )
    print(found.describe(), file=sys.stderr, flush=True)
    return found


def cmd_imagine(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    params = image_params_from_args(args)
    paths = output_paths(output, args.count)
    check_writable(paths, force=args.force)
    preview = Path(args.preview).expanduser() if args.preview else None
    if preview is not None and not params.preview_interval:
        params.preview_interval = 1
    resolved = _resolve(args)
    as_json = args.format == "json"
    if as_json:
        _json_line({"target": resolved.to_json()})
    from rbee_client.worker import WorkerClient

    with WorkerClient(
        resolved.endpoint, security=client_security(), timeout=args.timeout
    ) as worker:
        events = worker.generate_image(params, timeout=args.request_timeout)
        result = run_image_stream(
            events, as_json=as_json, bar=sys.stderr.isatty(), preview_path=preview
        )
    if result is None:
        raise CliError("the worker ended the request without a result", code=EXIT_FAILED)
    images = sorted(result.images, key=lambda i: i.index)
    files = output_paths(output, len(images)) if len(images) != len(paths) else paths
    for image, path in zip(images, files, strict=True):
        write_atomically(path, image.data)
    if as_json:
        _json_line(_result_json(result, files))
        return EXIT_OK
    for path in files:
        print(path)
    stderr_console().print(summary_line(result), markup=False, highlight=False)
    return EXIT_OK


def _optional_seconds(text: str) -> float | None:
    value = float(text)
    return None if value <= 0 else value


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `rbee imagine`."""
    p = sub.add_parser(
        "imagine",
        parents=[common],
        help="make images with an image worker or model",
        description="The worker: --worker (workers/ID, ID, HOST:PORT), or --model (models/ID, "
        "ID, name: a worker is reused or spawned); with neither, a running image worker.",
    )
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.png (.jpg, .webp)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model: models/ID, ID or name")
    which.add_argument("--worker", help="a worker: workers/ID, ID or HOST:PORT")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--request-timeout",
        type=_optional_seconds,
        default=None,
        help="seconds the images may take (default: no limit; Ctrl-C stops them)",
    )
    g = p.add_argument_group("image parameters (unset: the pipeline's defaults)")
    g.add_argument("-n", "--negative-prompt", help="what to keep out of the image")
    g.add_argument("--prompt-2", help="SDXL's second prompt")
    g.add_argument("--negative-prompt-2", help="SDXL's second negative prompt")
    g.add_argument("-W", "--width", type=_dimension, help="pixels, a multiple of 8")
    g.add_argument("-H", "--height", type=_dimension, help="pixels, a multiple of 8")
    g.add_argument("-s", "--steps", type=_non_negative_int, help="denoising steps")
    g.add_argument(
        "-g", "--guidance", dest="guidance_scale", type=float, help="guidance scale (CFG)"
    )
    g.add_argument("--guidance-rescale", type=float)
    g.add_argument("--seed", type=_non_negative_int, help="seed of the first image (+i after)")
    g.add_argument("--scheduler", help="euler, euler_a, ddim, dpm++2m, dpm++2m_karras, unipc...")
    g.add_argument("-c", "--count", type=_positive_int, default=1, help="images to make")
    g.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        metavar="NAME_OR_PATH[:WEIGHT]",
        help="a LoRA (catalog model or .safetensors path) and its weight; repeatable",
    )
    g.add_argument("--clip-skip", type=_non_negative_int)
    g.add_argument("--eta", type=float, help="DDIM eta")
    g.add_argument("--preview-interval", type=_non_negative_int, help="a preview every N steps")
    g.add_argument("--preview-size", type=_non_negative_int, help="previews' longest edge")
    g.add_argument(
        "--preview", metavar="FILE", help="keep the latest preview in FILE (implies previews)"
    )
    add_target_arguments(p, llm=False)
    p.set_defaults(func=cmd_imagine)
