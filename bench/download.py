"""Download benchmark (issue 3): our PullModel against curl and hf_hub_download, on loopback.

    python -m bench.download [--size 2GiB] [--rounds 3] [--workdir DIR] [--keep]
    python -m bench.download --files 4 [--parallel-files K]   # a sharded repo, pulled whole

One file of `--size` bytes (a safetensors file: a real header describing one U8 tensor, then a
sparse hole, so the catalog's inspection accepts it and the source costs no disk) is served by
the fake HF Hub (tests/fixtures/fake_hub.py) running in this process: its resolve URL answers
302 to the fake CDN on another port, which serves the bytes with os.sendfile. Three
contenders fetch it, in one run, the order rotated each round, every download to the same
filesystem (under the work directory):

  (a) curl          `curl -sS -L -o DEST <hub resolve URL>`: the same 302 -> CDN path our pull
                    takes; no hashing. Timed around the process.
  (b) hf_hub_download  `huggingface_hub.hf_hub_download(repo, file, endpoint=, cache_dir=<fresh>,
                    token=False)` in a fresh `python -c` subprocess (HF_HUB_DISABLE_XET=1,
                    HF_HUB_DISABLE_TELEMETRY=1, HF_HOME=<tmp> set before the import, since
                    huggingface_hub reads them at import). Timed inside the subprocess around
                    the call (interpreter start and import excluded).
  (c) rbee PullModel the real `rbee-catalog` and `rbee-provisioner` console scripts, started once
                    (gated on grpc.health.v1 SERVING); `ProvisionerClient.pull("hf:org/repo:file")`
                    consumed to the final catalog Model, whose sha256 (verified by the
                    provisioner against the Hub's) must equal the file's. Timed from the call to
                    the final Model (resolution and catalog registration included). Between
                    rounds the catalog model (DeleteModel), the pull (DeletePull) and the repo's
                    folder in the provisioner's HF cache are removed, so every round downloads
                    every byte. The provisioner's VmRSS is sampled every 20 ms during the pull.

With `--files N` the repo is a transformers-style one: N safetensors shards sharing `--size`
(distinct headers, so distinct sha256 and blobs), config.json and the weight index. (a) is one
`curl --parallel` fetching every file, (b) `snapshot_download` (its pool of 8 threads), (c) the
pull of `hf:bench/download-sharded`, whose files transfer `--parallel-files` at a time
(RBEE_PROVISIONER_PARALLEL_FILES; default the provisioner's). The issue's targets are for one
file, so this mode prints its ratios as information.

The source is read once (to hash it) before timing, so the page cache holds it for everyone;
os.sync() runs (untimed) after every download so each starts with no dirty pages queued. Each
downloaded file is checked for its size and removed. Reports medians over rounds, MB/s with
1 MB = 1e6 bytes, and the issue's targets. Prints a table and exits 0: a benchmark reports, it
does not assert.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.catalog import bench_workdir
from bench.console import Progress, command_line
from bench.processes import (
    RssSampler,
    cpu_seconds,
    free_port,
    resident_bytes,
    stop_process,
    wait_serving,
)
from rbee_client.catalog import CatalogClient
from rbee_client.provisioner import ProvisionerClient, PullUpdate
from services.catalog.domain import Model
from tests.fixtures.fake_hub import FakeHub

REPO_ID = "bench/download"
FILENAME = "bench-weights.safetensors"
SHARDED_REPO_ID = "bench/download-sharded"  # --files N: a transformers repo of N shards
DEFAULT_SIZE = 2 * 2**30
START_TIMEOUT_S = 60.0

PHASE_ORDER = ("queued", "resolving", "downloading", "verifying", "registering")

TARGET_VS_CURL = 0.9
TARGET_VS_HF = 1.0
TARGET_RSS_GROWTH_BYTES = 64 * 10**6

CURL, HF, RBEE = "curl", "hf", "rbee"
LABELS = {
    CURL: "(a) curl -sS -L -o (302 -> CDN)",
    HF: "(b) huggingface_hub.hf_hub_download",
    RBEE: "(c) rbee PullModel (sha256 verified)",
}
SHARDED_LABELS = {
    CURL: "(a) curl -sS -L --parallel (302 -> CDN)",
    HF: "(b) huggingface_hub.snapshot_download",
    RBEE: "(c) rbee PullModel, whole repo (sha256)",
}

# Run in a fresh interpreter: the env (HF_HUB_DISABLE_XET, ...) is read at import.
HF_SCRIPT = """
import sys, time
from huggingface_hub import hf_hub_download
repo, filename, endpoint, cache_dir = sys.argv[1:5]
start = time.perf_counter()
path = hf_hub_download(repo, filename, endpoint=endpoint, cache_dir=cache_dir, token=False)
print(time.perf_counter() - start)
print(path)
"""
# --files N: the whole repo, its files fetched by snapshot_download's thread pool (8 workers).
HF_SNAPSHOT_SCRIPT = """
import sys, time
from huggingface_hub import snapshot_download
repo, _filename, endpoint, cache_dir = sys.argv[1:5]
start = time.perf_counter()
path = snapshot_download(repo, endpoint=endpoint, cache_dir=cache_dir, token=False)
print(time.perf_counter() - start)
print(path)
"""


# --- the source file -------------------------------------------------------------------------


def write_source_file(path: Path, size: int, tag: str = "") -> Path:
    """A safetensors file of exactly `size` bytes: one U8 tensor filling the rest, a hole.
    `tag` goes into the header's metadata: shards with different tags differ (and so do their
    sha256, which the HF cache stores blobs by)."""
    header_len = 0
    while True:  # the tensor's length depends on the header's, whose digits depend on it
        data_len = size - 8 - header_len
        if data_len < 1:
            raise ValueError(f"size {size} is too small for a safetensors header")
        header = json.dumps(
            {
                "__metadata__": {"format": "pt", **({"shard": tag} if tag else {})},
                "weight": {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]},
            }
        ).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
        if len(header) == header_len:
            break
        header_len = len(header)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", header_len))
        out.write(header)
        out.truncate(size)
    return path


def sha256_megabytes_per_second(total: int = 256 * 2**20) -> float:
    """hashlib's sha256 throughput on one core, in memory (1 MB = 1e6 bytes): the ceiling of
    any single download that verifies its sha256 as it goes, whatever overlaps it."""
    buffer = bytes(4 * 2**20)
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(total // len(buffer)):
        digest.update(buffer)
    return total / 1e6 / (time.perf_counter() - start)


def sha256_file(path: Path) -> str:
    """The file's sha256 (reading it also puts it in the page cache for every contender)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the contenders --------------------------------------------------------------------------


@dataclass
class Measurement:
    """One download: its seconds and, for (c), the provisioner's resident memory growth."""

    seconds: float
    client_cpu: float = 0.0  # CPU seconds of the downloading process during the download
    rss_growth: int | None = None
    rss_before: int | None = None
    rss_samples: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # (c): state -> first seen (s)
    server_cpu: float = 0.0  # CPU seconds of this process (the fake Hub and CDN), filled later
    flush: float = 0.0  # seconds of the os.sync() right after, filled later


@dataclass(frozen=True)
class SourceFile:
    """One file of the benchmark's repo."""

    name: str
    size: int
    sha256: str
    url: str  # the Hub's resolve URL (302 -> CDN)


@dataclass(frozen=True)
class Target:
    """What every contender downloads: one file, or (--files N) every file of a sharded repo."""

    endpoint: str
    repo: str
    files: tuple[SourceFile, ...]

    @property
    def sharded(self) -> bool:
        """Whether this is the many-file repo (pulled whole) rather than one file."""
        return self.repo == SHARDED_REPO_ID

    @property
    def size(self) -> int:
        """Bytes of every file."""
        return sum(f.size for f in self.files)


def write_sharded_repo(directory: Path, size: int, shards: int) -> dict[str, Path]:
    """A transformers-style repo of `shards` safetensors files totalling about `size` bytes
    (each a valid header over a sparse hole), with its config.json and weight index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    files = {
        name: write_source_file(
            directory / name, size // shards + (size % shards if i == 0 else 0), tag=str(i)
        )
        for i, name in enumerate(names)
    }
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    index = {"metadata": {}, "weight_map": {f"shard{i}.weight": n for i, n in enumerate(names)}}
    for name, obj in (("config.json", config), ("model.safetensors.index.json", index)):
        (directory / name).write_text(json.dumps(obj))
        files[name] = directory / name
    return files


def _check_size(path: Path, size: int, who: str) -> None:
    actual = path.stat().st_size
    if actual != size:
        raise RuntimeError(f"{who} wrote {actual} bytes, expected {size}")


def _check_files(path: Path, target: Target, who: str) -> None:
    """`path`: the one file, or the snapshot folder holding every file of the sharded repo."""
    if not target.sharded:
        _check_size(path, target.files[0].size, who)
        return
    for file in target.files:
        _check_size(path / file.name, file.size, who)


def _download_timeout(size: int) -> float:
    return 120.0 + size / 10e6  # 10 MB/s at the very least, on any machine


def run_curl(target: Target, workdir: Path) -> Measurement:
    """(a) curl to files on the same filesystem, timed around the process (several files:
    one curl with --parallel, every file at once)."""
    folder = workdir / "curl"
    folder.mkdir(parents=True, exist_ok=True)
    command = ["curl", "-sS", "-L"]
    if len(target.files) > 1:
        # --parallel draws its own meter even under -s.
        command += ["--parallel", "--parallel-max", str(len(target.files)), "--no-progress-meter"]
    for file in target.files:
        command += ["-o", str(folder / file.name), file.url]
    children = _children_cpu()
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=_download_timeout(target.size))
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - children
    for file in target.files:
        _check_size(folder / file.name, file.size, "curl")
    flush = _flush()
    shutil.rmtree(folder)
    return Measurement(seconds, cpu, flush=flush)


def run_hf_hub_download(target: Target, workdir: Path) -> Measurement:
    """(b) hf_hub_download (several files: snapshot_download) in a fresh interpreter with a
    fresh cache, the call timed inside."""
    cache = workdir / "hf-cache"
    home = workdir / "hf-home"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE")
    }
    env.update(
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ENABLE_HF_TRANSFER="0",  # the plain client, as `pip install huggingface_hub`
        HF_HOME=str(home),
    )
    children = _children_cpu()
    script = HF_SNAPSHOT_SCRIPT if target.sharded else HF_SCRIPT
    done = subprocess.run(
        [sys.executable, "-c", script, target.repo, FILENAME, target.endpoint, str(cache)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=_download_timeout(target.size),
    )
    if done.returncode != 0:  # say why: the child's own error, not only its exit status
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"hf_hub_download failed (exit {done.returncode}):\n{tail}")
    cpu = _children_cpu() - children  # the interpreter's start and import included
    seconds_line, path_line = done.stdout.strip().splitlines()[-2:]
    _check_files(Path(path_line), target, "hf_hub_download")
    flush = _flush()
    shutil.rmtree(cache)
    shutil.rmtree(home, ignore_errors=True)
    return Measurement(float(seconds_line), cpu, flush=flush)


def _flush() -> float:
    """Seconds to write back what a download left dirty (before its file is removed, which
    would drop those pages unwritten). rbee fsyncs inside its timing; curl and
    hf_hub_download do not."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class RbeeServices:
    """The running catalog and provisioner, and what a round needs to undo its pull."""

    catalog_address: str
    provisioner_address: str
    provisioner: subprocess.Popen[bytes]
    hf_cache: Path
    sample_interval: float


@contextlib.contextmanager
def rbee_services(
    workdir: Path, hub_endpoint: str, sample_interval: float, parallel_files: int | None = None
) -> Iterator[RbeeServices]:
    """The real `rbee-catalog` and `rbee-provisioner` console scripts, gated on SERVING."""
    bin_dir = Path(sys.executable).parent
    catalog_address = f"127.0.0.1:{free_port()}"
    provisioner_address = f"127.0.0.1:{free_port()}"
    hf_cache = workdir / "rbee-hf-cache"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME")},
        "RBEE_HOME": str(workdir / "rbee-home"),
        "RBEE_LOG_LEVEL": "WARNING",
        "RBEE_CATALOG_LISTEN": catalog_address,
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_PROVISIONER_LISTEN": provisioner_address,
        "RBEE_PROVISIONER_METRICS_LISTEN": "",
        "RBEE_PROVISIONER_CATALOG_ADDRESS": catalog_address,
        "HF_ENDPOINT": hub_endpoint,
        "HF_HUB_CACHE": str(hf_cache),
    }
    if parallel_files is not None:
        env["RBEE_PROVISIONER_PARALLEL_FILES"] = str(parallel_files)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for script, address in (
            ("rbee-catalog", catalog_address),
            ("rbee-provisioner", provisioner_address),
        ):
            log = workdir / f"{script}.log"
            with log.open("wb") as stderr:
                process = subprocess.Popen(
                    [str(bin_dir / script)], env=env, stdout=subprocess.DEVNULL, stderr=stderr
                )
            processes.append(process)
            wait_serving(address, process, name=script, timeout=START_TIMEOUT_S, log=log)
        yield RbeeServices(
            catalog_address, provisioner_address, processes[1], hf_cache, sample_interval
        )
    finally:
        for process in reversed(processes):
            stop_process(process)


def run_rbee_pull(services: RbeeServices, target: Target) -> Measurement:
    """(c) PullModel to the final Model, VmRSS sampled; then the model, pull and files removed."""
    source = f"hf:{target.repo}" if target.sharded else f"hf:{target.repo}:{FILENAME}"
    model: Model | None = None
    pull_name = ""
    phases: dict[str, float] = {}
    pid = services.provisioner.pid
    with ProvisionerClient(services.provisioner_address) as client:
        with RssSampler(pid, services.sample_interval) as rss:
            cpu_before = cpu_seconds(pid)
            start = time.perf_counter()
            for event in client.pull(source, timeout=_download_timeout(target.size)):
                if isinstance(event, PullUpdate):
                    pull_name = event.pull or pull_name
                    phases.setdefault(event.state, time.perf_counter() - start)
                else:
                    model = event
            seconds = time.perf_counter() - start
            cpu = cpu_seconds(pid) - cpu_before
        if model is None:
            raise RuntimeError("PullModel ended without a model")
        # Every file was checked against the Hub's sha256 by the pull; one file's is recorded.
        expected = None if target.sharded else target.files[0].sha256
        if model.sha256 != expected:
            raise RuntimeError(f"PullModel registered sha256 {model.sha256!r}, not {expected!r}")
        _check_files(Path(model.paths[0]), target, "rbee PullModel")
        flush = _flush()
        # Undo the pull so the next round downloads every byte again.
        with CatalogClient(services.catalog_address) as catalog:
            catalog.delete_model(model.name)
        if pull_name:
            client.delete_pull(pull_name)
    shutil.rmtree(services.hf_cache / ("models--" + target.repo.replace("/", "--")))
    return Measurement(seconds, cpu, rss.growth, rss.before, rss.samples, phases, flush=flush)


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class ContenderStats:
    """One row: a contender's rounds."""

    key: str
    label: str
    runs: list[Measurement] = field(default_factory=list)
    unavailable: str = ""

    @property
    def measured(self) -> bool:
        """Whether at least one round was measured."""
        return bool(self.runs) and not self.unavailable

    def median_seconds(self) -> float:
        """Median over rounds."""
        return statistics.median(run.seconds for run in self.runs)

    def median_of(self, value: Callable[[Measurement], float]) -> float:
        """Median over rounds of one number of each measurement."""
        return statistics.median(value(run) for run in self.runs)

    def megabytes_per_second(self, size: int) -> float:
        """Throughput at the median time (1 MB = 1e6 bytes)."""
        return size / 1e6 / self.median_seconds()


@dataclass
class BenchConfig:
    """What to run."""

    size: int = DEFAULT_SIZE
    rounds: int = 3
    workdir: Path | None = None
    keep: bool = False
    sample_interval: float = 0.02
    files: int = 1  # > 1: a sharded repo of this many weight files (plus config and index)
    parallel_files: int | None = None  # the provisioner's setting; None: its default
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass
class BenchResult:
    """The rows (a), (b), (c) and the facts printed above the table."""

    rows: dict[str, ContenderStats]
    facts: list[tuple[str, str]]
    size: int
    workdir: Path
    sharded: bool = False


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Write and serve the file, start the services, run every contender each round."""
    with bench_workdir("rbee-bench-download-", config.workdir, keep=config.keep) as workdir:
        return _run(config, workdir)


def _hf_hub_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("huggingface_hub")
    except Exception:  # not installed: the row reads n/a
        return None


def _curl_version() -> str | None:
    if shutil.which("curl") is None:
        return None
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split("\n", 1)[0].split(" (", 1)[0] or "curl"


def _run(config: BenchConfig, workdir: Path) -> BenchResult:
    say = config.progress
    (workdir / "source").mkdir()
    if config.files > 1:
        repo = SHARDED_REPO_ID
        sources = write_sharded_repo(workdir / "source", config.size, config.files)
    else:
        repo = REPO_ID
        sources = {FILENAME: write_source_file(workdir / "source" / FILENAME, config.size)}
    load_start = os.getloadavg()[0]
    say(f"hashing the {config.size / 2**20:.0f} MiB source")
    digests = {name: sha256_file(path) for name, path in sources.items()}
    sha256_rate = sha256_megabytes_per_second()
    labels = SHARDED_LABELS if config.files > 1 else LABELS
    rows = {key: ContenderStats(key, label) for key, label in labels.items()}
    curl_version, hf_version = _curl_version(), _hf_hub_version()
    if curl_version is None:
        rows[CURL].unavailable = "n/a (curl not found)"
    if hf_version is None:
        rows[HF].unavailable = "n/a (huggingface_hub not installed)"
    with FakeHub() as hub:
        hub.add_repo(repo, sources, sha256=digests)
        target = Target(
            endpoint=hub.endpoint,
            repo=repo,
            files=tuple(
                SourceFile(
                    name,
                    path.stat().st_size,
                    digests[name],
                    f"{hub.endpoint}/{repo}/resolve/main/{name}",
                )
                for name, path in sources.items()
            ),
        )
        say("starting rbee-catalog and rbee-provisioner")
        with rbee_services(
            workdir, hub.endpoint, config.sample_interval, config.parallel_files
        ) as services:
            rss_start = resident_bytes(services.provisioner.pid)
            runners: dict[str, Callable[[], Measurement]] = {
                CURL: lambda: run_curl(target, workdir),
                HF: lambda: run_hf_hub_download(target, workdir),
                RBEE: lambda: run_rbee_pull(services, target),
            }
            live = [key for key in runners if not rows[key].unavailable]
            for round_index in range(config.rounds):
                shift = round_index % len(live)
                for key in live[shift:] + live[:shift]:
                    os.sync()  # nothing queued for writeback from the previous download
                    server_cpu = _own_cpu()
                    measurement = runners[key]()
                    measurement.server_cpu = _own_cpu() - server_cpu
                    rows[key].runs.append(measurement)
                    say(
                        f"round {round_index + 1}/{config.rounds}: {labels[key]}: "
                        f"{measurement.seconds:.2f} s"
                    )
            rss_end = resident_bytes(services.provisioner.pid)
    first = target.files[0]
    if target.sharded:
        what = (
            f"{repo}: {config.files} safetensors shards of about "
            f"{config.size / config.files / 2**20:,.0f} MiB, config.json and the weight "
            f"index ({len(target.files)} files, {target.size:,} bytes); rbee pulls "
            f"hf:{repo} with RBEE_PROVISIONER_PARALLEL_FILES="
            f"{config.parallel_files or 'default (4)'}, curl fetches every file with "
            f"--parallel, (b) is snapshot_download (8 threads)"
        )
    else:
        what = (
            f"{first.name}, {first.size:,} bytes ({first.size / 2**30:.2f} GiB), "
            f"sha256 {first.sha256[:16]}..."
        )
    facts = [
        ("file", f"{what}; served from loopback by the fake Hub in this process (302 -> fake "
                 "CDN, os.sendfile from the page cache)"),
        ("rounds", f"{config.rounds}, contender order rotated each round; medians reported"),
        ("versions", f"{curl_version or 'curl n/a'}; huggingface_hub {hf_version or 'n/a'}; "
                     f"Python {platform.python_version()}"),
        ("disk", f"every download written under {workdir} ({_filesystem(workdir)})"),
        ("sha256", f"hashlib sha256 on one core, in memory: {sha256_rate:,.0f} MB/s (the "
                   f"ceiling of a download that verifies as it goes: "
                   f"{target.size / 1e6 / sha256_rate:.2f} s for these bytes in one stream); SHA "
                   "extensions "
                   f"{'present' if _cpu_has_sha() else 'absent'} (/proc/cpuinfo sha_ni)"),
        ("load", f"1-minute load average {load_start:.2f} before, {os.getloadavg()[0]:.2f} "
                 f"after, on {os.cpu_count()} CPUs (other work on a shared machine skews "
                 "every row)"),
        ("rss", f"provisioner VmRSS {rss_start / 1e6:.0f} MB after start, "
                f"{rss_end / 1e6:.0f} MB after the last round"),
    ]  # fmt: skip
    return BenchResult(rows, facts, target.size, workdir, sharded=target.sharded)


def _cpu_has_sha() -> bool:
    try:
        return " sha_ni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _filesystem(path: Path) -> str:
    """The filesystem type and device of `path`, from /proc/mounts (best effort)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "filesystem unknown"
    best = ("", "unknown", "?")
    resolved = str(path.resolve())
    for line in mounts:
        device, mount, kind = line.split()[:3]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
            mount
        ) >= len(best[0]):
            best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


# --- the report ------------------------------------------------------------------------------


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def render_table(result: BenchResult, command: str) -> str:
    """The plain-text report: command, date, machine, facts, the table, the targets."""
    size = result.size
    header = ("contender", "median", "MB/s", "rounds (s)", "(c) MB/s / this",
              "+ flush", "client CPU", "server CPU", "peak RSS growth")  # fmt: skip
    rbee = result.rows[RBEE]
    table: list[tuple[str, ...]] = [header]
    for row in result.rows.values():
        if not row.measured:
            table.append((row.label, row.unavailable or "n/a", *("-" for _ in header[2:])))
            continue
        ratio = "-"
        if row.key != RBEE and rbee.measured:
            ratio = f"{row.median_seconds() / rbee.median_seconds():.2f}x"
        growths = [run.rss_growth for run in row.runs if run.rss_growth is not None]
        table.append(
            (
                row.label,
                f"{row.median_seconds():.2f} s",
                f"{row.megabytes_per_second(size):,.0f}",
                " / ".join(f"{run.seconds:.2f}" for run in row.runs),
                ratio,
                f"{row.median_of(lambda run: run.flush):.2f} s",
                f"{row.median_of(lambda run: run.client_cpu):.2f} s",
                f"{row.median_of(lambda run: run.server_cpu):.2f} s",
                f"{max(growths) / 1e6:.1f} MB" if growths else "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [
        f"command:  {command}",
        f"date:     {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        f"size:     {size:,} bytes ({size / 2**30:.2f} GiB)",
        *(f"{name + ':':<9} {value}" for name, value in result.facts),
        "notes:    (a) timed around the curl process; (b) around the hf_hub_download call in its",
        "          own interpreter (start-up and import excluded); (c) from the PullModel call to",
        "          the final Model (resolve, download, sha256, fsync, catalog registration).",
        "          Only (c) verifies a sha256 and fsyncs. Medians over rounds. '+ flush': the",
        "          os.sync() right after (untimed: what was left dirty). 'client CPU': the",
        "          downloader's CPU seconds ((b) includes its interpreter start and import; (c) is",
        "          the provisioner process); 'server CPU': this process (fake Hub + CDN, and for",
        "          (c) also the gRPC client and the RSS sampler). Everything shares the cores.",
        "",
        line(header).rstrip(),
        line(["-" * width for width in widths]).rstrip(),
        *(line(cells).rstrip() for cells in table[1:]),
        "",
        *render_phases(rbee),
        *render_targets(result),
    ]
    return "\n".join(lines)


def render_phases(rbee: ContenderStats) -> list[str]:
    """Where (c)'s time goes: when each pull state was first streamed (medians over rounds)."""
    if not rbee.measured:
        return []
    states = [state for state in PHASE_ORDER if any(state in run.phases for run in rbee.runs)]
    if not states:
        return []
    starts = [
        statistics.median(run.phases.get(state, 0.0) for run in rbee.runs) for state in states
    ]
    ends = [*starts[1:], rbee.median_seconds()]
    spans = ", ".join(
        f"{state} {end - begin:.2f} s"
        for state, begin, end in zip(states, starts, ends, strict=True)
    )
    return [f"(c) by pull state (first event of each, medians): {spans}", ""]


def render_targets(result: BenchResult) -> list[str]:
    """The issue's three targets with PASS/MISS (or why one is not measured)."""
    curl, hf, rbee = result.rows[CURL], result.rows[HF], result.rows[RBEE]
    if not rbee.measured:
        return [f"targets: not measured ({rbee.unavailable or 'no rbee round'})"]
    if result.sharded:  # the targets are for one file: here the ratios are facts
        return [
            f"(info) (c) vs {name}: {other.median_seconds() / rbee.median_seconds():.2f}x "
            "throughput"
            for other, name in ((curl, "curl --parallel"), (hf, "snapshot_download"))
            if other.measured
        ]
    lines = []
    for other, goal, name in (
        (curl, TARGET_VS_CURL, "curl"),
        (hf, TARGET_VS_HF, "hf_hub_download"),
    ):
        if not other.measured:
            lines.append(f"target (c) >= {goal:.1f}x {name} throughput: {other.unavailable}")
            continue
        ratio = other.median_seconds() / rbee.median_seconds()
        lines.append(
            f"target (c) >= {goal:.1f}x {name} throughput: {ratio:.2f}x  {_verdict(ratio >= goal)}"
        )
    growths = [run.rss_growth or 0 for run in rbee.runs]
    samples = min(run.rss_samples for run in rbee.runs)
    lines.append(
        f"target provisioner RSS growth < {TARGET_RSS_GROWTH_BYTES / 1e6:.0f} MB during the pull: "
        f"{max(growths) / 1e6:.1f} MB peak over the RSS before the pull (worst round; "
        f"{' / '.join(f'{g / 1e6:.1f}' for g in growths)} MB; >= {samples} samples per pull)  "
        f"{_verdict(max(growths) < TARGET_RSS_GROWTH_BYTES)}"
    )
    return lines


# --- the command line ------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from "2147483648", "2GiB", "512MiB", "1.5GB" (B optional)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown unit in {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults are the issue's numbers)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size", type=parse_size, default=DEFAULT_SIZE, help="file size (default 2GiB)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every contender)")
    parser.add_argument(
        "--files",
        type=int,
        default=1,
        help="split --size over this many weight files of one repo, pulled whole (default 1)",
    )
    parser.add_argument(
        "--parallel-files",
        type=int,
        default=None,
        help="the provisioner's RBEE_PROVISIONER_PARALLEL_FILES (default: its own default)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where downloads are written")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 0 whatever the targets say."""
    args = parse_args(argv)
    progress = Progress()

    config = BenchConfig(
        size=args.size,
        rounds=max(1, args.rounds),
        workdir=args.workdir,
        keep=args.keep,
        files=max(1, args.files),
        parallel_files=args.parallel_files,
        progress=progress,
    )
    result = run_benchmark(config)
    command = command_line("bench.download", argv)
    print(render_table(result, command))
    progress.done(result.workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
