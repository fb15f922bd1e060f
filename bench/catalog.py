"""Catalog benchmark: rbee's catalog (gRPC over SQLite) against the seed-style store.

    python -m bench.catalog [--models 100000] [--iterations 1000] [--seed 0] [--workdir DIR]

Measures, at `--models` models: time to open the catalog, GetModel p50/p99 and ListModels (page
of 100, with a filter, walking pages with the page tokens) p50/p99 over gRPC on loopback, and
the inspect time of a Llama-3-70B-shaped header-only GGUF. The same operations run on a
seed-style store (the original rbee's catalog: one directory per artifact holding
metadata.json) as the baseline, in this process. rbee's server is the real `rbee-catalog`
in its own process, as clients meet it. Prints a table and exits 0: a benchmark
reports, it does not assert.

Three breakdown rows say where GetModel's time goes. GetModel of random ids, GetModel of one
model again and again (its serialized message cached: the handler's cheapest path) and a bare
Health.Check (the transport's floor) are measured one of each per round, so they see the same
moments of the host. A last row times Health.Check after the server sat idle for 20 ms: on a
virtual machine whose idle CPUs halt, waking the server's threads is a cost of its own. The
ListModels target row walks the same first pages again and again; two more rows walk every
page in turn to the last, pages no earlier call read.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from bench.console import Progress, command_line
from bench.processes import stop_process, wait_serving
from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from services.catalog import convert
from services.catalog.domain import (
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
    WeightsBreakdown,
)
from services.catalog.filtering import ModelFilter, parse_model_filter
from services.catalog.inspect import inspect_path, warm_imports
from services.catalog.message_cache import ProtobufModelEncoder
from services.catalog.pagination import normalize_page_size
from services.catalog.store import CatalogStore
from tests.fixtures.gguf_models import (
    LLAMA3_70B,
    LLAMA3_MERGES,
    GGMLType,
    write_header_only_gguf,
)

LIST_FILTER = "format=gguf AND state=ready"
PAGE_SIZE = 100
PAGES_PER_WALK = 10  # a List sample walks this many pages with the tokens, then starts over
LAYERS = 32
RPC_DEADLINE_S = 30.0
# Health checks sent after the server sat idle, and how long it sat idle before each.
IDLE_CHECKS = 100
IDLE_GAP_S = 0.02

TARGET_GET_P99_MS = 2.0
TARGET_LIST_P99_MS = 15.0
TARGET_OPEN_S = 1.0
TARGET_INSPECT_MS = 50.0
TARGET_LIST_SPEEDUP = 20.0


# --- realistic models -----------------------------------------------------------------------

_LLM_ARCHS = (
    # (architecture, display stem, parameters, embedding, feed-forward, heads, kv heads, vocab)
    ("llama", "Llama 3.1 8B Instruct", 8_030_261_248, 4096, 14_336, 32, 8, 128_256),
    ("mistral", "Mistral 7B Instruct v0.3", 7_248_023_552, 4096, 14_336, 32, 8, 32_768),
    ("qwen2", "Qwen2.5 7B Instruct", 7_615_616_512, 3584, 18_944, 28, 4, 152_064),
    ("phi3", "Phi 3 Mini 4k Instruct", 3_821_079_552, 3072, 8192, 32, 32, 32_064),
    ("gemma2", "Gemma 2 9B It", 9_241_705_984, 3584, 14_336, 16, 8, 256_000),
    ("deepseek2", "DeepSeek V2 Lite Chat", 15_706_484_224, 2048, 10_944, 16, 16, 102_400),
)
_GGUF_QUANTS = (
    # (label, llama.cpp file_type, bits per weight)
    ("Q4_K_M", 15, 4.85),
    ("Q5_K_M", 17, 5.69),
    ("Q8_0", 7, 8.5),
    ("Q6_K", 18, 6.56),
    ("IQ4_XS", 30, 4.25),
    ("F16", 1, 16.0),
)
_IMAGE_FAMILIES = (
    # (family, display stem, parameters, needs_components)
    ("sdxl", "Stable Diffusion XL Base 1.0", 3_470_000_000, ()),
    ("sd1", "Stable Diffusion 1.5", 1_066_000_000, ()),
    ("flux-dev", "FLUX.1 dev", 11_900_000_000, ("text_encoder", "vae")),
    ("sd3.5-large", "Stable Diffusion 3.5 Large", 8_100_000_000, ()),
    ("playground-v2.5", "Playground v2.5", 3_470_000_000, ()),
)
_ORGS = ("meta-llama", "mistralai", "qwen", "bartowski", "thebloke", "unsloth", "lmstudio")
_TEAMS = ("research", "prod", "eval", "sandbox")


def _state_for(rng: random.Random) -> ModelState:
    roll = rng.random()
    if roll < 0.85:
        return ModelState.READY
    return ModelState.DOWNLOADING if roll < 0.95 else ModelState.FAILED


def _llm_metadata(rng: random.Random, fmt: ModelFormat, index: int) -> ModelMetadata:
    arch, stem, params, n_embd, n_ff, n_head, n_kv, n_vocab = rng.choice(_LLM_ARCHS)
    file_type: int | None = None
    if fmt is ModelFormat.GGUF:
        quant, file_type, bpw = rng.choice(_GGUF_QUANTS)
    else:
        quant, bpw = rng.choice(("BF16", "F16")), 16.0
    total = int(params * bpw / 8)
    input_bytes = int(n_vocab * n_embd * bpw / 8)
    output_bytes = input_bytes + n_embd * 4
    per_layer = (total - input_bytes - output_bytes) // LAYERS
    layers = [per_layer + rng.randrange(0, 4096) for _ in range(LAYERS)]
    head_dim = n_embd // n_head
    return ModelMetadata(
        format=fmt,
        model_type=ModelType.LLM,
        name=f"{stem} {index}",
        architecture=arch,
        quantization=quant,
        file_type=file_type,
        parameter_count=params,
        context_length=rng.choice((4096, 8192, 32_768, 131_072)),
        block_count=LAYERS,
        embedding_length=n_embd,
        feed_forward_length=n_ff,
        head_count=n_head,
        head_count_kv=n_kv,
        key_length=head_dim,
        value_length=head_dim,
        vocab_size=n_vocab,
        sliding_window=4096 if arch in ("mistral", "gemma2") else None,
        tokenizer_model="gpt2" if arch != "phi3" else "llama",
        has_chat_template=True,
        kv_cache_bytes_per_token=2 * LAYERS * n_kv * head_dim * 2,
        dtypes={quant.lower(): LAYERS * 7 + 2, "f32": LAYERS * 2 + 1},
        tensor_count=LAYERS * 9 + 3,
        weights=WeightsBreakdown(
            total_bytes=total,
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            other_bytes=rng.randrange(0, 1 << 20),
            layer_bytes=layers,
        ),
        size_bytes=total + rng.randrange(1 << 20, 8 << 20),
        hints={"general.license": "apache-2.0", "general.quantized_by": rng.choice(_ORGS)},
    )


def _image_metadata(rng: random.Random, fmt: ModelFormat, index: int) -> ModelMetadata:
    family, stem, params, needs = rng.choice(_IMAGE_FAMILIES)
    is_lora = fmt is ModelFormat.SAFETENSORS
    size = rng.randrange(20 << 20, 400 << 20) if is_lora else params * 2
    return ModelMetadata(
        format=fmt,
        model_type=ModelType.LORA if is_lora else ModelType.IMAGE,
        name=f"{stem} {index}",
        family=family,
        variant=rng.choice((None, None, "inpaint")),
        quantization=rng.choice(("F16", "BF16")),
        parameter_count=None if is_lora else params,
        needs_components=list(needs),
        dtypes={"f16": rng.randrange(200, 2000), "f32": rng.randrange(0, 20)},
        tensor_count=rng.randrange(200, 2500),
        weights=WeightsBreakdown(total_bytes=size),
        size_bytes=size,
        hints={"modelspec.architecture": f"{family}/v1", "modelspec.title": stem},
    )


def build_model(index: int, rng: random.Random, now: datetime) -> Model:
    """One realistic catalog entry: varied format, type, architecture, quantization, state."""
    roll = rng.random()
    if roll < 0.60:
        fmt = ModelFormat.GGUF
    elif roll < 0.85:
        fmt = ModelFormat.SAFETENSORS
    else:
        fmt = ModelFormat.DIFFUSERS
    # Safetensors are LLM folders half the time and SD LoRAs otherwise; diffusers are images.
    is_llm = fmt is ModelFormat.GGUF or (fmt is ModelFormat.SAFETENSORS and rng.random() < 0.5)
    metadata = (_llm_metadata if is_llm else _image_metadata)(rng, fmt, index)
    state = _state_for(rng)
    org = rng.choice(_ORGS)
    slug = (metadata.architecture or metadata.family or "model").replace(".", "-")
    quant = (metadata.quantization or "").lower().replace("_", "-")
    model_id = f"{slug}-{quant}-{index:07d}"
    file_name = f"{slug}-{quant}.gguf" if fmt is ModelFormat.GGUF else "model.safetensors"
    if rng.random() < 0.8:
        source = ModelSource(
            kind=SourceKind.HUGGINGFACE,
            repo=f"{org}/{slug}-{index}",
            revision="main",
            commit=f"{rng.getrandbits(160):040x}",
            files=[file_name] if fmt is not ModelFormat.DIFFUSERS else [],
        )
    else:
        source = ModelSource(
            kind=SourceKind.CIVITAI,
            civitai_model_id=100_000 + index,
            civitai_version_id=900_000 + index,
            base_model=metadata.family or "SDXL 1.0",
        )
    created = now - timedelta(seconds=rng.randrange(0, 365 * 86_400))
    folder = f"/var/lib/rbee/models/{model_id}"
    path = folder if fmt is ModelFormat.DIFFUSERS else f"{folder}/{file_name}"
    return Model(
        id=model_id,
        display_name=metadata.name or model_id,
        source=source,
        paths=[path],
        size_bytes=metadata.size_bytes,
        sha256=f"{rng.getrandbits(256):064x}" if fmt is not ModelFormat.DIFFUSERS else None,
        state=state,
        state_message={
            ModelState.READY: "",
            ModelState.DOWNLOADING: "42% of the files downloaded",
            ModelState.FAILED: "inspection failed: truncated tensor data",
        }[state],
        # A model being downloaded has not been inspected yet.
        metadata=None if state is ModelState.DOWNLOADING else metadata,
        labels={"team": rng.choice(_TEAMS), "origin": org, "tier": str(rng.randrange(3))},
        created_at=created,
        updated_at=created,
        etag=f"{rng.getrandbits(64):016x}",
    )


def build_models(count: int, seed: int) -> Iterator[Model]:
    """`count` realistic models, identical for a given seed."""
    rng = random.Random(seed)
    now = datetime(2026, 11, 22, tzinfo=UTC)
    for index in range(count):
        yield build_model(index, rng, now)


# --- rbee: populate the SQLite catalog -------------------------------------------------------

POPULATE_BATCH = 10_000  # models per create_models transaction: bounded memory, few fsyncs


def populate_rbee(database: Path, models: Iterable[Model]) -> int:
    """Insert `models` into the catalog database at `database` through the store's own bulk
    path, `CatalogStore.create_models` (each model stored as create_model stores it), in
    transactions of POPULATE_BATCH models, with the encoder the catalog's store writes with
    (each model's serialized message kept beside it, as a CreateModel would keep it).
    Returns how many models were inserted."""
    count = 0
    with CatalogStore.open(database, encoder=ProtobufModelEncoder()) as store:
        for batch in _batches(models):
            count += len(store.create_models(batch))
    return count


def _batches(models: Iterable[Model]) -> Iterator[list[Model]]:
    batch: list[Model] = []
    for model in models:
        batch.append(model)
        if len(batch) == POPULATE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# --- the baseline: the original rbee's seed-style catalog ------------------------------------


class SeedStyleRecord(BaseModel):
    """metadata.json of the original catalog: `{artifact, added_at, last_accessed}`."""

    artifact: Model
    added_at: datetime
    last_accessed: datetime


class SeedStyleCatalog:
    """The original rbee's FilesystemCatalog, faithfully in Python.

    One directory per artifact under `root`, holding a pretty-printed metadata.json. `get`
    reads the file and rewrites it to update `last_accessed` (as the original did on every
    read, with a plain write: no temp file, no fsync). `list` reads every directory's
    metadata.json, fully parses it (the original's serde typed parse; here pydantic's, also
    native code), skips the unparsable, then filters, sorts by id and pages (the original had
    no filter or paging: the caller did that on the full list).
    """

    METADATA = "metadata.json"

    def __init__(self, root: Path) -> None:
        """Use `SeedStyleCatalog.open`."""
        self._root = root

    @classmethod
    def open(cls, root: Path) -> SeedStyleCatalog:
        """The original's constructor: create the root directory, nothing else."""
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def _file(self, model_id: str) -> Path:
        # The original replaced "/" and ":" with "-"; our ids never contain either.
        return self._root / model_id.replace("/", "-").replace(":", "-") / self.METADATA

    def add(self, model: Model) -> None:
        """Write a new artifact; fails when it already exists."""
        path = self._file(model.id)
        if path.exists():
            raise FileExistsError(f"artifact {model.id} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        record = SeedStyleRecord(artifact=model, added_at=now, last_accessed=now)
        path.write_text(record.model_dump_json(indent=2))

    def get(self, model_id: str) -> Model:
        """Read the artifact, then rewrite its file with a fresh `last_accessed`."""
        path = self._file(model_id)
        raw = path.read_bytes()  # FileNotFoundError when there is no such artifact
        record = SeedStyleRecord.model_validate_json(raw)
        record.last_accessed = datetime.now(UTC)
        path.write_text(record.model_dump_json(indent=2))
        return record.artifact

    def all(self) -> list[Model]:
        """Every parsable artifact (what the original's list returned)."""
        models: list[Model] = []
        with os.scandir(self._root) as entries:
            for entry in entries:
                if not entry.is_dir():
                    continue
                try:
                    raw = Path(entry.path, self.METADATA).read_bytes()
                    models.append(SeedStyleRecord.model_validate_json(raw).artifact)
                except (OSError, ValueError):
                    continue  # the original skipped entries that failed to parse
        return models

    def list(
        self, flt: ModelFilter, *, page_size: int, page_token: str = ""
    ) -> tuple[list[Model], str]:
        """One page of matching models by id, and the next page token ("" after the last)."""
        size = normalize_page_size(page_size)
        after = base64.urlsafe_b64decode(page_token).decode() if page_token else ""
        matching = sorted((m for m in self.all() if flt.matches(m)), key=lambda m: m.id)
        if after:
            matching = [m for m in matching if m.id > after]
        page = matching[:size]
        more = len(matching) > size
        token = base64.urlsafe_b64encode(page[-1].id.encode()).decode() if more else ""
        return page, token

    def __len__(self) -> int:
        """How many artifact directories there are (the original's `len`)."""
        with os.scandir(self._root) as entries:
            return sum(1 for entry in entries if entry.is_dir())


def populate_baseline(root: Path, models: Iterable[Model]) -> int:
    """Add `models` to a seed-style catalog at `root` through its own `add`."""
    catalog = SeedStyleCatalog.open(root)
    count = 0
    for model in models:
        catalog.add(model)
        count += 1
    return count


# --- measuring -------------------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in (0, 1]) of non-empty `samples`."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def timed(fn: Callable[[], object], count: int) -> list[float]:
    """Run `fn` `count` times; the wall time of each call in seconds."""
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def timed_round(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Call each of `fns` once, in order; the wall time of each call in seconds."""
    samples: list[float] = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class PageWalker:
    """Calls a List function page after page with the returned tokens, restarting after
    `pages_per_walk` pages (PAGES_PER_WALK) or at the last page, so samples cover first and
    later pages."""

    def __init__(
        self, list_page: Callable[[str], str], pages_per_walk: int = PAGES_PER_WALK
    ) -> None:
        self._list_page = list_page
        self._pages_per_walk = pages_per_walk
        self._token = ""
        self._pages = 0

    def __call__(self) -> None:
        token = self._list_page(self._token)
        self._pages += 1
        if not token or self._pages >= self._pages_per_walk:
            token, self._pages = "", 0
        self._token = token


@dataclass
class Samples:
    """Timings in seconds, by measurement name."""

    by_name: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, samples: list[float]) -> None:
        self.by_name[name] = samples

    def get(self, name: str) -> list[float] | None:
        return self.by_name.get(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def catalog_process(
    home: Path,
    *,
    log: Path | None = None,
    token: str = "",
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """The real `rbee-catalog` (python -m services.catalog) on `home`, as clients meet it: its
    own process, gated on grpc.health.v1 SERVING (exempt from the token, so auth on works too),
    stopped on exit. `token` turns auth on (none inherited from this environment); `log`
    takes its stderr; `env` adds settings (e.g. RBEE_CATALOG_HANDLER_THREADS). Yields
    (address, pid)."""
    address = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "RBEE_HOME": str(home),
        "RBEE_CATALOG_LISTEN": address,
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_CATALOG_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    env.pop("RBEE_AUTH_TOKEN_FILE", None)
    env.pop("RBEE_AUTH_TOKEN", None)
    if token:
        env["RBEE_AUTH_TOKEN"] = token
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None else None
        process = subprocess.Popen(
            [sys.executable, "-m", "services.catalog"],
            env=env,
            stdout=subprocess.DEVNULL if log is not None else None,
            stderr=stderr,
        )
    try:
        wait_serving(address, process, name="rbee-catalog", timeout=timeout, log=log)
        yield address, process.pid
    finally:
        stop_process(process)


def measure_rbee_grpc(
    address: str, ids: Sequence[str], iterations: int, rng: random.Random, gguf_path: Path
) -> dict[str, list[float]]:
    """GetModel, ListModels and InspectPath over gRPC with sync stubs, after a warm-up."""
    with grpc.insecure_channel(address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)

        def get() -> None:
            stub.GetModel(
                pb.GetModelRequest(name=f"models/{rng.choice(ids)}"), timeout=RPC_DEADLINE_S
            )

        def list_page(token: str) -> str:
            response = stub.ListModels(
                pb.ListModelsRequest(filter=LIST_FILTER, page_size=PAGE_SIZE, page_token=token),
                timeout=RPC_DEADLINE_S,
            )
            if len(response.models) != PAGE_SIZE and response.next_page_token:
                raise RuntimeError("ListModels returned a short page before the last one")
            return str(response.next_page_token)

        def inspect() -> None:
            stub.InspectPath(pb.InspectPathRequest(path=str(gguf_path)), timeout=RPC_DEADLINE_S)

        health = health_pb2_grpc.HealthStub(channel)

        def check() -> None:
            health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_DEADLINE_S)

        hit_request = pb.GetModelRequest(name=f"models/{ids[0]}")

        def get_hit() -> None:
            stub.GetModel(hit_request, timeout=RPC_DEADLINE_S)

        walker = PageWalker(list_page)
        warmup = max(10, iterations // 10)
        for fn in (get, get_hit, walker, check):
            timed(fn, warmup)
        # GetModel of random ids, GetModel of one model (its message cached after the first
        # call) and the bare Health.Check, one of each per round: the three see the same
        # moments of the host, so their differences are the handler's own costs.
        rounds = [timed_round((get, get_hit, check)) for _ in range(iterations)]
        samples = {
            "get": [r[0] for r in rounds],
            "get_hit": [r[1] for r in rounds],
            "health": [r[2] for r in rounds],
            "list": timed(walker, iterations),
            # Every page in turn, to the last: pages no earlier call read (the List row walks
            # the same first pages again, which the catalog's message cache then holds).
            "list_cold": timed(PageWalker(list_page, pages_per_walk=sys.maxsize), iterations),
            "inspect_grpc": timed(inspect, 5),
        }
        # The same Health.Check after the server sat idle: what waking the server's threads
        # (and an idle CPU) costs on this host, paid by any call that finds the server idle.
        samples["health_idle"] = []
        for _ in range(IDLE_CHECKS):
            time.sleep(IDLE_GAP_S)
            samples["health_idle"].extend(timed(check, 1))
        return samples


def measure_rbee_in_process(
    database: Path, ids: Sequence[str], iterations: int, rng: random.Random
) -> dict[str, list[float]]:
    """The store alone (no gRPC): where the RPC time goes."""
    flt = parse_model_filter(LIST_FILTER)
    with CatalogStore.open(database) as store:

        def list_page(token: str) -> str:
            return store.list_models(flt, page_size=PAGE_SIZE, page_token=token)[1]

        walker = PageWalker(list_page)
        count = max(10, iterations // 4)
        timed(walker, 10)
        page = store.list_models(flt, page_size=PAGE_SIZE)[0]
        response = pb.ListModelsResponse(models=[convert.model_to_pb(m) for m in page])
        wire = response.SerializeToString()
        return {
            "store_get": timed(lambda: store.get_model(rng.choice(ids)), count),
            "store_list": timed(walker, count),
            "store_count": timed(lambda: store.count_models(flt), count),
            "to_pb": timed(lambda: [convert.model_to_pb(m) for m in page], count),
            "pb_wire": timed(
                lambda: pb.ListModelsResponse.FromString(response.SerializeToString()), count
            ),
            "page_bytes": [float(len(wire))],
        }


def measure_baseline(
    root: Path, ids: Sequence[str], iterations: int, list_iterations: int, rng: random.Random
) -> dict[str, list[float]]:
    """The seed-style store in-process: open, Get (read + rewrite), List (full scan per page)."""
    flt = parse_model_filter(LIST_FILTER)
    opens = timed(lambda: SeedStyleCatalog.open(root), 5)
    catalog = SeedStyleCatalog.open(root)

    def list_page(token: str) -> str:
        return catalog.list(flt, page_size=PAGE_SIZE, page_token=token)[1]

    walker = PageWalker(list_page)
    get_samples = timed(lambda: catalog.get(rng.choice(ids)), iterations)
    return {
        "base_open": opens,
        "base_len": timed(lambda: len(catalog), 3),
        "base_get": get_samples,
        "base_list": timed(walker, list_iterations),
    }


def write_inspect_gguf(path: Path, *, realistic_tokenizer: bool = True) -> Path:
    """A Llama-3-70B-shaped header-only GGUF (Q2_K body, Q6_K output head): ~24 GB apparent,
    a few MB on disk. With `realistic_tokenizer`, the full Llama-3 token and merge arrays."""
    return write_header_only_gguf(
        path,
        **LLAMA3_70B,
        file_type=10,  # MOSTLY_Q2_K
        tensor_type=GGMLType.Q2_K,
        output_type=GGMLType.Q6_K,
        vocab_arrays=realistic_tokenizer,
        n_merges=LLAMA3_MERGES if realistic_tokenizer else 0,
    )


def measure_inspect(path: Path, runs: int) -> tuple[float, list[float]]:
    """The first inspect_path call in this process and `runs` more. The readers are imported
    first, as the catalog does in a thread at start (`warm_imports`)."""
    warm_imports()
    start = time.perf_counter()
    inspect_path(path)
    first = time.perf_counter() - start
    return first, timed(lambda: inspect_path(path), runs)


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table. Values are display strings; "-" when not meaningful."""

    metric: str
    rbee: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "info"
    result: str = ""

    def cells(self) -> tuple[str, str, str, str, str, str]:
        """The row's cells, in column order."""
        return (self.metric, self.rbee, self.baseline, self.ratio, self.target, self.result)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def _ratio(baseline: float, rbee: float) -> str:
    return f"{baseline / rbee:.1f}x" if rbee > 0 else "-"


@dataclass
class BenchConfig:
    """What to run: sizes, iteration counts, where to put files."""

    models: int = 100_000
    iterations: int = 1000
    baseline_list_iterations: int = 5
    inspect_runs: int = 20
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False
    realistic_tokenizer: bool = True
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class BenchResult:
    """The table's rows and the facts printed above it."""

    rows: list[Row]
    facts: list[tuple[str, str]]
    workdir: Path


@contextmanager
def bench_workdir(prefix: str, parent: Path | None, *, keep: bool) -> Iterator[Path]:
    """A fresh work directory (under `parent` when given), removed afterwards unless `keep`."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield workdir
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Populate both stores, measure every operation, and return the table's rows."""
    with bench_workdir("rbee-bench-catalog-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    home = workdir / "home"
    database = home / "catalog" / "catalog.db"
    baseline_root = workdir / "seed-style" / "models"
    rng = random.Random(config.seed)

    say(f"populating rbee's catalog with {config.models} models")
    ids: list[str] = []
    start = time.perf_counter()
    populate_rbee(database, _recording_ids(build_models(config.models, config.seed), ids))
    rbee_populate = time.perf_counter() - start

    say(f"populating the seed-style catalog with {config.models} models")
    start = time.perf_counter()
    populate_baseline(baseline_root, build_models(config.models, config.seed))
    baseline_populate = time.perf_counter() - start

    say("opening the catalog")
    first_open = timed(lambda: CatalogStore.open(database).close(), 1)[0]
    opens = timed(lambda: CatalogStore.open(database).close(), 5)

    say("writing the header-only GGUF")
    gguf_path = write_inspect_gguf(
        workdir / "llama-3-70b-q2_k.gguf", realistic_tokenizer=config.realistic_tokenizer
    )
    say("inspecting it")
    inspect_first, inspect_runs = measure_inspect(gguf_path, config.inspect_runs)

    say("measuring the store in-process")
    local = measure_rbee_in_process(database, ids, config.iterations, rng)

    say("starting the catalog server and measuring over gRPC")
    start = time.perf_counter()
    with catalog_process(home) as (address, _):
        server_start = time.perf_counter() - start
        remote = measure_rbee_grpc(address, ids, config.iterations, rng, gguf_path)

    say("measuring the seed-style baseline")
    base = measure_baseline(
        baseline_root, ids, config.iterations, config.baseline_list_iterations, rng
    )

    matching = sum(1 for _ in _matching_ids(database))
    rows = _rows(
        rbee_populate=rbee_populate,
        baseline_populate=baseline_populate,
        first_open=first_open,
        opens=opens,
        server_start=server_start,
        inspect_first=inspect_first,
        inspect_runs=inspect_runs,
        local=local,
        remote=remote,
        base=base,
    )
    facts = [
        ("models", f"{config.models:,}"),
        ("filter", f"{LIST_FILTER!r} matches {matching:,} models; page size {PAGE_SIZE}"),
        (
            "iterations",
            f"{config.iterations} per rbee RPC (after {max(10, config.iterations // 10)} "
            f"warm-up), baseline Get {config.iterations}, baseline List "
            f"{config.baseline_list_iterations}",
        ),
        ("database", f"{_file_size(database) / 1e6:.0f} MB"),
        ("gguf", f"{gguf_path.name}: {gguf_path.stat().st_size / 1e9:.1f} GB apparent"),
    ]
    return BenchResult(rows=rows, facts=facts, workdir=workdir)


def _recording_ids(models: Iterable[Model], ids: list[str]) -> Iterator[Model]:
    for model in models:
        ids.append(model.id)
        yield model


def _matching_ids(database: Path) -> Iterator[str]:
    flt = parse_model_filter(LIST_FILTER)
    with CatalogStore.open(database) as store:
        token = ""
        while True:
            page, token = store.list_models(flt, page_size=1000, page_token=token)
            yield from (model.id for model in page)
            if not token:
                return


def _file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _rows(
    *,
    rbee_populate: float,
    baseline_populate: float,
    first_open: float,
    opens: list[float],
    server_start: float,
    inspect_first: float,
    inspect_runs: list[float],
    local: dict[str, list[float]],
    remote: dict[str, list[float]],
    base: dict[str, list[float]],
) -> list[Row]:
    get50, get99 = percentile(remote["get"], 0.5), percentile(remote["get"], 0.99)
    list50, list99 = percentile(remote["list"], 0.5), percentile(remote["list"], 0.99)
    bget50, bget99 = percentile(base["base_get"], 0.5), percentile(base["base_get"], 0.99)
    blist50, blist99 = percentile(base["base_list"], 0.5), percentile(base["base_list"], 0.99)
    open50 = percentile(opens, 0.5)
    inspect50 = percentile(inspect_runs, 0.5)
    return [
        Row("populate (create_models per 10k / add per dir)", _s(rbee_populate),
            _s(baseline_populate), _ratio(baseline_populate, rbee_populate)),
        Row("open: first after populate", _ms(first_open),
            _ms(base["base_open"][0]) + " (mkdir -p only)",
            target=f"< {TARGET_OPEN_S:.0f} s", result=_verdict(first_open < TARGET_OPEN_S)),
        Row("open: p50 of 5", _ms(open50), _ms(percentile(base["base_open"], 0.5)),
            target=f"< {TARGET_OPEN_S:.0f} s", result=_verdict(open50 < TARGET_OPEN_S)),
        Row("server start to SERVING (open + bind)", _ms(server_start)),
        Row("count all models (baseline: len = count dirs)", "-",
            _ms(percentile(base["base_len"], 0.5))),
        Row("GetModel p50", _ms(get50), _ms(bget50), _ratio(bget50, get50)),
        Row("GetModel p99", _ms(get99), _ms(bget99), _ratio(bget99, get99),
            f"< {TARGET_GET_P99_MS:g} ms", _verdict(get99 * 1000 < TARGET_GET_P99_MS)),
        Row("ListModels page 100 + filter p50", _ms(list50), _ms(blist50),
            _ratio(blist50, list50), f">= {TARGET_LIST_SPEEDUP:g}x",
            _verdict(blist50 / list50 >= TARGET_LIST_SPEEDUP)),
        Row("ListModels page 100 + filter p99", _ms(list99), _ms(blist99),
            _ratio(blist99, list99), f"< {TARGET_LIST_P99_MS:g} ms",
            _verdict(list99 * 1000 < TARGET_LIST_P99_MS)),
        Row("  ListModels walking every page in turn (pages not read before) p50",
            _ms(percentile(remote["list_cold"], 0.5))),
        Row("  ListModels walking every page in turn (pages not read before) p99",
            _ms(percentile(remote["list_cold"], 0.99))),
        Row("  in-process store.get_model p50", _ms(percentile(local["store_get"], 0.5))),
        Row("  in-process store.list_models p50 (page only)",
            _ms(percentile(local["store_list"], 0.5))),
        Row("  in-process store.count_models p50 (total_size)",
            _ms(percentile(local["store_count"], 0.5))),
        Row("  convert a page to protobuf (model_to_pb x100) p50",
            _ms(percentile(local["to_pb"], 0.5))),
        Row(f"  serialize + parse a page ({local['page_bytes'][0] / 1000:.0f} kB) p50",
            _ms(percentile(local["pb_wire"], 0.5))),
        Row("  gRPC floor: Health.Check on the same server p50",
            _ms(percentile(remote["health"], 0.5))),
        Row("  gRPC floor: Health.Check on the same server p99",
            _ms(percentile(remote["health"], 0.99))),
        Row("  GetModel of one model again and again (cached message) p50",
            _ms(percentile(remote["get_hit"], 0.5))),
        Row("  GetModel of one model again and again (cached message) p99",
            _ms(percentile(remote["get_hit"], 0.99))),
        Row(f"  gRPC floor after {IDLE_GAP_S * 1000:.0f} ms idle: Health.Check p50 of "
            f"{len(remote['health_idle'])}", _ms(percentile(remote["health_idle"], 0.5))),
        Row("inspect 70B header-only GGUF: first run", _ms(inspect_first), "n/a (none)",
            target=f"< {TARGET_INSPECT_MS:g} ms",
            result=_verdict(inspect_first * 1000 < TARGET_INSPECT_MS)),
        Row(f"inspect: p50 of {len(inspect_runs)}", _ms(inspect50), "n/a (none)",
            target=f"< {TARGET_INSPECT_MS:g} ms",
            result=_verdict(inspect50 * 1000 < TARGET_INSPECT_MS)),
        Row("inspect over gRPC (InspectPath) p50 of 5",
            _ms(percentile(remote["inspect_grpc"], 0.5)), "n/a (none)"),
    ]  # fmt: skip


# How each row's metric starts (indentation stripped), in table order.
ROW_METRICS = (
    "populate",
    "open: first",
    "open: p50",
    "server start",
    "count all models",
    "GetModel p50",
    "GetModel p99",
    "ListModels page 100 + filter p50",
    "ListModels page 100 + filter p99",
    "ListModels walking every page in turn (pages not read before) p50",
    "ListModels walking every page in turn (pages not read before) p99",
    "in-process store.get_model",
    "in-process store.list_models",
    "in-process store.count_models",
    "convert a page to protobuf",
    "serialize + parse a page",
    "gRPC floor: Health.Check on the same server p50",
    "gRPC floor: Health.Check on the same server p99",
    "GetModel of one model again and again (cached message) p50",
    "GetModel of one model again and again (cached message) p99",
    "gRPC floor after",
    "inspect 70B header-only GGUF: first run",
    "inspect: p50",
    "inspect over gRPC",
)


def render_table(result: BenchResult, command: str) -> str:
    """The plain-text report: command, date, machine, facts, then the aligned table."""
    header = Row("metric", "rbee (gRPC, SQLite)", "seed-style baseline (dir + metadata.json)",
                 "baseline/rbee", "target", "result")  # fmt: skip
    table = [header, *result.rows]
    columns = list(zip(*(row.cells() for row in table), strict=True))
    widths = [max(len(cell) for cell in column) for column in columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "notes:    rbee is measured over gRPC on loopback with sync stubs against the real",
        "          rbee-catalog process (the two share the machine's cores). The baseline runs",
        "          in-process (no RPC), which flatters it. Page cache warm for both. Baseline",
        "          List reads and parses every metadata.json per page, as the original did.",
        "",
        line(header.cells()).rstrip(),
        line(["-" * w for w in widths]).rstrip(),
        *(line(row.cells()).rstrip() for row in result.rows),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults are the issue's numbers)."""
    parser = argparse.ArgumentParser(prog="python -m bench.catalog", description=__doc__)
    parser.add_argument("--models", type=int, default=100_000, help="catalog size")
    parser.add_argument(
        "--iterations", type=int, default=1000, help="samples per rbee RPC and baseline Get"
    )
    parser.add_argument(
        "--baseline-list-iterations",
        type=int,
        default=5,
        help="baseline List samples (each reads every metadata.json)",
    )
    parser.add_argument("--inspect-runs", type=int, default=20, help="inspect samples")
    parser.add_argument("--seed", type=int, default=0, help="seed for models and random ids")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to create the stores (default: tmp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 0 whatever the targets say."""
    args = parse_args(argv)
    progress = Progress()

    config = BenchConfig(
        models=args.models,
        iterations=args.iterations,
        baseline_list_iterations=args.baseline_list_iterations,
        inspect_runs=args.inspect_runs,
        seed=args.seed,
        workdir=args.workdir,
        keep=args.keep,
        progress=progress,
    )
    result = run_benchmark(config)
    command = command_line("bench.catalog", argv)
    print(render_table(result, command))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
