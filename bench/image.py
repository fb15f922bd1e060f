"""Image benchmark (issue 4): diffusers called directly against our worker over gRPC.

    python -m bench.image [--rounds 5] [--images 4] [--width 64] [--height 64] [--steps 20]
                          [--threads 1] [--device cpu|cuda:N] [--prompt TEXT] [--pipeline DIR]
                          [--workdir DIR] [--keep]

One diffusers pipeline folder (by default the tests' tiny random StableDiffusionPipeline from
tests/fixtures/sd_models.py, written into the work directory by the child of (a); `--pipeline`
benchmarks another folder), one prompt, the same scheduler (euler: EulerDiscreteScheduler from
the pipeline's own config), guidance 7.5, float32, seed i for the i-th image of a round, through
two paths:

  (a) diffusers     a child process (`serve_direct`) that loads the folder with
                    `DiffusionPipeline.from_pretrained(local_files_only=True)` and, per image,
                    calls `pipe(prompt, ..., output_type="pil")` and encodes the PNG: what a
                    script using diffusers does. Timed inside the child, from just before the
                    call to the PNG bytes (the pipe back to this process is not counted). A
                    no-op `callback_on_step_end` notes when the first step ends (microseconds a
                    step; nothing else differs from a plain call).
  (b) rbee worker   the real `rbee-worker --engine diffusers --device cpu` console script,
                    gated on grpc.health.v1 SERVING, LoadModel over gRPC, then one
                    GenerateImage (count 1, no previews) per image with the sync stub on
                    loopback, reading every step-progress message to the final PNG. Timed at
                    this client, from the call to the arrival of the result.

Scale: the defaults (64x64, 20 steps, 1 thread) put one image of the tiny pipeline at about
0.3 s on a 2-core CPU, about 97% of it in the denoising loop (the report prints the split).
The fixture's UNet has no size options, so the knobs are the image size and the steps.

Threads: torch's intra-op threads are process-wide, and DiffusersEngine sets them at load from
`rbee-worker --threads`; the child calls `torch.set_num_threads` with the same number before
loading. Default 1: on a small shared CPU torch's OpenMP workers spin for cores and one thread
is many times faster than two (see DiffusersEngine); `--threads 0` leaves torch's default on
both sides.

Order: both processes start together; one unrecorded warm-up image each; then `--rounds` rounds
of `--images` images per path, the paths alternating (which goes first swaps every round).
Reported per path: median seconds per image, images/s and steps/s from it, the median time to
the first step (the first progress message for (b)), CPU seconds per image of the process that
did the work, and whether the PNG equals (a)'s for the same seed. The target: (b)/(a)
throughput >= 0.97x. Info lines: the same ratio per round (its spread shows the noise), where
(b)'s extra time goes (the engine's own time from ImageResult.timings against the client's),
the CPU the idle side burns while the other works, CPU per image (b)/(a) (less sensitive to
other load than wall time) and the involuntary context switches per image (other load taking
the core). Prints the report and exits 0: a benchmark reports, it does not assert.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import grpc

from bench.catalog import bench_workdir
from bench.console import Progress, command_line
from bench.processes import free_port, stop_process, wait_serving
from rbee.worker.v1 import image_pb2, load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as worker_pb

REPO_ROOT = Path(__file__).resolve().parents[1]
# Short: the tiny pipeline's tokenizer spells one token per character and holds 16 tokens
# (a longer prompt is truncated, with a warning logged on every image).
PROMPT = "a red cube"
SCHEDULER = "euler"  # the fixture's own class; both paths build it from the pipeline's config
GUIDANCE = 7.5
DTYPE = "float32"  # on the CPU; on a GPU both paths run float16 (the worker's default there)


def dtype_for(device: str) -> str:
    """The dtype both paths load the pipeline in on `device`."""
    return DTYPE if device == "cpu" else "float16"


MODEL_NAME = "models/bench-image"
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
TARGET_RATIO = 0.97


@dataclass(frozen=True)
class ImageRequest:
    """One image, the same on both paths."""

    seed: int
    steps: int
    width: int
    height: int
    prompt: str = PROMPT
    guidance: float = GUIDANCE


@dataclass
class ImageRun:
    """One image as its path saw it (seconds from the start of the request)."""

    seconds: float
    first_step: float
    png: bytes
    progress_events: int = 0  # (b): step-progress messages read
    engine_seconds: float | None = None  # (b): ImageResult.timings.total_time
    queue_seconds: float | None = None  # (b): ImageResult.timings.queue_time
    denoise_seconds: float | None = None  # (a): to the end of the last step


# --- (a) diffusers in a child process --------------------------------------------------------


class StepClock:
    """A `callback_on_step_end` that only notes when the first and the last step ended."""

    def __init__(self) -> None:
        self.first = 0.0
        self.last = 0.0

    def on_step_end(self, _pipe: Any, _index: int, _timestep: Any, tensors: Any) -> Any:
        """Called by diffusers after every step; returns the tensors unchanged."""
        self.last = time.perf_counter()
        if not self.first:
            self.first = self.last
        return tensors


def serve_direct(argv: Sequence[str]) -> int:
    """The child of path (a): `FOLDER THREADS [write]`. With `write`, it first writes the
    tests' tiny pipeline into FOLDER and answers {"written": FOLDER}; then it loads FOLDER and
    answers with facts about itself; then one JSON request per stdin line, one JSON answer per
    stdout line, until stdin closes. THREADS 0 leaves torch's default."""
    # Only our answers go to the real stdout; anything the libraries print goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    folder, threads, device = Path(argv[0]), int(argv[1]), argv[2]
    import diffusers
    import torch

    if argv[3:] == ["write"]:
        # Here rather than in the parent: this process imports torch anyway, and the parent
        # (the gRPC client of (b)) stays light.
        from tests.fixtures.sd_models import write_tiny_sd_pipeline

        write_tiny_sd_pipeline(folder)
        answers.write(json.dumps({"written": str(folder)}) + "\n")
        answers.flush()

    if threads:
        torch.set_num_threads(threads)  # before loading, as DiffusersEngine does
    diffusers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    pipe: Any = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        folder,
        local_files_only=True,
        torch_dtype=getattr(torch, dtype_for(device)),
        safety_checker=None,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class: Any = diffusers.EulerDiscreteScheduler
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    ready = {
        "load_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "pipeline": type(pipe).__name__,
        "parameters": sum(
            p.numel()
            for component in pipe.components.values()
            if callable(getattr(component, "parameters", None))
            for p in component.parameters()
        ),
    }
    answers.write(json.dumps(ready) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = ImageRequest(**json.loads(line))
        marks = StepClock()
        generator = torch.Generator("cpu").manual_seed(request.seed)
        t0 = time.perf_counter()
        image = pipe(
            prompt=request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            generator=generator,
            output_type="pil",
            callback_on_step_end=marks.on_step_end,
            callback_on_step_end_tensor_inputs=[],
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
        seconds = time.perf_counter() - t0
        answer = {
            "seconds": seconds,
            "first_step": marks.first - t0 if marks.first else seconds,
            "denoise_seconds": marks.last - t0 if marks.last else seconds,
            "png": base64.b64encode(png).decode("ascii"),
        }
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


class DirectChild:
    """(a): the `serve_direct` child process, one request at a time."""

    label = "(a) diffusers called directly"

    def __init__(
        self, folder: Path, threads: int, device: str, log: Path, *, write: bool = False
    ) -> None:
        self._log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from bench.image import serve_direct; "
                 "sys.exit(serve_direct(sys.argv[1:]))",
                 str(folder), str(threads), device, *(["write"] if write else [])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO_ROOT,
            )  # fmt: skip
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        self.info: dict[str, Any] = {}

    def _answer(self, timeout: float) -> dict[str, Any]:
        # One request, one line: nothing is ever buffered past it, so select() on the pipe is
        # a reliable "a line is coming".
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"the diffusers child did not answer within {timeout} s")
        line = self._stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            tail = self._log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the diffusers child exited with {self.process.returncode}: {tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait_written(self) -> None:
        """Wait until the child has written the tiny pipeline (started with `write`)."""
        self._answer(START_TIMEOUT_S)

    def wait_ready(self) -> dict[str, Any]:
        """Wait until the pipeline is loaded; returns what the child reports about itself."""
        self.info = self._answer(START_TIMEOUT_S)
        return self.info

    def run(self, request: ImageRequest) -> ImageRun:
        """Generate one image in the child."""
        self._stdin.write((json.dumps(dataclasses.asdict(request)) + "\n").encode("utf-8"))
        self._stdin.flush()
        answer = self._answer(REQUEST_TIMEOUT_S)
        return ImageRun(
            seconds=answer["seconds"],
            first_step=answer["first_step"],
            png=base64.b64decode(answer["png"]),
            denoise_seconds=answer["denoise_seconds"],
        )

    def close(self) -> None:
        """Close its stdin (it exits at EOF), then make sure it is gone."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(self.process, grace=5)
        self._stdout.close()


# --- (b) the worker over gRPC ----------------------------------------------------------------


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "rbee-worker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.worker"]


class WorkerPath:
    """(b): the real `rbee-worker --engine diffusers --device cpu`, GenerateImage streamed."""

    label = "(b) rbee worker over gRPC (loopback)"

    def __init__(self, threads: int, device: str, workdir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self._log = workdir / "worker.stderr"
        self._dtype = dtype_for(device)
        command = [*_worker_command(), "--engine", "diffusers", "--device", device,
                   "--listen", self.address, "--metrics-listen", ""]  # fmt: skip
        if threads:
            command += ["--threads", str(threads)]
        with self._log.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "RBEE_HOME": str(workdir / "home")},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO_ROOT,
            )
        self._channel: grpc.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None
        self.load_seconds = 0.0

    def load(self, folder: Path) -> None:
        """Wait for SERVING, then LoadModel over gRPC (until the worker reports READY)."""
        wait_serving(
            self.address, self.process, name="rbee-worker", timeout=START_TIMEOUT_S, log=self._log
        )
        self._channel = grpc.insecure_channel(self.address)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        request = worker_pb.LoadModelRequest(
            model=MODEL_NAME,
            paths=[str(folder)],
            image=load_pb2.ImageLoadOptions(dtype=self._dtype, scheduler=SCHEDULER),
        )
        started = time.perf_counter()
        responses = list(self._stub.LoadModel(request, timeout=START_TIMEOUT_S))
        self.load_seconds = time.perf_counter() - started
        last = responses[-1] if responses else None
        if last is None or last.worker.state != worker_pb.WORKER_STATE_READY:
            raise RuntimeError(f"LoadModel did not end READY: {last}")

    def run(self, request: ImageRequest) -> ImageRun:
        """One GenerateImage, every message read; timed from the call to the result."""
        assert self._stub is not None, "load() first"
        params = image_pb2.ImageParams(
            prompt=request.prompt,
            steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            seed=request.seed,
            scheduler=SCHEDULER,
            count=1,
        )
        call = image_pb2.GenerateImageRequest(model=MODEL_NAME, params=params)
        first_step: float | None = None
        events = 0
        result: image_pb2.ImageResult | None = None
        seconds = 0.0
        t0 = time.perf_counter()
        for message in self._stub.GenerateImage(call, timeout=REQUEST_TIMEOUT_S):
            if message.HasField("progress"):
                if first_step is None:
                    first_step = time.perf_counter() - t0
                events += 1
            else:
                result = message.result
                seconds = time.perf_counter() - t0
        if result is None or len(result.images) != 1:
            raise RuntimeError(f"GenerateImage ended without one image: {result}")
        timings = result.timings
        return ImageRun(
            seconds=seconds,
            first_step=first_step if first_step is not None else seconds,
            png=result.images[0].data,
            progress_events=events,
            engine_seconds=timings.total_time.ToTimedelta().total_seconds(),
            queue_seconds=timings.queue_time.ToTimedelta().total_seconds(),
        )

    def close(self) -> None:
        """Close the channel and stop the worker (SIGTERM, as the pool does)."""
        if self._channel is not None:
            self._channel.close()
        stop_process(self.process)


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat; Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name may hold spaces: the fields start after its closing parenthesis.
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)


def preemptions(pid: int) -> int:
    """Involuntary context switches of a process, summed over its threads (Linux): how often
    the scheduler took a core away from it, a sign of other load on the machine."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # the thread ended meanwhile
        for line in text.splitlines():
            if line.startswith("nonvoluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def pixel_difference(png: bytes, reference: bytes) -> int | None:
    """The largest per-channel difference between two PNGs; None when the sizes differ."""
    import numpy as np
    from PIL import Image

    ours = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    theirs = np.asarray(Image.open(io.BytesIO(reference)).convert("RGB"), dtype=np.int16)
    if ours.shape != theirs.shape:
        return None
    return int(np.abs(ours - theirs).max())


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size


@dataclass
class PathStats:
    """One row: a path's images, with the CPU its process (and the idle other one) used."""

    label: str
    runs: list[ImageRun] = field(default_factory=list)
    differences: list[int | None] = field(default_factory=list)  # vs (a), same seed
    wall_seconds: float = 0.0  # of this path's phases
    busy_cpu_seconds: float = 0.0  # of this path's process during its phases
    other_idle_cpu_seconds: float = 0.0  # of the other path's process meanwhile
    client_cpu_seconds: float = 0.0  # of this benchmark process meanwhile
    preemptions: int = 0  # involuntary context switches of this path's process
    round_seconds: list[float] = field(default_factory=list)  # image seconds summed per round

    def seconds_per_image(self) -> float:
        """Median seconds per image."""
        return statistics.median(run.seconds for run in self.runs)

    def first_step(self) -> float:
        """Median time to the first step."""
        return statistics.median(run.first_step for run in self.runs)

    def cpu_per_image(self) -> float:
        """CPU seconds of this path's process per image."""
        return self.busy_cpu_seconds / len(self.runs) if self.runs else 0.0

    def preemptions_per_image(self) -> float:
        """Involuntary context switches of this path's process per image."""
        return self.preemptions / len(self.runs) if self.runs else 0.0


@dataclass
class BenchConfig:
    """What to run (defaults: the committed benchmark)."""

    rounds: int = 5
    images: int = 4
    width: int = 64
    height: int = 64
    steps: int = 20
    threads: int = 1
    device: str = "cpu"  # "cuda:0", ...: both paths on that GPU, float16
    prompt: str = PROMPT
    pipeline: Path | None = None  # None: write the tests' tiny pipeline into the workdir
    workdir: Path | None = None
    keep: bool = False
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class BenchResult:
    """The rows (a) and (b) and the facts printed above the table."""

    direct: PathStats
    worker: PathStats
    facts: list[tuple[str, str]]
    steps: int
    threads_reported: int
    workdir: Path


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Write (or take) the pipeline, start both processes, run the paths alternating."""
    with bench_workdir("rbee-bench-image-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _measure(
    path: DirectChild | WorkerPath,
    row: PathStats,
    other_pid: int,
    requests: Sequence[ImageRequest],
    reference: dict[int, bytes],
) -> None:
    busy_before, idle_before = cpu_seconds(path.process.pid), cpu_seconds(other_pid)
    preempted_before = preemptions(path.process.pid)
    client_before, wall_before = time.process_time(), time.perf_counter()
    row.round_seconds.append(0.0)
    for request in requests:
        run = path.run(request)
        row.runs.append(run)
        row.round_seconds[-1] += run.seconds
        if request.seed in reference:
            row.differences.append(pixel_difference(run.png, reference[request.seed]))
        else:
            reference[request.seed] = run.png  # (a) sets the reference for each seed
            row.differences.append(0)
    row.wall_seconds += time.perf_counter() - wall_before
    row.client_cpu_seconds += time.process_time() - client_before
    row.busy_cpu_seconds += cpu_seconds(path.process.pid) - busy_before
    row.other_idle_cpu_seconds += cpu_seconds(other_pid) - idle_before
    row.preemptions += preemptions(path.process.pid) - preempted_before


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    write = config.pipeline is None
    folder = (workdir / "tiny-sd-pipeline" if write else config.pipeline or workdir).resolve()
    with contextlib.ExitStack() as stack:
        say("starting the diffusers child and rbee-worker")
        direct = DirectChild(
            folder, config.threads, config.device, workdir / "direct.stderr", write=write
        )
        stack.callback(direct.close)
        worker = WorkerPath(config.threads, config.device, workdir)
        stack.callback(worker.close)
        if write:
            direct.wait_written()
            say(f"the child wrote the tiny pipeline (tests/fixtures/sd_models.py) in {folder}")
        worker.load(folder)
        info = direct.wait_ready()
        say(f"loaded: child {info['load_seconds']:.2f} s, LoadModel {worker.load_seconds:.2f} s")
        rows = {direct: PathStats(direct.label), worker: PathStats(worker.label)}
        pids = {direct: worker.process.pid, worker: direct.process.pid}
        reference: dict[int, bytes] = {}
        warm_up = ImageRequest(seed=10_000, steps=config.steps, width=config.width,
                               height=config.height, prompt=config.prompt)  # fmt: skip
        for path in (direct, worker):
            say(f"warm-up: {path.label}")
            path.run(warm_up)  # caches, allocator, the gRPC connection
        requests = [
            ImageRequest(
                seed=i,
                steps=config.steps,
                width=config.width,
                height=config.height,
                prompt=config.prompt,
            )
            for i in range(config.images)
        ]
        order: list[DirectChild | WorkerPath] = [direct, worker]
        for round_index in range(config.rounds):
            # (a) first in even rounds so its reference PNGs exist before (b) is compared.
            for path in order if round_index % 2 == 0 else order[::-1]:
                say(f"round {round_index + 1}/{config.rounds}: {path.label}")
                _measure(path, rows[path], pids[path], requests, reference)
        facts = _facts(config, folder, info, worker.load_seconds)
    return BenchResult(
        direct=rows[direct],
        worker=rows[worker],
        facts=facts,
        steps=config.steps,
        threads_reported=int(info["threads"]),
        workdir=workdir,
    )


def _facts(
    config: BenchConfig, folder: Path, info: dict[str, Any], worker_load: float
) -> list[tuple[str, str]]:
    source = "tests' tiny random pipeline" if config.pipeline is None else str(folder)
    threads = f"{config.threads}" if config.threads else "torch's default"
    return [
        ("software", f"torch {info['torch']}, diffusers {info['diffusers']}, Python "
                     f"{platform.python_version()}"),
        ("pipeline", f"{info['pipeline']} ({source}), {info['parameters'] / 1e6:.2f}M "
                     f"parameters, {dtype_for(config.device)} on {config.device}"),
        ("request", f"{config.width}x{config.height}, {config.steps} steps, scheduler "
                    f"{SCHEDULER}, guidance {GUIDANCE}, seeds 0..{config.images - 1}, "
                    f"prompt {config.prompt!r}"),
        ("threads", f"torch intra-op threads {threads} on both (worker --threads, child "
                    f"torch.set_num_threads); the child reports {info['threads']}"),
        ("runs", f"{config.rounds} rounds x {config.images} images per path, alternating, "
                 f"after 1 warm-up image each"),
        ("load", f"(a) from_pretrained {info['load_seconds']:.2f} s; (b) LoadModel over gRPC "
                 f"{worker_load:.2f} s"),
    ]  # fmt: skip


# --- the report ------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _image_cell(row: PathStats) -> str:
    if any(diff is None for diff in row.differences):
        return "NO (size)"
    worst = max((diff for diff in row.differences if diff is not None), default=0)
    return "yes" if worst == 0 else f"NO (max diff {worst})"


def render_table(result: BenchResult) -> list[str]:
    """The table of rows (a) and (b), then the target check and where (b)'s time goes."""
    header = ("path", "images", "s/image p50", "images/s", "steps/s", "first step p50",
              "CPU s/image", "throughput vs (a)", "PNG = (a)")  # fmt: skip
    baseline = result.direct.seconds_per_image() if result.direct.runs else 0.0
    table: list[tuple[str, ...]] = [header]
    for row in (result.direct, result.worker):
        if not row.runs:
            table.append((row.label, "0", *("-" for _ in header[2:])))
            continue
        per_image = row.seconds_per_image()
        table.append(
            (
                row.label,
                str(len(row.runs)),
                f"{per_image:.3f}",
                f"{1 / per_image:.2f}",
                f"{result.steps / per_image:.1f}",
                _ms(row.first_step()),
                f"{row.cpu_per_image():.3f}",
                f"{baseline / per_image:.3f}x" if baseline else "-",
                _image_cell(row),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [line(header).rstrip(), line(["-" * width for width in widths]).rstrip()]
    lines += [line(cells).rstrip() for cells in table[1:]]
    lines.append("")
    return lines + _checks(result)


def _checks(result: BenchResult) -> list[str]:
    direct, worker = result.direct, result.worker
    if not direct.runs or not worker.runs:
        return ["targets: not measured"]
    ratio = direct.seconds_per_image() / worker.seconds_per_image()
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    extra_first = worker.first_step() - direct.first_step()
    engine = statistics.median(run.engine_seconds or 0.0 for run in worker.runs)
    queue = statistics.median(run.queue_seconds or 0.0 for run in worker.runs)
    outside = statistics.median(
        run.seconds - (run.engine_seconds or 0.0) - (run.queue_seconds or 0.0)
        for run in worker.runs
    )
    denoise = statistics.median(run.denoise_seconds or 0.0 for run in direct.runs)
    events = sorted({run.progress_events for run in worker.runs})
    per_round = sorted(
        a / b for a, b in zip(direct.round_seconds, worker.round_seconds, strict=True) if b > 0
    )
    lines = [
        f"target (b) >= {TARGET_RATIO:.2f}x (a) images/s: {ratio:.3f}x  {verdict}",
        f"  (info) the same ratio per round (each round's images, (a) and (b) back to back): "
        f"min {per_round[0]:.3f}x, median {statistics.median(per_round):.3f}x, max "
        f"{per_round[-1]:.3f}x",
        f"worker's extra time to the first step: {extra_first * 1000:+.1f} ms (first "
        f"progress message at the client vs (a)'s first step end)",
        f"  (info) (a) denoising p50 {denoise:.3f} s of {direct.seconds_per_image():.3f} s "
        f"(the rest: VAE decode, postprocess, PNG)",
        f"  (info) (b) per image p50: engine {engine:.3f} s (ImageResult.timings.total_time), "
        f"queue {_ms(queue)}, outside the engine (gRPC, asyncio, result transfer) "
        f"{_ms(outside)}; {'/'.join(map(str, events))} progress messages per image",
        f"  (info) idle side's CPU while the other worked: worker "
        f"{_percent(worker.other_idle_cpu_seconds, direct.wall_seconds)} of a core during "
        f"(a), child {_percent(direct.other_idle_cpu_seconds, worker.wall_seconds)} during "
        f"(b); this client {worker.client_cpu_seconds / len(worker.runs) * 1000:.1f} ms CPU "
        f"per (b) image",
        f"  (info) CPU s/image (b)/(a): {_ratio(worker.cpu_per_image(), direct.cpu_per_image())}; "
        f"involuntary context switches per image (a) {direct.preemptions_per_image():.0f}, "
        f"(b) {worker.preemptions_per_image():.0f} (many: other load on the machine took "
        f"the core, and wall times are noisy)",
    ]
    return lines


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}x" if baseline > 0 else "-"


def _percent(cpu: float, wall: float) -> str:
    return f"{100 * cpu / wall:.1f}%" if wall > 0 else "-"


def render_report(result: BenchResult, command: str) -> str:
    """The plain-text report: command, date, machine, facts, the table and the checks."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs ({usable} usable), "
        f"{platform.processor() or platform.machine()}",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "notes:    s/image = (a) inside the child, pipeline call to PNG bytes; (b) at the",
        "          client, GenerateImage call to the result message. Medians over every image;",
        "          images/s and steps/s from the median. CPU = the working process's CPU time.",
        "",
    ]
    return "\n".join(lines + render_table(result))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--images", type=int, default=4, help="images per path and round")
    parser.add_argument("--width", type=int, default=64, help="image width (multiple of 8)")
    parser.add_argument("--height", type=int, default=64, help="image height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on both paths (0: torch's default)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda:N: both paths on it (float16 on a GPU)"
    )
    parser.add_argument("--prompt", default=PROMPT, help="the prompt of every image")
    parser.add_argument(
        "--pipeline", type=Path, default=None, help="a diffusers folder instead of the tiny one"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to write files")
    parser.add_argument("--keep", action="store_true", help="keep the pipeline and logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 0 whatever the target says."""
    args = parse_args(argv)
    progress = Progress()

    config = BenchConfig(
        rounds=max(1, args.rounds),
        images=max(1, args.images),
        width=args.width,
        height=args.height,
        steps=max(1, args.steps),
        threads=max(0, args.threads),
        device=args.device,
        prompt=args.prompt,
        pipeline=args.pipeline,
        workdir=args.workdir,
        keep=args.keep,
        progress=progress,
    )
    result = run_benchmark(config)
    command = command_line("bench.image", argv)
    print(render_report(result, command))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
