"""The CUDA paths end to end, on a machine with an NVIDIA GPU: `rbee up`, `rbee devices`
against nvidia-smi, a cuda-sd worker drawing on the GPU, the cuda-llm recipe built with
`rbee install` and its worker generating on the GPU, and "auto" choosing the GPU.

Skipped, with the reason, where nvidia-smi lists no GPU (CI has none). On a GPU host:

    ./scripts/test-gpu            # installs into python3 (a CUDA torch there), runs tests/gpu

The cuda-llm worker needs a cuda-llm backend: the services' own environment when its
llama_cpp offloads to the GPU, else `rbee install cuda-llm` builds it here, with the variables
in RBEE_GPU_TEST_BUILD_ENV (NAME=VALUE shell words, each passed as --build-env: a wheel folder
for an offline host, CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90, ...). Each `rbee` call and the
build have their own time limits; the build's is RBEE_GPU_TEST_BUILD_TIMEOUT (default 1,500 s).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.processes import run_rbee
from tests.e2e.test_mesh_cli import free_base_port
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.fixtures.sd_models import write_tiny_sd_pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.cuda, pytest.mark.timeout(3600)]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    total_mib: int


def nvidia_smi_gpus() -> list[Gpu]:
    """The GPUs nvidia-smi lists; none where it is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=index,name,uuid,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, uuid, total = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), name, uuid, int(total)))
    return gpus


GPUS = nvidia_smi_gpus()
if not GPUS:
    pytest.skip("no NVIDIA GPU here (nvidia-smi lists none)", allow_module_level=True)


def compute_pids() -> dict[int, int]:
    """pid -> MiB of GPU memory, for every process nvidia-smi sees on a GPU."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pids = {}
    for line in out.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        pids[int(pid)] = int(used)
    return pids


@dataclass
class Mesh:
    home: Path
    env: dict[str, str]
    logs: Path

    def rbee(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = run_rbee(self.env, *args, timeout=timeout)
        with self.logs.open("a") as log:
            log.write(f"$ rbee {shlex.join(args)}\n-> {done.returncode}\n")
            log.write(done.stdout + done.stderr + "\n")
        return done

    def ok(self, *args: str, timeout: float = 300) -> str:
        done = self.rbee(*args, timeout=timeout)
        assert done.returncode == 0, f"rbee {shlex.join(args)}: {done.stderr}\n{done.stdout}"
        return done.stdout

    def worker(self, worker_id: str) -> dict[str, object]:
        listed = json.loads(self.ok("workers", "ls", "--format", "json"))["workers"]
        (found,) = [w for w in listed if w["name"] == f"workers/{worker_id}"]
        return dict(found)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("gpu-mesh")
    home = root / "home"
    base = free_base_port()
    env = {
        "RBEE_HOME": str(home),
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{base}",
        "RBEE_PROVISIONER_ADDR": f"127.0.0.1:{base + 1}",
        "RBEE_POOL_ADDR": f"127.0.0.1:{base + 2}",
    }
    the_mesh = Mesh(home, env, root / "rbee-calls.log")
    the_mesh.ok("up", "--home", str(home), "--base-port", str(base), "--background")
    try:
        yield the_mesh
    finally:
        the_mesh.rbee("down", "--home", str(home))
        if keep := os.environ.get("RBEE_GPU_TEST_LOGS"):
            for log in root.rglob("*.log"):  # flat: the services' logs, the calls, the build
                shutil.copy(log, Path(keep) / log.name)


def test_devices_match_nvidia_smi(mesh: Mesh) -> None:
    devices = json.loads(mesh.ok("devices", "--format", "json"))["devices"]
    by_name = {d["name"]: d for d in devices}
    assert "devices/cpu" in by_name
    for gpu in GPUS:
        device = by_name[f"devices/cuda-{gpu.index}"]
        assert device["kind"] == "DEVICE_KIND_CUDA"
        assert device["displayName"] == gpu.name
        assert device["uuid"] == gpu.uuid
        assert int(device["totalVramBytes"]) == gpu.total_mib * MIB
        assert 0 < int(device["freeVramBytes"]) <= int(device["totalVramBytes"])
        assert device["computeCapability"]  # e.g. "9.0"
        assert device["driverVersion"]


def test_cuda_sd_worker_draws_on_the_gpu(mesh: Mesh, tmp_path: Path) -> None:
    # SD1-shaped (768-wide cross attention), so the catalog names its family and rates it.
    pipeline = write_tiny_sd_pipeline(tmp_path / "tiny-sd", cross_attention_dim=768)
    mesh.ok("models", "add", str(pipeline), "--id", "tiny-sd")
    devices = json.loads(mesh.ok("devices", "--format", "json"))["devices"]
    (gpu,) = [d for d in devices if d["name"] == "devices/cuda-0"]
    vram = f"{int(gpu['freeVramBytes']) // MIB}MiB"
    rated = mesh.ok("compat", "tiny-sd", "--device", "cuda", "--vram", vram, "--format", "json")
    (rating,) = [r for r in json.loads(rated)["results"] if r["worker_type"] == "cuda-sd"]
    assert rating["verdict"] == "fits_gpu", rating

    spawned = mesh.rbee(
        "workers", "spawn", "tiny-sd", "--type", "cuda-sd", "--device", "devices/cuda-0",
        "--id", "sd-gpu",
    )  # fmt: skip
    assert spawned.returncode == 0, spawned.stderr
    assert "validating: worker-types/cuda-sd on devices/cuda-0: fits_gpu" in spawned.stderr
    worker = mesh.worker("sd-gpu")
    pid = int(str(worker["pid"]))

    out = tmp_path / "bee.png"
    drawn = mesh.rbee(
        "imagine", "a bee on a flower", "--worker", "sd-gpu", "-o", str(out),
        "-W", "64", "-H", "64", "-s", "4", "--seed", "7", "--format", "json",
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pid in compute_pids(), "the cuda-sd worker holds no GPU memory"

    # The same seed on the same GPU worker gives the same picture.
    again = tmp_path / "again.png"
    mesh.ok(
        "imagine", "a bee on a flower", "--worker", "sd-gpu", "-o", str(again),
        "-W", "64", "-H", "64", "-s", "4", "--seed", "7",
    )  # fmt: skip
    assert again.read_bytes() == out.read_bytes()

    mesh.ok("workers", "stop", "sd-gpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pid in compute_pids():
        time.sleep(0.2)
    assert pid not in compute_pids(), "the stopped worker still holds GPU memory"


def llama_offloads_here() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # any failure to import means "no"
        return False


@pytest.fixture(scope="module")
def cuda_llm(mesh: Mesh) -> str:
    """How cuda-llm is installed: "system", or the install `rbee install cuda-llm` built."""
    if llama_offloads_here():
        return "system"
    build_env = shlex.split(os.environ.get("RBEE_GPU_TEST_BUILD_ENV", ""))
    timeout = float(os.environ.get("RBEE_GPU_TEST_BUILD_TIMEOUT", "1500"))
    args = ["install", "cuda-llm", "-v", "--build-timeout", str(int(timeout))]
    for pair in build_env:
        args += ["--build-env", pair]
    started = time.monotonic()
    built = mesh.rbee(*args, "--timeout", str(int(timeout) + 60), timeout=timeout + 120)
    (mesh.logs.parent / "cuda-llm-build.log").write_text(built.stdout + built.stderr)
    assert built.returncode == 0, built.stderr[-4000:]
    print(f"cuda-llm built in {time.monotonic() - started:.0f} s")
    return "built"


def test_cuda_llm_worker_generates_on_the_gpu(mesh: Mesh, cuda_llm: str, tmp_path: Path) -> None:
    types = json.loads(mesh.ok("workers", "types", "--format", "json"))["worker_types"]
    (cuda_llm_type,) = [t for t in types if t["id"] == "cuda-llm"]
    print("cuda-llm on this host:", json.dumps(cuda_llm_type)[-400:])
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    mesh.ok("models", "add", str(model), "--id", "tiny")

    spawned = mesh.rbee(
        "workers", "spawn", "tiny", "--type", "cuda-llm", "--device", "devices/cuda-0",
        "--gpu-layers", "-1", "--id", "llm-gpu",
    )  # fmt: skip
    assert spawned.returncode == 0, spawned.stderr
    assert "validating: worker-types/cuda-llm on devices/cuda-0: fits_gpu" in spawned.stderr
    pid = int(str(mesh.worker("llm-gpu")["pid"]))
    assert pid in compute_pids(), "the cuda-llm worker holds no GPU memory"
    # The pool counts the worker's claim on the GPU beside what nvidia-smi measures.
    devices = json.loads(mesh.ok("devices", "--format", "json"))["devices"]
    (gpu,) = [d for d in devices if d["name"] == "devices/cuda-0"]
    assert gpu["workers"] == ["workers/llm-gpu"]
    assert int(gpu["claimedVramBytes"]) > 0

    text = mesh.rbee(
        "generate", "llm-gpu", "Once upon a time", "--max-tokens", "16", "--seed", "1",
        "--temperature", "0", "--ignore-eos", "--format", "json",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    lines = [json.loads(line) for line in text.stdout.splitlines() if line.strip()]
    result = lines[-1]["result"]
    assert result["usage"]["completionTokens"] == 16
    assert result["finishReason"] == "FINISH_REASON_LENGTH"
    assert sum(len(line["delta"]["tokenIds"]) for line in lines if "delta" in line) == 16

    # The worker reports the GPU memory the driver says it holds (idle now: a stable number).
    vram = int(str(mesh.worker("llm-gpu")["memory"]["vramBytes"]))  # type: ignore[index]
    assert vram == compute_pids()[pid] * MIB

    # The worker's log says how many layers went to the GPU: all of them (-1).
    logs = mesh.ok("workers", "logs", "llm-gpu")
    offloaded = re.search(r"gpu_layers=(\d+)", logs)
    assert offloaded is not None and int(offloaded.group(1)) > 0, logs
    mesh.ok("workers", "stop", "llm-gpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pid in compute_pids():
        time.sleep(0.2)
    assert pid not in compute_pids(), "the stopped worker still holds GPU memory"
    devices = json.loads(mesh.ok("devices", "--format", "json"))["devices"]
    (gpu,) = [d for d in devices if d["name"] == "devices/cuda-0"]
    assert "workers" not in gpu and "claimedVramBytes" not in gpu  # zero: left out of JSON


def test_auto_spawn_picks_the_gpu(mesh: Mesh, cuda_llm: str, tmp_path: Path) -> None:
    model = write_tiny_llama_gguf(tmp_path / "auto.gguf")
    mesh.ok("models", "add", str(model), "--id", "auto-tiny")
    spawned = mesh.rbee("workers", "spawn", "auto-tiny", "--id", "auto")
    assert spawned.returncode == 0, spawned.stderr
    assert "validating: worker-types/cuda-llm on devices/cuda-0" in spawned.stderr
    worker = mesh.worker("auto")
    assert worker["device"]["name"] == "devices/cuda-0"  # type: ignore[index]
    mesh.ok("workers", "stop", "auto")
