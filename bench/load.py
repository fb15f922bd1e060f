"""Load benchmark (issue 7): concurrent Generate streams on one worker plus a steady rate of
catalog RPCs, with errors, latencies and resident memory before and after.

    python -m bench.load [--seconds 60] [--streams 64] [--catalog-rps 1000] [--models 1000]
                         [--tokens 16] [--queue-size N] [--warmup 5] [--decode]
                         [--workdir DIR] [--keep]

What runs, each as clients meet it (console scripts in their own processes, gated on
grpc.health.v1 SERVING, stopped with SIGTERM):

- one real `rbee-worker --engine llama_cpp` on the CPU with a tiny generated llama GGUF loaded
  at start-up; `--streams` clients each stream Generate (`--tokens` tokens, ignore_eos) back to
  back for the whole run. A worker runs one generation at a time and queues the rest FIFO (the
  design): its queue is raised to `--queue-size` (default: `--streams`, so every stream queues
  and none is refused). With a smaller queue the excess fails at once with RESOURCE_EXHAUSTED /
  QUEUE_FULL, which the report counts as "expected (by design)", never as an error.
- one real `rbee-catalog` holding `--models` generated models (bench.catalog's realistic
  entries, written through the store's bulk path before the catalog starts), driven open-loop
  at `--catalog-rps`: every 1/rate seconds one RPC is sent, whatever the previous ones are doing
  (at most MAX_IN_FLIGHT outstanding; beyond that a send is skipped and counted as "late").
  The mix: 50% GetModel, 30% ListModels (page of 50, every other one filtered by state),
  20% EvaluateCompatibility on models that carry metadata. The client checks each call's
  status but does not decode the response bodies (`--decode` does): decoding is the client's
  work, not the catalog's, and on this one machine the client's CPU is taken from the
  catalog's (a 50-model ListModels page costs the client ~0.2 ms to decode).

Before the load, the catalog is asked for every model once (GetModel, and EvaluateCompatibility
where it has metadata), so its bounded answer caches are full before anything is measured (see
`warm_catalog`). Both loads then start together. The first `--warmup` seconds are not measured
(allocator arenas, the first 64 streams' buffers); resident memory (VmRSS) of the worker and
the catalog is read before any load, at the end of the warm-up ("before") and at the end
("after"), and sampled for its peak in between. Latencies: GetModel etc. from send to
response; a Generate stream from send to its final message (queue wait included), and its time
to first token.
Errors are counted by status code and ErrorInfo reason. The CPU time (utime + stime) each
process used during the measured window is reported too (the worker, the catalog, this load
client): on a shared 2-core machine that, not the wall clock, says what each RPC costs.
Prints a table and exits 0: a benchmark reports, it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bench.catalog import bench_workdir, build_models, percentile, populate_rbee
from bench.console import Progress, command_line
from bench.processes import (
    RssSampler,
    cpu_seconds,
    free_port,
    resident_bytes,
    stop_process,
    wait_serving,
)
from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import worker_pb2_grpc
from services.catalog.domain import ModelState
from services.common.channels import open_aio_channel, open_channel
from services.common.server import prepare_heap_for_serving
from tests.fixtures.gguf_models import write_tiny_llama_gguf

MODEL_NAME = "models/bench-load"
PROMPT = "the load test says"
START_TIMEOUT_S = 120.0
RPC_TIMEOUT_S = 30.0
MAX_IN_FLIGHT = 512  # outstanding catalog RPCs before a send is skipped ("late")
RSS_GROWTH_TARGET = 0.10
# (operation, share of the catalog mix)
CATALOG_MIX = (("GetModel", 0.5), ("ListModels", 0.3), ("EvaluateCompatibility", 0.2))
EXPECTED_BY_DESIGN = {("RESOURCE_EXHAUSTED", "QUEUE_FULL")}
SEED = 7


# --- what one operation saw ---------------------------------------------------------------------


@dataclass
class OpStats:
    """One operation's measured calls: latencies of the OK ones, failures by code/reason."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    first_token: list[float] = field(default_factory=list)  # Generate only
    tokens: int = 0  # Generate only

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        """Count a failed call, by design (QUEUE_FULL) or not."""
        code = error.code().name
        reason = _reason(error)
        key = f"{code}/{reason}" if reason else code
        if (code, reason) in EXPECTED_BY_DESIGN:
            self.expected[key] += 1
        else:
            self.errors[key] += 1


def _reason(error: grpc.aio.AioRpcError) -> str:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


@dataclass
class Window:
    """The measured window on the monotonic clock: calls sent inside it count."""

    start: float
    end: float

    def holds(self, moment: float) -> bool:
        return self.start <= moment < self.end


# --- the loads ----------------------------------------------------------------------------------


async def generate_client(
    stub: worker_pb2_grpc.WorkerServiceStub,
    request: gen_pb.GenerateRequest,
    stats: OpStats,
    window: Window,
) -> None:
    """Stream Generate back to back until the window ends; record the calls sent inside it."""
    while time.monotonic() < window.end:
        sent = time.monotonic()
        first: float | None = None
        tokens = 0
        try:
            call = stub.Generate(request, timeout=START_TIMEOUT_S)
            async for message in call:
                if message.HasField("delta") and message.delta.token_ids:
                    if first is None:
                        first = time.monotonic()
                    tokens += len(message.delta.token_ids)
        except grpc.aio.AioRpcError as error:
            if window.holds(sent):
                stats.fail(error)
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.05)  # refused at once: do not spin
            continue
        if window.holds(sent):
            done = time.monotonic()
            stats.latencies.append(done - sent)
            stats.first_token.append((first or done) - sent)
            stats.tokens += tokens


@dataclass
class CatalogLoad:
    """The open-loop catalog driver's results."""

    stats: dict[str, OpStats]
    sent: int = 0
    late: int = 0  # sends skipped because MAX_IN_FLIGHT calls were outstanding


CATALOG_SERVICE = cpb.DESCRIPTOR.services_by_name["CatalogService"].full_name
# (request class, response class) of each operation of the mix.
CATALOG_MESSAGES: dict[str, tuple[type[Any], type[Any]]] = {
    "GetModel": (cpb.GetModelRequest, cpb.Model),
    "ListModels": (cpb.ListModelsRequest, cpb.ListModelsResponse),
    "EvaluateCompatibility": (cpb.EvaluateCompatibilityRequest, cpb.EvaluateCompatibilityResponse),
}


def catalog_calls(channel: grpc.aio.Channel, *, decode: bool) -> dict[str, Any]:
    """One multicallable per operation of the mix; responses decoded only when `decode`."""
    return {
        op: channel.unary_unary(
            f"/{CATALOG_SERVICE}/{op}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString if decode else None,
        )
        for op, (request, response) in CATALOG_MESSAGES.items()
    }


async def catalog_driver(
    calls: dict[str, Any],
    model_names: Sequence[str],
    compat_names: Sequence[str],
    rate: float,
    load: CatalogLoad,
    window: Window,
) -> None:
    """Send one RPC every 1/rate seconds from now until the window ends (open loop)."""
    rng = random.Random(SEED)
    names = [name for name, _ in CATALOG_MIX]
    # Cumulative once, not per draw (`choices` with `weights` accumulates them every call);
    # the draws are the same.
    cum_weights = list(itertools.accumulate(share for _, share in CATALOG_MIX))
    in_flight: set[asyncio.Task[None]] = set()

    async def one(op: str, sent: float) -> None:
        stats = load.stats[op]
        try:
            if op == "GetModel":
                request: Any = cpb.GetModelRequest(name=rng.choice(model_names))
            elif op == "ListModels":
                state_filter = "state=ready" if rng.random() < 0.5 else ""
                request = cpb.ListModelsRequest(page_size=50, filter=state_filter)
            else:
                request = cpb.EvaluateCompatibilityRequest(model=rng.choice(compat_names))
            await calls[op](request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if window.holds(sent):
                stats.fail(error)
            return
        if window.holds(sent):
            stats.latencies.append(time.monotonic() - sent)

    began = time.monotonic()
    index = 0
    while True:
        due = began + index / rate
        if due >= window.end:
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        index += 1
        if len(in_flight) >= MAX_IN_FLIGHT:
            if window.holds(due):
                load.late += 1
            continue
        op = rng.choices(names, cum_weights=cum_weights)[0]
        if window.holds(due):
            load.sent += 1
        task = asyncio.create_task(one(op, time.monotonic()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=RPC_TIMEOUT_S)


# --- processes ----------------------------------------------------------------------------------


def _script(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


@contextmanager
def service_process(
    command: list[str], env: dict[str, str], address: str, name: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A console script on `address`, gated on SERVING, stopped with SIGTERM."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_serving(address, process, name=name, timeout=START_TIMEOUT_S, log=log)
        yield process
    finally:
        stop_process(process)


def warm_catalog(address: str, model_names: Sequence[str], compat_names: Sequence[str]) -> None:
    """GetModel on every model and EvaluateCompatibility on every one that has metadata, one
    at a time, before any load (a deterministic part of the warm-up).

    The catalog keeps each model's answers once asked (bounded caches of serialized messages);
    left to the timed warm-up, a 1,000-model catalog is still filling them well into the
    measured window, and entries made under full load scatter across the heap: its resident
    memory then grew 8 to 12% in the window although a soak at a steady state stays flat."""
    with open_channel(address) as channel:
        calls = catalog_calls_sync(channel)
        for name in model_names:
            calls["GetModel"](cpb.GetModelRequest(name=name), timeout=RPC_TIMEOUT_S)
        for name in compat_names:
            calls["EvaluateCompatibility"](
                cpb.EvaluateCompatibilityRequest(model=name), timeout=RPC_TIMEOUT_S
            )


def catalog_calls_sync(channel: grpc.Channel) -> dict[str, Any]:
    """`catalog_calls` on a sync channel (responses not decoded)."""
    return {
        op: channel.unary_unary(
            f"/{CATALOG_SERVICE}/{op}", request_serializer=request.SerializeToString
        )
        for op, (request, _response) in CATALOG_MESSAGES.items()
    }


@contextmanager
def rare_collections() -> Iterator[None]:
    """The services' serving GC settings for this client while it drives the load, restored
    after. The client holds every latency and hundreds of calls in flight: with CPython's
    defaults, the collector's full passes over everything loaded took ~20% of its CPU (py-spy),
    CPU it shares with the worker and the catalog on this machine."""
    threshold = gc.get_threshold()
    prepare_heap_for_serving()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def worker_command(model: Path, address: str, queue_size: int, threads: int) -> list[str]:
    """`rbee-worker` with the model loaded before SERVING and the raised queue."""
    return [
        *_script("rbee-worker", "services.worker"),
        "--engine", "llama_cpp", "--device", "cpu", "--listen", address,
        "--metrics-listen", "", "--catalog", "", "--model", str(model),
        "--model-name", MODEL_NAME, "--queue-size", str(queue_size),
        "--threads", str(threads), "--context-length", "256",
    ]  # fmt: skip


# --- the benchmark --------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to run (defaults: the issue's numbers)."""

    seconds: float = 60.0
    streams: int = 64
    catalog_rps: float = 1000.0
    models: int = 1000
    tokens: int = 16
    queue_size: int | None = None  # None: `streams` (every stream queues, none refused)
    warmup: float = 5.0
    decode: bool = False  # decode catalog responses (a real client's cost, on these cores)
    workdir: Path | None = None
    keep: bool = False
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class Memory:
    """VmRSS of one process: idle (no load yet), before (after warm-up), after, peak."""

    name: str
    idle: int = 0
    before: int = 0
    after: int = 0
    peak: int = 0

    @property
    def growth(self) -> float:
        """After over before (the warmed-up baseline), as a fraction."""
        return (self.after - self.before) / self.before if self.before else 0.0


@dataclass
class CpuUse:
    """CPU seconds (utime + stime, all threads) one process used in the measured window."""

    name: str
    seconds: float = 0.0


@dataclass
class BenchResult:
    """Everything the report prints."""

    config: BenchConfig
    measured_seconds: float
    generate: OpStats
    catalog: CatalogLoad
    memory: list[Memory]
    facts: list[tuple[str, str]]
    workdir: Path
    cpu: list[CpuUse] = field(default_factory=list)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Start the worker and the catalog, run both loads, read the memory."""
    with bench_workdir("rbee-bench-load-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    home = workdir / "home"
    queue_size = config.queue_size if config.queue_size is not None else config.streams
    load_before = os.getloadavg()[0]
    model = write_tiny_llama_gguf(workdir / "bench-load.gguf", n_ctx=256, seed=SEED)
    generated = list(build_models(config.models, SEED))
    say(f"populating the catalog with {len(generated)} models")
    populate_rbee(home / "catalog" / "catalog.db", generated)
    model_names = [f"models/{m.id}" for m in generated]
    # EvaluateCompatibility needs an inspected model: READY, with metadata.
    compat_names = [
        f"models/{m.id}"
        for m in generated
        if m.metadata is not None and m.state is ModelState.READY
    ] or model_names
    ready = sum(m.state is ModelState.READY for m in generated)
    env = {**os.environ, "RBEE_HOME": str(home)}
    catalog_address = f"127.0.0.1:{free_port()}"
    worker_address = f"127.0.0.1:{free_port()}"
    catalog_env = {
        **env,
        "RBEE_CATALOG_LISTEN": catalog_address,
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_CATALOG_LOG_LEVEL": "WARNING",
    }
    worker_env = {**env, "RBEE_WORKER_LOG_LEVEL": "WARNING"}
    with ExitStack() as stack:
        say("starting rbee-catalog and rbee-worker")
        catalog = stack.enter_context(
            service_process(
                _script("rbee-catalog", "services.catalog"),
                catalog_env,
                catalog_address,
                "rbee-catalog",
                workdir / "catalog.stderr",
            )
        )
        worker = stack.enter_context(
            service_process(
                worker_command(model, worker_address, queue_size, threads=1),
                worker_env,
                worker_address,
                "rbee-worker",
                workdir / "worker.stderr",
            )
        )
        memory = [Memory("rbee-worker"), Memory("rbee-catalog")]
        pids = [worker.pid, catalog.pid]
        for entry, pid in zip(memory, pids, strict=True):
            entry.idle = resident_bytes(pid)
        say("warming the catalog: every model read and evaluated once")
        warm_catalog(catalog_address, model_names, compat_names)
        say(
            f"load: {config.streams} Generate streams + {config.catalog_rps:g} catalog RPC/s, "
            f"{config.warmup:g} s warm-up + {config.seconds:g} s measured"
        )
        with rare_collections():
            generate, catalog_load, measured, cpu = asyncio.run(
                _drive(
                    config, worker_address, catalog_address, model_names, compat_names, memory, pids
                )
            )
        for entry, pid in zip(memory, pids, strict=True):
            entry.after = resident_bytes(pid)
            entry.peak = max(entry.peak, entry.after)
    facts = [
        ("worker", f"rbee-worker --engine llama_cpp, 1 thread, tiny llama GGUF "
                   f"({model.stat().st_size / 1024:.0f} KiB), queue size {queue_size}"),
        ("streams", f"{config.streams} concurrent Generate clients, {config.tokens} tokens "
                    f"each (ignore_eos), back to back"),
        ("catalog", f"rbee-catalog with {config.models} models ({ready} READY, "
                    f"{len(compat_names)} READY with metadata), open loop at "
                    f"{config.catalog_rps:g} RPC/s: "
                    + ", ".join(f"{share:.0%} {name}" for name, share in CATALOG_MIX)),
        ("client", "one asyncio process; catalog responses "
                   + ("decoded" if config.decode else "not decoded (status checked only)")),
        ("window", f"{config.warmup:g} s warm-up (not measured), {measured:.1f} s measured"),
        ("host load", f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
                      "after (other processes share these CPUs)"),
    ]  # fmt: skip
    return BenchResult(config, measured, generate, catalog_load, memory, facts, workdir, cpu)


async def _drive(
    config: BenchConfig,
    worker_address: str,
    catalog_address: str,
    model_names: Sequence[str],
    compat_names: Sequence[str],
    memory: list[Memory],
    pids: Sequence[int],
) -> tuple[OpStats, CatalogLoad, float, list[CpuUse]]:
    start = time.monotonic()
    window = Window(start + config.warmup, start + config.warmup + config.seconds)
    generate = OpStats("Generate")
    load = CatalogLoad({name: OpStats(name) for name, _ in CATALOG_MIX})
    request = gen_pb.GenerateRequest(
        model=MODEL_NAME,
        prompt=PROMPT,
        sampling=gen_pb.SamplingParams(temperature=0.0, seed=SEED),
        stopping=gen_pb.StoppingCriteria(max_tokens=config.tokens, ignore_eos=True),
    )
    async with (
        open_aio_channel(worker_address) as worker_channel,
        open_aio_channel(catalog_address) as catalog_channel,
    ):
        worker_stub = worker_pb2_grpc.WorkerServiceStub(worker_channel)
        calls = catalog_calls(catalog_channel, decode=config.decode)
        tasks = [
            asyncio.create_task(generate_client(worker_stub, request, generate, window))
            for _ in range(config.streams)
        ]
        tasks.append(
            asyncio.create_task(
                catalog_driver(calls, model_names, compat_names, config.catalog_rps, load, window)
            )
        )
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        for entry, pid in zip(memory, pids, strict=True):
            entry.before = resident_bytes(pid)
        cpu_pids = [*pids, os.getpid()]
        cpu = [CpuUse(entry.name) for entry in memory] + [CpuUse("load client")]
        cpu_start = [cpu_seconds(pid) for pid in cpu_pids]
        tasks.append(asyncio.create_task(_read_cpu_at_end(window, cpu, cpu_pids, cpu_start)))
        samplers = [RssSampler(pid, interval=0.5) for pid in pids]
        for sampler in samplers:
            sampler.__enter__()
        try:
            await asyncio.gather(*tasks)
        finally:
            for sampler, entry in zip(samplers, memory, strict=True):
                sampler.__exit__(None, None, None)
                entry.peak = sampler.peak
    measured = min(time.monotonic(), window.end) - window.start
    return generate, load, measured, cpu


async def _read_cpu_at_end(
    window: Window, cpu: list[CpuUse], pids: Sequence[int], start: Sequence[float]
) -> None:
    """At the end of the window: the CPU each process used since `start`."""
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    for entry, pid, before in zip(cpu, pids, start, strict=True):
        entry.seconds = cpu_seconds(pid) - before


# --- the report ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} x{count}" for key, count in counter.most_common()) or "0"


def unexpected_errors(result: BenchResult) -> int:
    """Every failure that is not by design, over both loads."""
    ops = [result.generate, *result.catalog.stats.values()]
    return sum(sum(op.errors.values()) for op in ops)


def render_report(result: BenchResult, command: str) -> str:
    """The plain-text report: command, date, machine, facts, the load table, memory, targets."""
    seconds = result.measured_seconds or 1.0
    header = ("load", "calls OK", "throughput", "p50", "p99", "errors", "expected (by design)")
    rows: list[tuple[str, ...]] = [header]
    gen = result.generate
    rows.append(
        (
            f"Generate x{result.config.streams} streams (end to end)",
            f"{gen.ok:,}",
            f"{gen.ok / seconds:,.1f} streams/s, {gen.tokens / seconds:,.0f} tokens/s",
            _ms(percentile(gen.latencies, 0.5)) if gen.latencies else "-",
            _ms(percentile(gen.latencies, 0.99)) if gen.latencies else "-",
            _counts(gen.errors),
            _counts(gen.expected),
        )
    )
    rows.append(
        (
            "  time to first token",
            "",
            "",
            _ms(percentile(gen.first_token, 0.5)) if gen.first_token else "-",
            _ms(percentile(gen.first_token, 0.99)) if gen.first_token else "-",
            "",
            "",
        )
    )
    all_latencies: list[float] = []
    for name, _share in CATALOG_MIX:
        op = result.catalog.stats[name]
        all_latencies += op.latencies
        rows.append(
            (
                f"catalog {name}",
                f"{op.ok:,}",
                f"{op.ok / seconds:,.1f} RPC/s",
                _ms(percentile(op.latencies, 0.5)) if op.latencies else "-",
                _ms(percentile(op.latencies, 0.99)) if op.latencies else "-",
                _counts(op.errors),
                _counts(op.expected),
            )
        )
    catalog_errors = sum(sum(op.errors.values()) for op in result.catalog.stats.values())
    rows.append(
        (
            f"catalog, all (target {result.config.catalog_rps:g} RPC/s)",
            f"{len(all_latencies):,}",
            f"{len(all_latencies) / seconds:,.1f} RPC/s",
            _ms(percentile(all_latencies, 0.5)) if all_latencies else "-",
            _ms(percentile(all_latencies, 0.99)) if all_latencies else "-",
            str(catalog_errors),
            f"late (not sent) {result.catalog.late}",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(row) for row in rows[1:]),
        "",
        "resident memory (VmRSS): idle = before any load, before = after the warm-up, after = "
        "at the end",
    ]
    for entry in result.memory:
        lines.append(
            f"  {entry.name:<13} idle {_mib(entry.idle)}, before {_mib(entry.before)}, after "
            f"{_mib(entry.after)} ({entry.growth:+.1%}), peak {_mib(entry.peak)}"
        )
    achieved = len(all_latencies) / seconds
    if result.cpu:
        lines += ["", "CPU in the measured window (utime + stime; 1.00 core = one core all along)"]
        for use in result.cpu:
            per_rpc = ""
            if use.name == "rbee-catalog" and all_latencies:
                per_rpc = f", {use.seconds / len(all_latencies) * 1e6:,.0f} us per catalog RPC"
            lines.append(
                f"  {use.name:<13} {use.seconds:,.1f} s ({use.seconds / seconds:.2f} cores)"
                + per_rpc
            )
    errors = unexpected_errors(result)
    flat = all(entry.growth < RSS_GROWTH_TARGET for entry in result.memory)
    lines += [
        "",
        f"target no unexpected errors: {errors}  {'PASS' if errors == 0 else 'MISS'}",
        f"target resident memory flat (< {RSS_GROWTH_TARGET:.0%} growth after warm-up): "
        + ", ".join(f"{e.name} {e.growth:+.1%}" for e in result.memory)
        + f"  {'PASS' if flat else 'MISS'}",
        f"target {result.config.catalog_rps:g} catalog RPC/s sustained: {achieved:,.1f}  "
        f"{'PASS' if achieved >= 0.95 * result.config.catalog_rps else 'MISS'}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults are the issue's numbers)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--streams", type=int, default=64, help="concurrent Generate clients")
    parser.add_argument("--catalog-rps", type=float, default=1000.0, help="catalog RPCs/s")
    parser.add_argument("--models", type=int, default=1000, help="models in the catalog")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument(
        "--queue-size", type=int, default=None, help="the worker's queue (default: --streams)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument(
        "--decode", action="store_true", help="decode catalog responses (default: status only)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to write files")
    parser.add_argument("--keep", action="store_true", help="keep the files and logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 0 whatever the targets say."""
    args = parse_args(argv)
    progress = Progress()
    config = BenchConfig(
        seconds=max(1.0, args.seconds),
        streams=max(1, args.streams),
        catalog_rps=max(1.0, args.catalog_rps),
        models=max(1, args.models),
        tokens=max(1, args.tokens),
        queue_size=args.queue_size,
        warmup=max(0.0, args.warmup),
        decode=args.decode,
        workdir=args.workdir,
        keep=args.keep,
        progress=progress,
    )
    result = run_benchmark(config)
    print(render_report(result, command_line("bench.load", argv)))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
