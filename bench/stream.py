"""Token-streaming benchmark (issue 4): our worker over gRPC against llama-cpp-python's paths.

    python -m bench.stream [--runs 5] [--tokens 256] [--workdir DIR] [--keep]

One generated llama GGUF (about 30M parameters, f16, random weights, an SPM vocabulary with the
256 byte-fallback tokens), one prompt, greedy sampling (temperature 0) and `--tokens` tokens,
through four paths in one run:

  (a) raw loop      `Llama.generate(tokens, ...)` in this process, timing each token id as it
                    is yielded; no text is decoded while timing (the point of the baseline: the
                    cost of llama.cpp alone); the ids are decoded once at the end to check the
                    text the other paths stream.
  (b) rbee worker   the real `rbee-worker --engine llama_cpp` process (gated on
                    grpc.health.v1 SERVING, then LoadModel over gRPC), Generate streamed with
                    the sync stub on loopback; each TokenDelta message's arrival is timed. A
                    delta may carry several token ids (a character split across byte tokens is
                    sent once complete): tokens are counted by token_ids, and inter-token gaps
                    are per message.
  (c) completion    `Llama.create_completion(prompt, stream=True)` in this process, each chunk
                    timed.
  (d) llama server  `python -m llama_cpp.server` (its OpenAI-compatible server) in its own
                    process, POST /v1/completions with "stream": true read as SSE with
                    http.client, each event timed. Needs the server extras (fastapi, uvicorn,
                    sse-starlette, starlette-context); without them the row reads n/a.

Output, identical on every path (checked): plain ASCII is greedy sampling with no constraint
(this vocabulary's greedy output on the fixed prompt is ASCII word pieces; (b) sets ignore_eos,
(a) never stops early, and the tokens column shows whether (c)/(d) met an EOS). Multi-byte
output is forced by a GBNF grammar that never completes (so EOS is never allowed): CJK
ideographs (U+4E00..U+9FFF), which this vocabulary can only spell with byte-fallback tokens,
three per character. The grammar sampler is llama.cpp's in every path's sampler chain, so it
costs the same everywhere; over an 8192-token vocabulary it dominates the per-token time.

Timing: t0 is taken just before the call that starts the request. TTFT = first content arrival
(a token id for (a), a message with token ids for (b), a chunk or event with text for (c) and
(d)); tokens/s = tokens / (last content arrival - t0), what a client sees end to end;
inter-token gaps are between successive content arrivals. Paths are interleaved (order rotated
each run) after one unrecorded warm-up each; medians over runs for tokens/s and TTFT, gaps
pooled over runs for p50/p99. Every path's text is checked against the raw loop's, and the
tokens of (c) and (d), which do not report them while streaming, are counted by matching their
text against the raw loop's token pieces. Prints a table per output kind and exits 0: a
benchmark reports, it does not assert.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import grpc
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from bench.catalog import bench_workdir, percentile
from bench.console import Progress, command_line
from bench.processes import wait_serving
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import load_pb2 as load_pb
from rbee.worker.v1 import worker_pb2 as worker_pb
from rbee.worker.v1 import worker_pb2_grpc
from tests.fixtures.gguf_models import write_tiny_llama_gguf

PROMPT = "hello world, the"
SEED = 1234
CONTEXT_LENGTH = 1024
MODEL_NAME = "models/bench-stream"
# About 30M parameters: 8192 x 512 embeddings and output (8.4M each) + 8 layers of 2.9M.
MODEL_SHAPE: dict[str, int] = {
    "n_vocab": 8192,
    "n_embd": 512,
    "n_layer": 8,
    "n_head": 8,
    "n_head_kv": 4,
    "n_ff": 1408,
    "n_ctx": CONTEXT_LENGTH,
}
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0

TARGET_RATIO = 0.95
TARGET_TTFT_DELTA_S = 0.005

# Right recursion that never ends: the grammar never accepts the end of the output, so the
# grammar sampler bans EOS on every path (llama.cpp keeps the stack flat on a tail reference).
CJK_GRAMMAR = "root ::= [\u4e00-\u9fff] root\n"


@dataclass(frozen=True)
class OutputKind:
    """What the grammar forces the model to write."""

    name: str
    title: str
    grammar: str | None

    def llama_grammar(self) -> LlamaGrammar | None:
        """The grammar for llama-cpp-python's API (None: unconstrained)."""
        return LlamaGrammar.from_string(self.grammar, verbose=False) if self.grammar else None


OUTPUT_KINDS = (
    OutputKind("ascii", "plain ASCII output (greedy, no grammar)", None),
    OutputKind("cjk", "CJK output, 3 byte-fallback tokens per character", CJK_GRAMMAR),
)


# --- one streamed generation -----------------------------------------------------------------


@dataclass
class StreamRun:
    """One generation as a client saw it: content arrival times (s after t0) and the text."""

    arrivals: list[float]
    text: str
    tokens: int | None = None  # None: counted afterwards against the reference pieces
    first_text: float | None = None  # (a) only: when the first complete character arrived

    @property
    def ttft(self) -> float:
        """Time to the first content arrival."""
        return self.arrivals[0]

    @property
    def gaps(self) -> list[float]:
        """Gaps between successive content arrivals."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


class StreamPath(Protocol):
    """One way of generating a stream of tokens."""

    label: str

    def run(self, kind: OutputKind, max_tokens: int) -> StreamRun:
        """Generate `max_tokens` tokens of `kind` and time their arrivals."""
        ...


def _comparable(text: str) -> str:
    # A trailing partial character is U+FFFD on some paths and dropped on others.
    return text.replace("\ufffd", "")


class RawLoop:
    """(a) `Llama.generate` in process: token ids only, decoded once after timing."""

    label = "(a) raw loop: Llama.generate in process"

    def __init__(self, llm: Llama) -> None:
        self._llm = llm
        self._prompt = list(llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False))
        self.reference: dict[str, list[bytes]] = {}  # kind -> the pieces of each token

    def run(self, kind: OutputKind, max_tokens: int) -> StreamRun:
        """Generate with the same greedy sampling and grammar as the other paths."""
        grammar = kind.llama_grammar()
        arrivals: list[float] = []
        ids: list[int] = []
        t0 = time.perf_counter()
        for token in self._llm.generate(
            self._prompt, temp=0.0, repeat_penalty=1.0, grammar=grammar
        ):
            arrivals.append(time.perf_counter() - t0)
            ids.append(token)
            if len(ids) >= max_tokens:
                break
        text = self._llm.detokenize(ids, prev_tokens=self._prompt).decode("utf-8", "replace")
        # After timing: which token completed the first character (the earliest text a
        # streaming client could show; later than the first token on byte-token output).
        first_text = None
        for count in range(1, len(ids) + 1):
            head = self._llm.detokenize(ids[:count], prev_tokens=self._prompt)
            if head and head.decode("utf-8", "ignore").encode("utf-8") == head:
                first_text = arrivals[count - 1]
                break
        return StreamRun(arrivals, text, tokens=len(ids), first_text=first_text)

    def record_reference(self, kind: OutputKind, max_tokens: int) -> str:
        """Generate a few tokens past `max_tokens` and keep each token's piece, to count the
        tokens of paths that stream text only; returns the text of the first `max_tokens`."""
        grammar = kind.llama_grammar()
        ids: list[int] = []
        for token in self._llm.generate(
            self._prompt, temp=0.0, repeat_penalty=1.0, grammar=grammar
        ):
            ids.append(token)
            if len(ids) >= max_tokens + 8:
                break
        self.reference[kind.name] = [
            self._llm.detokenize([token], prev_tokens=self._prompt + ids[:i])
            for i, token in enumerate(ids)
        ]
        head = self._llm.detokenize(ids[:max_tokens], prev_tokens=self._prompt)
        return head.decode("utf-8", "replace")

    def count_tokens(self, kind: OutputKind, text: str) -> int | None:
        """How many reference tokens spell `text` (None when no prefix of them does)."""
        target = _comparable(text).encode("utf-8")
        spelled = b""
        for count, piece in enumerate(self.reference.get(kind.name, []), start=1):
            spelled += piece
            decoded = _comparable(spelled.decode("utf-8", "ignore")).encode("utf-8")
            if decoded == target:  # the fewest tokens that spell it (a split char needs all)
                return count
            if len(decoded) > len(target):
                return None
        return None


class InProcessCompletion:
    """(c) `Llama.create_completion(stream=True)` in process, each chunk timed."""

    label = "(c) create_completion(stream=True) in process"

    def __init__(self, llm: Llama) -> None:
        self._llm = llm

    def run(self, kind: OutputKind, max_tokens: int) -> StreamRun:
        """Stream one completion with the same prompt, sampling and grammar."""
        grammar = kind.llama_grammar()
        arrivals: list[float] = []
        parts: list[str] = []
        t0 = time.perf_counter()
        chunks = self._llm.create_completion(
            PROMPT,
            max_tokens=max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            seed=SEED,
            grammar=grammar,
            stream=True,
        )
        for chunk in chunks:
            text = chunk["choices"][0]["text"]  # type: ignore[index]
            if text:
                arrivals.append(time.perf_counter() - t0)
                parts.append(text)
        return StreamRun(arrivals, "".join(parts))


class WorkerGrpc:
    """(b) our worker over gRPC on loopback, sync stub, each TokenDelta message timed."""

    label = "(b) rbee worker over gRPC (loopback)"

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def run(self, kind: OutputKind, max_tokens: int) -> StreamRun:
        """Stream one Generate with the same prompt, sampling and grammar."""
        sampling = gen_pb.SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=SEED)
        if kind.grammar:
            sampling.grammar = kind.grammar
        request = gen_pb.GenerateRequest(
            model=MODEL_NAME,
            prompt=PROMPT,
            sampling=sampling,
            stopping=gen_pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
        )
        arrivals: list[float] = []
        parts: list[str] = []
        tokens = 0
        t0 = time.perf_counter()
        for message in self._stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            now = time.perf_counter() - t0
            if message.HasField("delta"):
                if message.delta.token_ids:
                    arrivals.append(now)
                    tokens += len(message.delta.token_ids)
                parts.append(message.delta.text)
            elif message.HasField("result") and message.result.usage.completion_tokens != tokens:
                raise RuntimeError(
                    f"worker reported {message.result.usage.completion_tokens} tokens, "
                    f"streamed {tokens}"
                )
        return StreamRun(arrivals, "".join(parts), tokens=tokens)


class LlamaCppServer:
    """(d) llama_cpp.server's /v1/completions streamed as SSE over http.client."""

    label = "(d) llama_cpp.server, SSE (loopback)"

    def __init__(self, port: int) -> None:
        self._port = port

    def run(self, kind: OutputKind, max_tokens: int) -> StreamRun:
        """Stream one completion with the same prompt, sampling and grammar."""
        fields: dict[str, object] = {
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "repeat_penalty": 1.0,  # the server's default is 1.1
            "seed": SEED,
            "stream": True,
        }
        if kind.grammar:
            fields["grammar"] = kind.grammar
        body = json.dumps(fields)
        arrivals: list[float] = []
        parts: list[str] = []
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=REQUEST_TIMEOUT_S)
        try:
            t0 = time.perf_counter()
            connection.request(
                "POST", "/v1/completions", body, {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"llama_cpp.server answered {response.status}")
            while True:
                line = response.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, pings
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                text = json.loads(data)["choices"][0]["text"]
                if text:
                    arrivals.append(time.perf_counter() - t0)
                    parts.append(text)
        finally:
            connection.close()
        return StreamRun(arrivals, "".join(parts))


# --- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def usable_cores() -> int:
    """The cores this process may run on (every path gets this many threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "rbee-worker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.worker"]


@contextlib.contextmanager
def worker_process(model: Path, workdir: Path, threads: int, device: str = "cpu") -> Iterator[str]:
    """The real `rbee-worker --engine llama_cpp` on a free port: gated on grpc.health.v1
    SERVING, then the model loaded with LoadModel over gRPC. Yields its address."""
    address = f"127.0.0.1:{_free_port()}"
    log = workdir / "worker.stderr"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *_worker_command(),
                "--engine",
                "llama_cpp",
                "--device",
                device,
                "--listen",
                address,
                "--metrics-listen",
                "",
            ],
            env={**os.environ, "RBEE_HOME": str(workdir / "home")},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_serving(address, process, name="rbee-worker", timeout=START_TIMEOUT_S, log=log)
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb.LoadModelRequest(
                model=MODEL_NAME,
                paths=[str(model)],
                llm=load_pb.LlmLoadOptions(
                    context_length=CONTEXT_LENGTH,
                    threads=threads,
                    gpu_layers=0 if device == "cpu" else -1,
                ),
            )
            responses = list(stub.LoadModel(request, timeout=START_TIMEOUT_S))
            last = responses[-1] if responses else None
            if last is None or last.worker.state != worker_pb.WORKER_STATE_READY:
                raise RuntimeError(f"LoadModel did not end READY: {last}")
        yield address
    finally:
        _stop(process)


def llama_server_available() -> bool:
    """Whether llama_cpp.server's extras are importable here."""
    needed = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
    return all(importlib.util.find_spec(name) is not None for name in needed)


@contextlib.contextmanager
def llama_server_process(
    model: Path, workdir: Path, threads: int, gpu_layers: int = 0
) -> Iterator[int]:
    """`python -m llama_cpp.server` on a free loopback port with the same model, context and
    threads; ready once GET /v1/models answers 200. Yields its port."""
    port = _free_port()
    log = workdir / "llama-server.stderr"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
             "--n_ctx", str(CONTEXT_LENGTH), "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--n_gpu_layers", str(gpu_layers),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with {process.returncode}: "
                    + log.read_text(errors="replace")[-2000:]
                )
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/v1/models")
                if connection.getresponse().status == 200:
                    connection.close()
                    break
                connection.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama_cpp.server not ready within {START_TIMEOUT_S} s")
            time.sleep(0.1)
        yield port
    finally:
        _stop(process)


def write_bench_model(path: Path, **overrides: int) -> Path:
    """The benchmark's GGUF (MODEL_SHAPE, f16), `overrides` for smaller smoke runs."""
    shape = {**MODEL_SHAPE, **overrides}
    return write_tiny_llama_gguf(
        path,
        n_vocab=shape["n_vocab"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_head_kv=shape["n_head_kv"],
        n_ff=shape["n_ff"],
        n_ctx=shape["n_ctx"],
        dtype="f16",
        seed=7,
    )


def count_parameters(path: Path) -> int:
    """Weights in the GGUF (sum of tensor elements)."""
    import gguf  # the writer's own reader

    reader = gguf.GGUFReader(str(path))
    return sum(int(tensor.n_elements) for tensor in reader.tensors)


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class PathStats:
    """One row: a path's runs for one output kind, summarised."""

    label: str
    runs: list[StreamRun] = field(default_factory=list)
    tokens: list[int | None] = field(default_factory=list)
    text_matches: list[bool] = field(default_factory=list)
    unavailable: str = ""

    def tokens_per_second(self) -> float:
        """Median over runs of tokens / last content arrival."""
        rates = [
            count / run.arrivals[-1]
            for run, count in zip(self.runs, self.tokens, strict=True)
            if count and run.arrivals
        ]
        return statistics.median(rates) if rates else 0.0

    def ttft(self) -> float:
        """Median over runs of the time to first content."""
        return statistics.median(run.ttft for run in self.runs)

    def gaps(self) -> list[float]:
        """Inter-arrival gaps pooled over runs."""
        return [gap for run in self.runs for gap in run.gaps]


@dataclass
class BenchConfig:
    """What to run."""

    runs: int = 5
    tokens: int = 256
    workdir: Path | None = None
    keep: bool = False
    model_overrides: dict[str, int] = field(default_factory=dict)
    with_llama_server: bool = True
    threads: int | None = None  # llama.cpp threads on every path; None: every usable core
    device: str = "cpu"  # "cuda:0", ...: every layer on that GPU on every path
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class BenchResult:
    """Per output kind, the rows (a)..(d); facts printed above the tables."""

    stats: dict[str, list[PathStats]]
    facts: list[tuple[str, str]]
    workdir: Path


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Write the model, start the worker and the llama server, run every path interleaved."""
    with bench_workdir("rbee-bench-stream-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    threads = config.threads or usable_cores()
    gpu_layers = 0 if config.device == "cpu" else -1
    if gpu_layers:
        # (a) and (c) run in this process: only that GPU, as the worker binds it.
        os.environ["CUDA_VISIBLE_DEVICES"] = config.device.partition(":")[2] or "0"
    model = write_bench_model(workdir / "bench-stream.gguf", **config.model_overrides)
    parameters = count_parameters(model)
    say(f"model: {parameters / 1e6:.1f}M parameters, {model.stat().st_size / 2**20:.0f} MiB")
    llm = Llama(
        str(model),
        n_ctx=CONTEXT_LENGTH,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=gpu_layers,
        seed=SEED,
        verbose=False,
    )
    facts = [
        ("model", f"llama GGUF, {parameters / 1e6:.1f}M parameters, f16, "
                  f"{model.stat().st_size / 2**20:.0f} MiB, vocab "
                  f"{llm.n_vocab()} (256 byte tokens), context {CONTEXT_LENGTH}"),
        ("request", f"prompt {PROMPT!r}, greedy (temperature 0), repeat penalty 1, seed "
                    f"{SEED}, max_tokens {config.tokens}; CJK forced by a GBNF grammar"),
        ("threads", f"{threads} on every path (llama.cpp decode and batch), of "
                    f"{usable_cores()} usable cores"),
        ("device", f"{config.device}" + (", every layer offloaded on every path"
                                         if gpu_layers else "")),
        ("runs", f"{config.runs} per path and kind, interleaved, after 1 warm-up each"),
    ]  # fmt: skip
    raw = RawLoop(llm)
    completion = InProcessCompletion(llm)
    server_note = ""
    if not config.with_llama_server:
        server_note = "n/a (not requested)"
    elif not llama_server_available():
        server_note = "n/a (llama_cpp.server extras not installed)"
    with contextlib.ExitStack() as stack:
        say("starting rbee-worker")
        address = stack.enter_context(worker_process(model, workdir, threads, config.device))
        worker = WorkerGrpc(address)
        stack.callback(worker.close)
        paths: list[StreamPath | None] = [raw, worker, completion, None]
        if not server_note:
            say("starting llama_cpp.server")
            port = stack.enter_context(llama_server_process(model, workdir, threads, gpu_layers))
            paths[3] = LlamaCppServer(port)
        stats: dict[str, list[PathStats]] = {}
        for kind in OUTPUT_KINDS:
            rows = [PathStats(path.label if path else LlamaCppServer.label) for path in paths]
            if paths[3] is None:
                rows[3].unavailable = server_note
            live = [(path, row) for path, row in zip(paths, rows, strict=True) if path]
            for path, _row in live:
                path.run(kind, config.tokens)  # warm-up: caches, allocator, connections
            # After the warm-ups: every path now evaluates only the prompt's last token (KV
            # prefix reuse), and a fresh batch evaluation of the prompt can give logits that
            # differ in the last bits, which flips near-tied greedy choices of a random model.
            reference = raw.record_reference(kind, config.tokens)
            for run_index in range(config.runs):
                shift = run_index % len(live)
                for path, row in live[shift:] + live[:shift]:
                    say(f"{kind.name}: run {run_index + 1}/{config.runs}: {path.label}")
                    result = path.run(kind, config.tokens)
                    count = result.tokens
                    if count is None:
                        count = raw.count_tokens(kind, result.text)
                    row.runs.append(result)
                    row.tokens.append(count)
                    row.text_matches.append(
                        _comparable(result.text).startswith(_comparable(reference))
                    )
            stats[kind.name] = rows
    llm.close()
    return BenchResult(stats, facts, workdir)


# --- the report ------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _tokens_cell(row: PathStats) -> str:
    counts = set(row.tokens)
    if counts == {None}:
        return "?"
    return "/".join(str(c) if c is not None else "?" for c in sorted(counts, key=lambda c: c or 0))


def render_kind(kind: OutputKind, rows: Sequence[PathStats], max_tokens: int) -> list[str]:
    """One output kind: the table of rows (a)..(d) and the target checks."""
    header = ("path", "tokens", "tokens/s", "TTFT p50", "inter-token p50", "inter-token p99",
              "tokens/s vs (a)", "text = (a)")  # fmt: skip
    raw = rows[0]
    raw_rate = raw.tokens_per_second()
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        if row.unavailable or not row.runs:
            table.append((row.label, row.unavailable or "n/a", *("-" for _ in header[2:])))
            continue
        gaps = row.gaps()
        rate = row.tokens_per_second()
        table.append(
            (
                row.label,
                _tokens_cell(row),
                f"{rate:,.1f}",
                _ms(row.ttft()),
                _ms(percentile(gaps, 0.50)) if gaps else "-",
                _ms(percentile(gaps, 0.99)) if gaps else "-",
                f"{rate / raw_rate:.2f}x" if raw_rate else "-",
                "yes" if all(row.text_matches) else "NO",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [f"## {kind.title}", "", line(header).rstrip()]
    lines.append(line(["-" * width for width in widths]).rstrip())
    lines += [line(cells).rstrip() for cells in table[1:]]
    lines.append("")
    lines += _checks(rows, max_tokens)
    return lines


def _checks(rows: Sequence[PathStats], max_tokens: int) -> list[str]:
    raw, worker, completion, server = rows

    def verdict(passed: bool) -> str:
        return "PASS" if passed else "MISS"

    if not raw.runs or not worker.runs:
        return ["targets: not measured"]
    rate_a, rate_b = raw.tokens_per_second(), worker.tokens_per_second()
    ttft_delta = worker.ttft() - raw.ttft()
    first_text = [run.first_text for run in raw.runs if run.first_text is not None]
    ttft_text_delta = worker.ttft() - statistics.median(first_text) if first_text else 0.0
    lines = [
        f"target (b) >= {TARGET_RATIO:.2f}x (a) tokens/s: {rate_b / rate_a:.3f}x  "
        f"{verdict(rate_b >= TARGET_RATIO * rate_a)}",
        f"target TTFT (b) within {TARGET_TTFT_DELTA_S * 1000:.0f} ms of (a): "
        f"{ttft_delta * 1000:+.2f} ms  {verdict(ttft_delta <= TARGET_TTFT_DELTA_S)}",
        f"  (info) TTFT (b) vs (a)'s first complete character (token ids decoded after "
        f"timing): {ttft_text_delta * 1000:+.2f} ms",
    ]
    for other, name in ((completion, "(c)"), (server, "(d)")):
        if other.unavailable or not other.runs:
            lines.append(f"target (b) faster than {name}: {other.unavailable or 'n/a'}")
            continue
        rate = other.tokens_per_second()
        lines.append(
            f"target (b) faster than {name}: {rate_b:,.1f} vs {rate:,.1f} tokens/s  "
            f"{verdict(rate_b > rate)}"
        )
    exact = [
        row.label[:3]
        for row in rows
        if row.runs and any(count != max_tokens for count in row.tokens)
    ]
    if exact:
        lines.append(
            f"token count: {', '.join(exact)} did not generate exactly {max_tokens} tokens "
            "in every run (see the tokens column)"
        )
    else:
        lines.append(f"token count: every measured path generated exactly {max_tokens} tokens")
    return lines


def render_report(result: BenchResult, command: str, max_tokens: int) -> str:
    """The plain-text report: command, date, machine, facts, then one table per kind."""
    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "notes:    tokens/s = tokens / (last content arrival - request start); TTFT = first",
        "          content arrival; gaps between content arrivals (per message for (b), per",
        "          chunk/event for (c)/(d)); medians over runs, gaps pooled. (a) times token ids",
        "          only. Tokens of (c)/(d) counted against (a)'s token pieces.",
    ]
    kinds = {kind.name: kind for kind in OUTPUT_KINDS}
    for name, rows in result.stats.items():
        lines.append("")
        lines += render_kind(kinds[name], rows, max_tokens)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults are the issue's numbers)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs per path and kind")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the model")
    parser.add_argument("--keep", action="store_true", help="keep the model and logs")
    parser.add_argument("--no-llama-server", action="store_true", help="skip (d), llama_cpp.server")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda:N (a GPU build of llama-cpp-python; every layer offloaded on every path)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads on every path (default: every usable core); fewer leaves cores "
        "for the worker's gRPC and the client",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; 0 whatever the targets say."""
    args = parse_args(argv)
    progress = Progress()

    config = BenchConfig(
        runs=max(1, args.runs),
        tokens=max(2, args.tokens),
        workdir=args.workdir,
        keep=args.keep,
        with_llama_server=not args.no_llama_server,
        threads=max(1, args.threads) if args.threads else None,
        device=args.device,
        progress=progress,
    )
    result = run_benchmark(config)
    command = command_line("bench.stream", argv)
    print(render_report(result, command, config.tokens))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
