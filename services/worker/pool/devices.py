"""The hive's devices as the pool sees them: the CPU, every CUDA GPU, Apple's GPU.

`detect_devices()` measures them now (it blocks for up to `timeout` on nvidia-smi: call it from
a thread in async code). Sources, in order:

- the CPU, always: logical cores this process may run on (sched_getaffinity, else cpu_count),
  total RAM and MemAvailable from /proc/meminfo (sysconf off Linux, where free RAM is unknown),
  the architecture from platform.machine(), the model name from /proc/cpuinfo (sysctl on macOS);
- CUDA GPUs from `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` when the binary is
  on PATH. Otherwise, and only if the process has ALREADY imported torch, from torch.cuda: torch
  is never imported here, since that alone takes seconds. torch reports no free memory without
  creating a CUDA context in the pool process (hundreds of MB of VRAM per GPU), so it stays
  unknown there. A missing binary, a timeout or a failing nvidia-smi means "no CUDA devices":
  logged once at debug level, never raised;
- Apple's GPU (`devices/metal-0`, worker device `mps`) on macOS on arm64: unified memory, so
  its memory is the host's RAM.

GPU entries also carry the host's RAM (total and free): a partially offloaded model keeps its
other layers in host RAM, and the compatibility check reads both from one Device.

Indexes are nvidia-smi's, which orders GPUs by PCI bus id. CUDA's own default order is
"fastest first", so a worker started with CUDA_VISIBLE_DEVICES=N must also get
CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA_ORDER_ENVIRONMENT) for `cuda:N` to be the GPU listed here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.catalog.domain import Device, DeviceKind
from services.worker.gpu_memory import run_nvidia_smi

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
KIB = 1024

# The nvidia-smi query, in this order. compute_cap needs a 510+ driver; older ones reject the
# whole query, and detect_devices then asks again without it.
GPU_QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "uuid",
    "memory.total",
    "memory.free",
    "compute_cap",
    "driver_version",
)
_OPTIONAL_GPU_FIELDS = ("compute_cap",)

# Launch environment that makes CUDA number GPUs as nvidia-smi (and so this module) does.
CUDA_ORDER_ENVIRONMENT: dict[str, str] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

# nvidia-smi's "no value" comes bracketed ("[N/A]", "[Not Supported]", "[Unknown Error]",
# "[Insufficient Permissions]") or, in some versions, bare.
_NO_VALUE = {"", "n/a", "na", "none", "unknown", "not supported"}

_CPU_MODEL_KEYS = ("model name", "hardware", "model", "cpu model", "processor")

_logged_once: set[str] = set()


def _debug_once(key: str, message: str, *args: object) -> None:
    """Devices are listed on every ListDevices: say why a source is missing only once."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.debug(message, *args)


@dataclass(frozen=True)
class HostDevice:
    """One device of this hive, as measured. Memory in bytes; None when unknown."""

    name: str  # "devices/cpu", "devices/cuda-0", "devices/metal-0"
    kind: DeviceKind
    index: int = 0
    display_name: str = ""  # the CPU model name; the GPU product name
    uuid: str = ""
    total_ram_bytes: int | None = None
    free_ram_bytes: int | None = None  # MemAvailable
    total_vram_bytes: int | None = None
    free_vram_bytes: int | None = None
    unified_memory: bool = False
    compute_capability: str = ""
    driver_version: str = ""
    cpu_cores: int = 0
    cpu_architecture: str = ""

    @property
    def slug(self) -> str:
        """The device id: "cpu", "cuda-0", "metal-0"."""
        return self.name.removeprefix("devices/")

    @property
    def worker_device(self) -> str:
        """The `rbee-worker --device` value: "cpu", "cuda:0", "mps"."""
        if self.kind is DeviceKind.CUDA:
            return f"cuda:{self.index}"
        if self.kind is DeviceKind.METAL:
            return "mps"
        return "cpu"

    def for_compatibility(self, *, claimed_ram: int = 0, claimed_vram: int = 0) -> Device:
        """The catalog's Device for a compatibility check: free memory minus what this pool's
        workers already claimed (never below 0), so two spawns in a row do not both count the
        same free bytes. With unified memory (Apple) both claims come out of the one pool."""
        if self.unified_memory:
            ram_claim = vram_claim = claimed_ram + claimed_vram
        else:
            ram_claim, vram_claim = claimed_ram, claimed_vram
        return Device(
            kind=self.kind,
            name=self.slug,
            total_ram_bytes=self.total_ram_bytes,
            free_ram_bytes=_minus(self.free_ram_bytes, ram_claim),
            total_vram_bytes=self.total_vram_bytes,
            free_vram_bytes=_minus(self.free_vram_bytes, vram_claim),
            unified_memory=self.unified_memory,
        )


def _minus(free: int | None, claimed: int) -> int | None:
    return None if free is None else max(0, free - max(0, claimed))


# ---- parsing (pure) --------------------------------------------------------------------------


def _value(text: str) -> str | None:
    """A field's value, None for nvidia-smi's "no value" spellings."""
    value = text.strip()
    if (value.startswith("[") and value.endswith("]")) or value.lower() in _NO_VALUE:
        return None
    return value


def _mib_to_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        # nounits gives whole MiB; tolerate a unit suffix or a decimal anyway.
        return int(float(text.removesuffix("MiB").strip()) * MIB)
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str, fields: Sequence[str] = GPU_QUERY_FIELDS) -> list[HostDevice]:
    """Parse `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` output.

    One GPU per line, fields comma-separated in query order. Unparseable lines (an error
    message nvidia-smi printed for one GPU, a line without an index) are skipped; "[N/A]" and
    the like become unknown values. A product name with a comma in it is kept whole. The result
    is ordered by index. Host RAM fields are left unset (detect_devices fills them).
    """
    devices: list[HostDevice] = []
    name_at = fields.index("name") if "name" in fields else None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < len(fields):
            _debug_once(f"nvidia-smi line {line}", "skipping nvidia-smi line %r", line)
            continue
        if len(parts) > len(fields):
            if name_at is None:
                continue
            extra = len(parts) - len(fields)
            joined = ", ".join(parts[name_at : name_at + extra + 1])
            parts = [*parts[:name_at], joined, *parts[name_at + extra + 1 :]]
        values = {field: _value(part) for field, part in zip(fields, parts, strict=True)}
        index_text = values.get("index")
        if index_text is None or not index_text.isdigit():
            _debug_once(f"nvidia-smi line {line}", "skipping nvidia-smi line %r", line)
            continue
        index = int(index_text)
        devices.append(
            HostDevice(
                name=f"devices/cuda-{index}",
                kind=DeviceKind.CUDA,
                index=index,
                display_name=values.get("name") or "",
                uuid=values.get("uuid") or "",
                total_vram_bytes=_mib_to_bytes(values.get("memory.total")),
                free_vram_bytes=_mib_to_bytes(values.get("memory.free")),
                compute_capability=values.get("compute_cap") or "",
                driver_version=values.get("driver_version") or "",
            )
        )
    return sorted(devices, key=lambda device: device.index)


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo text; None when absent."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if not fields:
            continue
        try:
            number = int(fields[0])
        except ValueError:
            continue
        unit = fields[1].lower() if len(fields) > 1 else ""
        values[key.strip()] = number * KIB if unit == "kb" else number
    return values.get("MemTotal"), values.get("MemAvailable")


def parse_cpu_model(cpuinfo: str) -> str:
    """The CPU's model name from /proc/cpuinfo text ("" when it names none, as on many arm64
    servers, whose cpuinfo lists only implementer and part numbers)."""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        value = value.strip()
        # "processor : 0" is the x86 core number, not a name.
        if sep and value and key in _CPU_MODEL_KEYS and not value.isdigit():
            found.setdefault(key, value)
    return next((found[key] for key in _CPU_MODEL_KEYS if key in found), "")


def apple_gpu(
    cpu: HostDevice, *, system: str, machine: str, os_version: str = ""
) -> HostDevice | None:
    """Apple's GPU on Apple silicon (macOS, arm64): unified memory, the host's RAM; else None."""
    if system != "Darwin" or machine != "arm64":
        return None
    return HostDevice(
        name="devices/metal-0",
        kind=DeviceKind.METAL,
        index=0,
        display_name=cpu.display_name,  # "Apple M2 Pro": the chip is CPU and GPU
        total_ram_bytes=cpu.total_ram_bytes,
        free_ram_bytes=cpu.free_ram_bytes,
        unified_memory=True,
        driver_version=os_version,
        cpu_architecture=cpu.cpu_architecture,
    )


def torch_cuda_devices(torch: Any) -> list[HostDevice]:
    """CUDA GPUs through an already-imported torch module (pass `sys.modules["torch"]`).

    Free memory is left unknown: torch measures it only inside a CUDA context, which would cost
    the pool hundreds of MB on every GPU. Any failure means no devices.
    """
    try:
        cuda = torch.cuda
        if not cuda.is_available():
            return []
        devices = []
        for index in range(int(cuda.device_count())):
            props = cuda.get_device_properties(index)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid and not uuid.startswith("GPU-"):
                uuid = f"GPU-{uuid}"  # nvidia-smi's spelling
            devices.append(
                HostDevice(
                    name=f"devices/cuda-{index}",
                    kind=DeviceKind.CUDA,
                    index=index,
                    display_name=str(props.name),
                    uuid=uuid,
                    total_vram_bytes=int(props.total_memory),
                    compute_capability=f"{props.major}.{props.minor}",
                )
            )
        return devices
    except Exception as exc:  # a broken CUDA install must not break ListDevices
        _debug_once("torch.cuda", "torch.cuda lists no devices: %s", exc)
        return []


# ---- measuring (I/O) -------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0))  # the cores this process may use
        except OSError:
            pass
    return os.cpu_count() or 0


def _sysconf_ram() -> tuple[int | None, int | None]:
    def pages(name: str) -> int | None:
        try:
            value = os.sysconf(name)
        except (ValueError, OSError):
            return None
        return value if value > 0 else None

    size = pages("SC_PAGE_SIZE")
    total, available = pages("SC_PHYS_PAGES"), pages("SC_AVPHYS_PAGES")
    if size is None:
        return None, None
    return (
        total * size if total is not None else None,
        available * size if available is not None else None,
    )


def _macos_cpu_model(timeout: float) -> str:
    try:
        done = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def detect_cpu(*, timeout: float = 5.0) -> HostDevice:
    """The host CPU with its RAM, measured now."""
    meminfo = _read_text("/proc/meminfo")
    total, free = parse_meminfo(meminfo) if meminfo is not None else (None, None)
    if total is None:
        total, free = _sysconf_ram()
    cpuinfo = _read_text("/proc/cpuinfo")
    model = parse_cpu_model(cpuinfo) if cpuinfo is not None else ""
    if not model and platform.system() == "Darwin":
        model = _macos_cpu_model(timeout)
    return HostDevice(
        name="devices/cpu",
        kind=DeviceKind.CPU,
        index=0,
        display_name=model,
        total_ram_bytes=total,
        free_ram_bytes=free,
        cpu_cores=_cpu_cores(),
        cpu_architecture=platform.machine(),
    )


def _run_nvidia_smi(binary: str, fields: Sequence[str], timeout: float) -> tuple[int, str]:
    return run_nvidia_smi(
        binary, (f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"), timeout
    )


def nvidia_smi_devices(
    nvidia_smi: str = "nvidia-smi", *, timeout: float = 5.0
) -> list[HostDevice] | None:
    """CUDA GPUs from nvidia-smi; None when it cannot tell (missing, failing, too slow)."""
    binary = shutil.which(nvidia_smi)
    if binary is None:
        _debug_once(f"missing {nvidia_smi}", "%s not found: no CUDA devices from it", nvidia_smi)
        return None
    fields: Sequence[str] = GPU_QUERY_FIELDS
    try:
        code, output = _run_nvidia_smi(binary, fields, timeout)
        if code != 0 and "field" in output.lower():
            # An older driver rejects a field it does not know: ask again without the optional
            # ones rather than losing every GPU.
            fields = tuple(f for f in GPU_QUERY_FIELDS if f not in _OPTIONAL_GPU_FIELDS)
            code, output = _run_nvidia_smi(binary, fields, timeout)
    except subprocess.TimeoutExpired:
        _debug_once(f"timeout {binary}", "%s did not answer within %.1f s", binary, timeout)
        return None
    except OSError as exc:
        _debug_once(f"oserror {binary}", "%s cannot run: %s", binary, exc)
        return None
    if code != 0:
        # No driver loaded, no GPU, a container without the device nodes: all exit non-zero.
        _debug_once(f"exit {binary} {code}", "%s exited %d: %s", binary, code, output.strip()[:500])
        return None
    return parse_nvidia_smi_csv(output, fields)


def detect_devices(
    *, nvidia_smi: str | None = "nvidia-smi", timeout: float = 5.0
) -> list[HostDevice]:
    """The hive's devices, measured now: the CPU first, then CUDA GPUs by index, then Apple's
    GPU. `nvidia_smi` is the binary (a name on PATH or a path); None skips it. Never raises for
    a missing or failing GPU tool: those GPUs are simply not listed."""
    cpu = detect_cpu(timeout=timeout)
    devices = [cpu]
    gpus = nvidia_smi_devices(nvidia_smi, timeout=timeout) if nvidia_smi else None
    if gpus is None and "torch" in sys.modules:
        gpus = torch_cuda_devices(sys.modules["torch"])
    for gpu in gpus or []:
        devices.append(
            dataclasses.replace(
                gpu,
                total_ram_bytes=cpu.total_ram_bytes,
                free_ram_bytes=cpu.free_ram_bytes,
                cpu_architecture=cpu.cpu_architecture,
            )
        )
    metal = apple_gpu(
        cpu, system=platform.system(), machine=platform.machine(), os_version=platform.mac_ver()[0]
    )
    if metal is not None:
        devices.append(metal)
    return devices
