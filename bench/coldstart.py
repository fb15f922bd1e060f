"""Cold-start benchmark (issue 5): spawn-to-first-token from cold files against preloaded ones.

    python -m bench.coldstart [--size 512MiB] [--rounds 3] [--device devices/cpu]
                              [--workdir DIR] [--keep]

One real llama GGUF of `--size` bytes (f16, random weights, written by the tests' fixture
`write_tiny_llama_gguf`; the dimensions are chosen so the file is at least that size: 1024-wide,
15 layers and an 8192-token vocabulary for the default 512 MiB) is written into the work
directory (by default under the system temp directory: the report says which filesystem and
device that is, and a tmpfs makes the run INVALID, since its pages cannot be evicted). The real
`rbee-catalog`, `rbee-provisioner` and `rbee-pool` console scripts are started on free loopback
ports with the environment `rbee up` gives them (rbee_client.cli.mesh.environment), each gated
on grpc.health.v1 SERVING, and the file is registered in the catalog in place (READY).

Three phases per round, their order rotated every round:

  (a) cold          evict the file from the page cache, then SpawnWorker(model) and one
                    Generate of 1 token (max_tokens 1, ignore_eos, greedy) on the new worker.
  (b) cold+preload  evict, then SpawnWorker(model, preload=True): the pool has the provisioner
                    read the file into the page cache (PRELOADING) alongside the worker's start
                    and load; the preload's time is INSIDE the measurement.
  (c) preloaded     evict, then the provisioner's Preload RPC to its end (timed apart, NOT in
                    the measurement), then SpawnWorker(model) without preload: the "model
                    already warm" case.

Measured: from the SpawnWorker call to the arrival of the first token delta of the Generate
(the spawn stream read to its final Worker, a channel to the worker opened, the request sent).
Then the worker is deleted (stopped first) so nothing maps the file before the next eviction.

Eviction: the provisioner's preload record is deleted (DeletePreload, which advises DONTNEED
too), then `posix_fadvise(POSIX_FADV_DONTNEED)` on the file (services.provisioner.preload), and
`mincore` must then find at most 3% of it resident; otherwise the filesystem does not honour
DONTNEED, and the run is marked INVALID. Residency is also measured after the Preload of (c)
and after every first token.

llama.cpp maps the model (use_mmap): from cold files its load reads them from the disk as the
pages are touched (it also advises WILLNEED on the mapping), so the cold phase's LOADING span
is disk-bound; the report gives bytes / that span, and bytes / the Preload of (c) (a plain
sequential read), as the observed disk read rates. The report also splits every phase into the
pool's stages (first event of each, medians): preload, process start (rbee-worker exec to
SERVING), load (LoadModel), and first token (Generate): what a preload can and cannot save.

Warm spares (on by default; `--no-spares` turns them off): the pool keeps a worker process
that has already started (interpreter, imports) for the next spawn like the last one
(services.worker.pool.spares). Before each phase the benchmark waits until the pool's
rbee_pool_spare_workers gauge says one is ready, so every measured spawn takes it; the report
counts how many did. The spare holds nothing of the model, so it changes neither (a)'s disk
reads nor what (c)'s preload saves: it removes the fixed cost both pay.

Target (the issue's): (c) at least 2x faster to the first token than (a). Prints the report
and exits 0: a benchmark reports, it does not assert.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc

from bench.catalog import bench_workdir
from bench.console import Progress, command_line
from bench.download import parse_size
from bench.processes import free_port, stop_process, wait_serving
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import load_pb2, pool_pb2_grpc, worker_pb2_grpc
from rbee.worker.v1 import pool_pb2 as pool_pb
from rbee_client.catalog import CatalogClient
from rbee_client.cli.mesh import Service, environment
from rbee_client.provisioner import ProvisionerClient
from services.catalog.domain import ModelState
from services.provisioner.preload import drop_from_page_cache, file_resident_bytes
from services.worker.pool.service import WARM_START_NOTE
from tests.fixtures.gguf_models import write_tiny_llama_gguf

MODEL_ID = "bench-coldstart"
MODEL_NAME = f"models/{MODEL_ID}"
PRELOAD_NAME = f"preloads/{MODEL_ID}"
DEFAULT_SIZE = 512 * 2**20
DEFAULT_DEVICE = "devices/cpu"
CONTEXT_LENGTH = 256  # the same small KV cache in every phase: the weights are the point
PROMPT = "hello world"
SEED = 7
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0
EVICTED_MAX_FRACTION = 0.03  # more than this still resident after DONTNEED: not honoured
TARGET_SPEEDUP = 2.0
NO_EVICTION_FILESYSTEMS = ("tmpfs", "ramfs")  # the page cache is their storage

COLD, PRELOAD_SPAWN, WARM = "cold", "preload-spawn", "warm"
LABELS = {
    COLD: "(a) cold: SpawnWorker",
    PRELOAD_SPAWN: "(b) cold: SpawnWorker(preload=True)",
    WARM: "(c) preloaded: Preload, then SpawnWorker",
}
_STAGE_NAMES: dict[int, str] = {
    int(value): name.removeprefix("SPAWN_STAGE_").lower()
    for name, value in pool_pb.SpawnStage.items()
}


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The shape of the generated llama model (f16 2-D weights, F32 norms)."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int

    @property
    def parameters(self) -> int:
        """Weights of the model (the token embedding and the output matrix included)."""
        per_layer = 4 * self.n_embd**2 + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return 2 * self.n_vocab * self.n_embd + self.n_layer * per_layer + self.n_embd

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"llama, {self.n_layer} layers, n_embd {self.n_embd}, n_ff {self.n_ff}, "
            f"{self.n_head} heads (no GQA), vocab {self.n_vocab}, "
            f"{self.parameters / 1e6:.0f}M parameters, f16"
        )


def model_dims(size: int) -> ModelDims:
    """Dimensions whose f16 GGUF is at least `size` bytes: the width grows with the size (so a
    10 MB smoke model is still several layers deep), then layers are added until it fits."""
    n_embd = 1024 if size >= 256 * 2**20 else 512 if size >= 32 * 2**20 else 256
    n_vocab, n_ff = 8 * n_embd, 4 * n_embd
    embeddings = 2 * n_vocab * n_embd * 2  # token_embd and output, f16
    per_layer = (4 * n_embd**2 + 3 * n_embd * n_ff) * 2
    n_layer = max(1, math.ceil((size - embeddings) / per_layer))
    return ModelDims(n_vocab, n_embd, n_layer, n_embd // 64, n_ff)


def write_model(path: Path, dims: ModelDims) -> Path:
    """Write the loadable llama GGUF of `dims` at `path` (fsynced, so its pages are clean and
    can be evicted)."""
    write_tiny_llama_gguf(
        path,
        n_vocab=dims.n_vocab,
        n_embd=dims.n_embd,
        n_layer=dims.n_layer,
        n_head=dims.n_head,
        n_head_kv=dims.n_head,
        n_ff=dims.n_ff,
        n_ctx=2 * CONTEXT_LENGTH,
        dtype="f16",
        name="bench-coldstart",
        seed=SEED,
    )
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return path


# --- where the file lies ---------------------------------------------------------------------


@dataclass(frozen=True)
class Filesystem:
    """The mount holding a path: its type, device and mount point, and its free space."""

    kind: str
    device: str
    mount: str
    free_bytes: int

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"{self.kind} on {self.device} mounted at {self.mount}, "
            f"{self.free_bytes / 2**30:.0f} GiB free"
        )


def filesystem_of(path: Path) -> Filesystem:
    """The longest /proc/mounts entry containing `path` (Linux), with os.statvfs's free bytes."""
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    best = ("", "unknown", "unknown")
    resolved = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        device, mount, kind = line.split()[:3]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, kind, device)
    return Filesystem(kind=best[1], device=best[2], mount=best[0] or "?", free_bytes=free)


def block_device_model(device: str) -> str:
    """What the kernel says the disk is (/sys/class/block/DISK/device/model), else "unknown";
    a virtio disk (vdX) says so, since the host may cache it."""
    entry = Path("/sys/class/block") / Path(device).name
    try:
        disk = entry.resolve()
    except OSError:
        return "unknown"
    if (disk / "partition").exists():
        disk = disk.parent  # a partition: its disk holds the model
    for candidate in (disk / "device" / "model", disk / "device" / "name"):
        try:
            return candidate.read_text().strip()
        except OSError:
            continue
    if disk.name.startswith("vd"):
        return f"{disk.name}, a virtio block device (the host may cache it)"
    return "unknown"


# --- the services ----------------------------------------------------------------------------


@dataclass
class Mesh:
    """The running catalog, provisioner and pool."""

    catalog: str
    provisioner: str
    pool: str
    pool_metrics: str  # the pool's /metrics URL


@contextmanager
def running_mesh(home: Path, logs: Path, *, spares: bool = True) -> Iterator[Mesh]:
    """`rbee-catalog`, `rbee-provisioner`, `rbee-pool` beside this interpreter, on free ports,
    with the environment `rbee up` gives them; each gated on SERVING; stopped in reverse.
    `spares` False: the pool keeps no warm spare."""
    services = [
        Service("catalog", free_port(), None),
        Service("provisioner", free_port(), None),
        Service("pool", free_port(), free_port()),
    ]
    env = {
        **os.environ,
        **environment(services, home),
        "RBEE_LOG_LEVEL": os.environ.get("RBEE_LOG_LEVEL", "WARNING"),
        "RBEE_POOL_SPARE_DEVICE_KINDS": '["cpu", "cuda", "metal"]' if spares else "[]",
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for service in services:
            log = logs / f"{service.name}.log"
            with log.open("wb") as stderr:
                process = subprocess.Popen(
                    service.command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            processes.append(process)
            wait_serving(
                service.address,
                process,
                name=f"rbee-{service.name}",
                timeout=START_TIMEOUT_S,
                log=log,
            )
        catalog, provisioner, pool = (service.address for service in services)
        yield Mesh(
            catalog, provisioner, pool, f"http://127.0.0.1:{services[2].metrics_port}/metrics"
        )
    finally:
        for process in reversed(processes):
            stop_process(process)


# --- one phase -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One phase of one round."""

    seconds: float  # SpawnWorker call -> first token delta
    stages: dict[str, float]  # spawn stage -> first event (s from the call); "worker", "token"
    resident_after_evict: int
    resident_after: int  # after the first token, the worker still running
    evict_honoured: bool
    warm_start: bool = False  # the worker process was a warm spare (STARTING says so)
    preload_seconds: float | None = None  # (c): the separate Preload RPC (not in `seconds`)
    resident_after_preload: int | None = None  # (c)

    def span(self, start: str, end: str) -> float | None:
        """Seconds between two marks, None when either is missing."""
        if start in self.stages and end in self.stages:
            return self.stages[end] - self.stages[start]
        return None


@dataclass
class Phase:
    """What a phase needs: the services, the file, the worker's device."""

    mesh: Mesh
    path: Path
    device: str
    spawn_timeout: float
    spares: bool = True


def evict(phase: Phase) -> tuple[int, bool]:
    """Drop the file from the page cache; (bytes still resident, whether DONTNEED worked)."""
    with ProvisionerClient(phase.mesh.provisioner, timeout=CALL_TIMEOUT_S) as provisioner:
        provisioner.delete_preload(PRELOAD_NAME, allow_missing=True)  # its record goes too
    drop_from_page_cache([phase.path])
    resident = file_resident_bytes(phase.path)
    if resident is None:
        raise RuntimeError("mincore cannot measure residency here: nothing would prove cold")
    size = phase.path.stat().st_size
    return resident, resident <= EVICTED_MAX_FRACTION * size


def preload(phase: Phase) -> float:
    """The provisioner's Preload RPC, read to its terminal Preload; its seconds."""
    with ProvisionerClient(phase.mesh.provisioner, timeout=CALL_TIMEOUT_S) as provisioner:
        start = time.perf_counter()
        for _event in provisioner.preload(MODEL_NAME, timeout=phase.spawn_timeout):
            pass
        return time.perf_counter() - start


def spawn_to_first_token(
    phase: Phase, worker_id: str, *, with_preload: bool = False
) -> tuple[float, dict[str, float], str, bool]:
    """SpawnWorker, then Generate 1 token on the new worker: (seconds from the SpawnWorker call
    to the first token delta, the marks, the worker's name, whether it started warm)."""
    request = pool_pb.SpawnWorkerRequest(
        worker_id=worker_id,
        model=MODEL_NAME,
        device=phase.device,
        llm=load_pb2.LlmLoadOptions(context_length=CONTEXT_LENGTH),
        preload=with_preload,
    )
    generate = gen_pb.GenerateRequest(
        model=MODEL_NAME,
        prompt=PROMPT,
        sampling=gen_pb.SamplingParams(temperature=0.0, seed=SEED),
        stopping=gen_pb.StoppingCriteria(max_tokens=1, ignore_eos=True),
    )
    stages: dict[str, float] = {}
    name = endpoint = ""
    first_token: float | None = None
    completion_tokens = -1
    warm = False
    with grpc.insecure_channel(phase.mesh.pool) as pool_channel:
        pool = pool_pb2_grpc.PoolServiceStub(pool_channel)
        start = time.perf_counter()
        for message in pool.SpawnWorker(request, timeout=phase.spawn_timeout):
            now = time.perf_counter() - start
            if message.HasField("worker"):
                stages["worker"] = now
                name, endpoint = message.worker.name, message.worker.endpoint
            else:
                stages.setdefault(_STAGE_NAMES.get(message.progress.stage, "unknown"), now)
                if message.progress.stage == pool_pb.SPAWN_STAGE_STARTING:
                    warm = warm or message.progress.message.endswith(WARM_START_NOTE)
        if not endpoint:
            raise RuntimeError("SpawnWorker ended without a worker")
        with grpc.insecure_channel(endpoint) as worker_channel:
            worker = worker_pb2_grpc.WorkerServiceStub(worker_channel)
            for reply in worker.Generate(generate, timeout=CALL_TIMEOUT_S):
                if first_token is None and reply.HasField("delta") and reply.delta.token_ids:
                    first_token = time.perf_counter() - start
                elif reply.HasField("result"):
                    completion_tokens = reply.result.usage.completion_tokens
    if first_token is None or completion_tokens != 1:
        raise RuntimeError(f"Generate streamed no token delta ({completion_tokens} tokens)")
    stages["token"] = first_token
    return first_token, stages, name, warm


def spare_count(phase: Phase) -> float:
    """The pool's rbee_pool_spare_workers gauge (ready warm spares)."""
    with urllib.request.urlopen(phase.mesh.pool_metrics, timeout=CALL_TIMEOUT_S) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("rbee_pool_spare_workers "):
            return float(line.split()[1])
    raise RuntimeError("the pool's metrics have no rbee_pool_spare_workers")


def wait_for_spare(phase: Phase, limit_s: float = 60.0) -> None:
    """Until the pool has a ready warm spare: the phase then measures a warm start, and the
    spare's own imports do not share the CPU with the phase."""
    deadline = time.monotonic() + limit_s
    while spare_count(phase) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool had no warm spare ready within {limit_s:.0f} s")
        time.sleep(0.1)


def delete_worker(phase: Phase, name: str) -> None:
    """Stop (SIGTERM, the pool's grace) and delete the worker: its mapping of the file goes."""
    with grpc.insecure_channel(phase.mesh.pool) as channel:
        pool = pool_pb2_grpc.PoolServiceStub(channel)
        pool.DeleteWorker(
            pool_pb.DeleteWorkerRequest(name=name, force=True), timeout=CALL_TIMEOUT_S
        )


def run_phase(phase: Phase, key: str, round_index: int) -> Measurement:
    """One phase: (wait for the warm spare,) evict, (preload,) spawn and generate, measure
    residency, delete the worker."""
    if phase.spares:
        wait_for_spare(phase)
    resident_evicted, honoured = evict(phase)
    preload_seconds: float | None = None
    resident_preloaded: int | None = None
    if key == WARM:
        preload_seconds = preload(phase)
        resident_preloaded = file_resident_bytes(phase.path)
    worker_id = f"coldstart-{round_index + 1}-{key}"
    seconds, stages, name, warm = spawn_to_first_token(
        phase, worker_id, with_preload=key == PRELOAD_SPAWN
    )
    try:
        resident_after = file_resident_bytes(phase.path) or 0
    finally:
        delete_worker(phase, name)
    return Measurement(
        seconds=seconds,
        stages=stages,
        resident_after_evict=resident_evicted,
        resident_after=resident_after,
        evict_honoured=honoured,
        warm_start=warm,
        preload_seconds=preload_seconds,
        resident_after_preload=resident_preloaded,
    )


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class PhaseStats:
    """One row: a phase's rounds."""

    key: str
    label: str
    runs: list[Measurement] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        """Whether at least one round was measured."""
        return bool(self.runs)

    def median_seconds(self) -> float:
        """Median spawn-to-first-token over rounds."""
        return statistics.median(run.seconds for run in self.runs)

    def median_span(self, start: str, end: str) -> float | None:
        """Median over rounds of the seconds between two marks (None if never both seen)."""
        spans = [s for run in self.runs if (s := run.span(start, end)) is not None]
        return statistics.median(spans) if spans else None

    def median_preload(self) -> float | None:
        """(c): median seconds of the separate Preload RPC."""
        values = [run.preload_seconds for run in self.runs if run.preload_seconds is not None]
        return statistics.median(values) if values else None


@dataclass
class BenchConfig:
    """What to run."""

    size: int = DEFAULT_SIZE
    rounds: int = 3
    device: str = DEFAULT_DEVICE
    workdir: Path | None = None
    keep: bool = False
    spares: bool = True  # the pool's warm spares (services.worker.pool.spares)
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class BenchResult:
    """The rows (a), (b), (c), the file, and the facts printed above the table."""

    rows: dict[str, PhaseStats]
    facts: list[tuple[str, str]]
    size: int  # bytes of the GGUF file
    filesystem: Filesystem
    workdir: Path

    @property
    def evictions_honoured(self) -> bool:
        """Whether every eviction left at most EVICTED_MAX_FRACTION of the file resident."""
        return all(run.evict_honoured for row in self.rows.values() for run in row.runs)

    @property
    def valid(self) -> bool:
        """A run is valid when the file could be evicted before every phase."""
        return self.evictions_honoured and self.filesystem.kind not in NO_EVICTION_FILESYSTEMS

    def invalid_reason(self) -> str:
        """Why the run is invalid ("" when it is valid)."""
        if self.filesystem.kind in NO_EVICTION_FILESYSTEMS:
            return (
                f"the work directory is on {self.filesystem.kind}, whose pages cannot be "
                "evicted: use --workdir on a disk"
            )
        if not self.evictions_honoured:
            return (
                f"the filesystem ({self.filesystem.kind}) did not honour POSIX_FADV_DONTNEED: "
                f"more than {EVICTED_MAX_FRACTION:.0%} of the file stayed resident"
            )
        return ""


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Write the model, start the services, run every phase each round."""
    with bench_workdir("rbee-bench-coldstart-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    dims = model_dims(config.size)
    path = workdir / "models" / "bench-coldstart.gguf"
    path.parent.mkdir()
    say(f"writing the model ({dims.describe()})")
    write_model(path, dims)
    size = path.stat().st_size
    filesystem = filesystem_of(path)
    logs = workdir / "logs"
    logs.mkdir()
    load_start = os.getloadavg()[0]
    rows = {key: PhaseStats(key, label) for key, label in LABELS.items()}
    say("starting rbee-catalog, rbee-provisioner and rbee-pool")
    with running_mesh(workdir / "home", logs, spares=config.spares) as mesh:
        with CatalogClient(mesh.catalog) as catalog:
            model = catalog.register_local(str(path), model_id=MODEL_ID)
        if model.state is not ModelState.READY:
            raise RuntimeError(f"{MODEL_NAME} is {model.state.value}: {model.state_message}")
        # The pool's own deadline is 60 s plus the size at 100 MB/s; ours is wider.
        phase = Phase(
            mesh, path, config.device, spawn_timeout=300.0 + size / 20e6, spares=config.spares
        )
        # One unrecorded spawn first: the worker's interpreter, modules and llama.cpp library
        # are then in the page cache for every phase; only the model's file is evicted.
        say("warm-up spawn (not recorded)")
        warm_up = time.perf_counter()
        _seconds_taken, _stages, name, _warm = spawn_to_first_token(phase, "coldstart-warm-up")
        delete_worker(phase, name)
        warm_up = time.perf_counter() - warm_up
        order = list(LABELS)
        for round_index in range(config.rounds):
            shift = round_index % len(order)
            for key in order[shift:] + order[:shift]:
                measurement = run_phase(phase, key, round_index)
                rows[key].runs.append(measurement)
                say(
                    f"round {round_index + 1}/{config.rounds}: {LABELS[key]}: "
                    f"{measurement.seconds:.2f} s to the first token (process start "
                    f"{_seconds(measurement.span('starting', 'loading'))}, load "
                    f"{_seconds(measurement.span('loading', 'ready'))}; resident after "
                    f"eviction {_percent(measurement.resident_after_evict, size)})"
                )
    facts = [
        ("model", f"{path.name}, {size:,} bytes ({size / 2**20:.1f} MiB, {size / 1e6:.0f} MB); "
                  f"{dims.describe()}"),
        ("disk", f"{workdir} on {filesystem.describe()}; device: "
                 f"{block_device_model(filesystem.device)}"),
        ("worker", f"{config.device}, llama-cpp-python {_version('llama_cpp_python')}, "
                   f"context {CONTEXT_LENGTH}, use_mmap (the default), prompt {PROMPT!r}, "
                   "max_tokens 1, ignore_eos, temperature 0"),
        ("rounds", f"{config.rounds}, phase order rotated each round, after one unrecorded "
                   f"warm-up spawn ({warm_up:.2f} s with the file cached: the worker's code is "
                   "then cached for every phase, only the model is evicted); medians reported"),
        ("spares", _spares_fact(config.spares, rows)),
        ("eviction", "DeletePreload, then posix_fadvise(DONTNEED) on the file, checked with "
                     f"mincore (at most {EVICTED_MAX_FRACTION:.0%} resident, else INVALID)"),
        ("load", f"1-minute load average {load_start:.2f} before, {os.getloadavg()[0]:.2f} "
                 f"after, on {os.cpu_count()} CPUs (other work on a shared machine skews "
                 "every row)"),
    ]  # fmt: skip
    return BenchResult(rows, facts, size, filesystem, workdir)


def _spares_fact(spares: bool, rows: dict[str, PhaseStats]) -> str:
    runs = [run for row in rows.values() for run in row.runs]
    warm = sum(1 for run in runs if run.warm_start)
    if not spares:
        return f"off (RBEE_POOL_SPARE_DEVICE_KINDS=[]): {warm} of {len(runs)} spawns started warm"
    return (
        f"on: before each phase the pool's warm spare is ready (its interpreter and llama_cpp "
        f"imported, nothing of the model); {warm} of {len(runs)} measured spawns started from it"
    )


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "n/a"


# --- the report ------------------------------------------------------------------------------


def _percent(resident: int | None, size: int) -> str:
    if resident is None:
        return "-"
    return f"{resident / size:.0%}" if size else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _rate(size: int, seconds: float | None) -> str:
    if not seconds:
        return "-"
    return f"{size / 1e6 / seconds:,.0f} MB/s"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def render_table(result: BenchResult, command: str) -> str:
    """The plain-text report: command, date, machine, facts, the table, stages, targets."""
    size = result.size
    cold = result.rows[COLD]
    header = ("phase", "median", "rounds (s)", "speed-up vs (a)", "resident after evict",
              "after preload", "after 1st token")  # fmt: skip
    table: list[tuple[str, ...]] = [header]
    for row in result.rows.values():
        if not row.measured:
            table.append((row.label, "n/a", *("-" for _ in header[2:])))
            continue
        speedup = f"{cold.median_seconds() / row.median_seconds():.2f}x" if cold.measured else "-"
        preloaded = [run.resident_after_preload for run in row.runs]
        table.append(
            (
                row.label,
                f"{row.median_seconds():.2f} s",
                " / ".join(f"{run.seconds:.2f}" for run in row.runs),
                speedup,
                " / ".join(_percent(run.resident_after_evict, size) for run in row.runs),
                " / ".join(_percent(value, size) for value in preloaded)
                if any(value is not None for value in preloaded)
                else "-",
                " / ".join(_percent(run.resident_after, size) for run in row.runs),
            )
        )
    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, "
        f"{_total_ram() / 2**30:.0f} GiB RAM, Python {platform.python_version()}",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "notes:    time from the SpawnWorker call to the first token delta of a 1-token",
        "          Generate on the new worker (spawn stream, channel and request included).",
        "          (b)'s preload is inside its time; (c)'s Preload runs before the clock starts.",
        "          Residency (mincore) as a share of the file, per round.",
        "",
        *_aligned(table),
        "",
        *render_stages(result),
        "",
        *render_targets(result),
    ]
    return "\n".join(lines)


def _aligned(table: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return [
        line(table[0]).rstrip(),
        line(["-" * width for width in widths]).rstrip(),
        *(line(cells).rstrip() for cells in table[1:]),
    ]


def render_stages(result: BenchResult) -> list[str]:
    """Where each phase's time goes (the pool's stages, first event of each; medians)."""
    header = ("phase", "to STARTING", "preload", "process start", "load", "1st token")
    table: list[tuple[str, ...]] = [header]
    for row in result.rows.values():
        if not row.measured:
            continue
        preload = (
            f"({_seconds(row.median_preload())} before)"
            if row.key == WARM
            else _seconds(row.median_span("preloading", "starting"))
        )
        table.append(
            (
                row.label,
                _seconds(row.median_span("validating", "starting")),
                preload,
                _seconds(row.median_span("starting", "loading")),
                _seconds(row.median_span("loading", "ready")),
                _seconds(row.median_span("ready", "token")),
            )
        )
    lines = [
        "by stage (medians): 'to STARTING' = validating + installing (+ (b)'s preload);",
        "'process start' = rbee-worker exec to SERVING; 'load' = LoadModel (llama.cpp maps and",
        "reads the file); '1st token' = READY to the first token delta (Generate).",
        "",
        *_aligned(table),
    ]
    cold, warm = result.rows[COLD], result.rows[WARM]
    lines.append("")
    if cold.measured:
        cold_load = cold.median_span("loading", "ready")
        loads = " / ".join(_seconds(run.span("loading", "ready")) for run in cold.runs)
        lines.append(
            f"disk read (cold): {size_text(result.size)} / (a)'s load {_seconds(cold_load)} = "
            f"{_rate(result.size, cold_load)} (per round: {loads})"
        )
    if warm.measured:
        preloads = " / ".join(_seconds(run.preload_seconds) for run in warm.runs)
        lines.append(
            f"disk read (cold, sequential): the Preload of (c) {_seconds(warm.median_preload())}"
            f" = {_rate(result.size, warm.median_preload())} (per round: {preloads}); (c)'s "
            f"load from the page cache {_seconds(warm.median_span('loading', 'ready'))}"
        )
        start = warm.median_span("starting", "loading")
        if start is not None:
            lines.append(
                f"fixed cost no preload removes: process start {_seconds(start)} of (c)'s "
                f"{_seconds(warm.median_seconds())}"
            )
    return lines


def size_text(size: int) -> str:
    """`537 MB` (1 MB = 1e6 bytes)."""
    return f"{size / 1e6:,.0f} MB"


def render_targets(result: BenchResult) -> list[str]:
    """The issue's target with PASS/MISS, or INVALID when the file could not be evicted."""
    cold, warm, inline = result.rows[COLD], result.rows[WARM], result.rows[PRELOAD_SPAWN]
    if not (cold.measured and warm.measured):
        return ["target: not measured"]
    lines = []
    if not result.valid:
        lines.append(f"INVALID: {result.invalid_reason()}")
    if inline.measured:
        ratio = cold.median_seconds() / inline.median_seconds()
        lines.append(f"info   (b) preload inside the spawn vs (a): {ratio:.2f}x")
    ratio = cold.median_seconds() / warm.median_seconds()
    verdict = _verdict(ratio >= TARGET_SPEEDUP) if result.valid else "INVALID"
    large = "" if result.size >= 500 * 10**6 else " (file under 500 MB: not the issue's scale)"
    lines.append(
        f"target (c) preloaded >= {TARGET_SPEEDUP:.0f}x faster to the first token than (a) "
        f"cold{large}: {ratio:.2f}x  {verdict}"
    )
    return lines


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# --- the command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults are the issue's numbers)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.coldstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size", type=parse_size, default=DEFAULT_SIZE, help="model file size (default 512MiB)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every phase)")
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help="the worker's device (default devices/cpu)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the model is written (a real disk)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--no-spares",
        action="store_true",
        help="the pool keeps no warm spare: every worker process starts cold",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 0 whatever the target says."""
    args = parse_args(argv)
    progress = Progress()
    config = BenchConfig(
        size=args.size,
        rounds=max(1, args.rounds),
        device=args.device,
        workdir=args.workdir,
        keep=args.keep,
        spares=not args.no_spares,
        progress=progress,
    )
    result = run_benchmark(config)
    print(render_table(result, command_line("bench.coldstart", argv)))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
