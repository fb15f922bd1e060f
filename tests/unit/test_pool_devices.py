"""services.worker.pool.devices: nvidia-smi parsing, /proc parsing, the real CPU entry."""

from __future__ import annotations

import os
import platform
from types import SimpleNamespace

import pytest

from services.catalog.domain import DeviceKind
from services.worker.pool.devices import (
    GPU_QUERY_FIELDS,
    MIB,
    HostDevice,
    apple_gpu,
    detect_devices,
    parse_cpu_model,
    parse_meminfo,
    parse_nvidia_smi_csv,
    torch_cuda_devices,
)

pytestmark = pytest.mark.unit

# Captured from a real H100 (driver 580) with the query detect_devices sends.
H100 = (
    "0, NVIDIA H100 80GB HBM3, GPU-a2f6de7f-95e2-5a98-93a0-4bb7f40a1644, 81559, 81079, 9.0, "
    "580.159.04\n"
)

# Two GPUs, listed out of order, the second with fields the driver cannot report (as on a
# GPU that fell off the bus or a unified-memory board), CRLF line ends and a trailing blank line.
TWO_GPUS = (
    "1, NVIDIA GeForce RTX 3090, GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0, [N/A], [N/A], 8.6, "
    "535.183.01\r\n"
    "0, NVIDIA GeForce RTX 4090, GPU-11111111-2222-3333-4444-555555555555, 24564, 23911, 8.9, "
    "535.183.01\r\n"
    "\r\n"
)

# What nvidia-smi prints for a GPU it cannot query, among good lines.
WITH_ERROR_LINE = (
    "Unable to determine the device handle for GPU0000:41:00.0: Unknown Error\n"
    "0, Tesla T4, GPU-5d9a0a4e-9d73-0a5e-6a1c-1b0d4e7c2f11, 15360, 14930, 7.5, 470.256.02\n"
)


def test_parses_a_real_h100_line() -> None:
    [gpu] = parse_nvidia_smi_csv(H100)
    assert gpu == HostDevice(
        name="devices/cuda-0",
        kind=DeviceKind.CUDA,
        index=0,
        display_name="NVIDIA H100 80GB HBM3",
        uuid="GPU-a2f6de7f-95e2-5a98-93a0-4bb7f40a1644",
        total_vram_bytes=81559 * MIB,
        free_vram_bytes=81079 * MIB,
        compute_capability="9.0",
        driver_version="580.159.04",
    )
    assert gpu.worker_device == "cuda:0"
    assert gpu.slug == "cuda-0"


def test_two_gpus_ordered_by_index_with_unknown_memory() -> None:
    first, second = parse_nvidia_smi_csv(TWO_GPUS)
    assert (first.index, first.name, first.display_name) == (
        0,
        "devices/cuda-0",
        "NVIDIA GeForce RTX 4090",
    )
    assert (first.total_vram_bytes, first.free_vram_bytes) == (24564 * MIB, 23911 * MIB)
    assert (second.index, second.name, second.worker_device) == (1, "devices/cuda-1", "cuda:1")
    assert second.total_vram_bytes is None and second.free_vram_bytes is None
    assert second.compute_capability == "8.6"
    assert second.uuid == "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


@pytest.mark.parametrize("missing", ["[N/A]", "[Not Supported]", "[Unknown Error]", "N/A", ""])
def test_no_value_spellings_become_unknown(missing: str) -> None:
    [gpu] = parse_nvidia_smi_csv(f"0, Tesla T4, {missing}, 15360, {missing}, {missing}, 470.1\n")
    assert gpu.uuid == ""
    assert gpu.total_vram_bytes == 15360 * MIB
    assert gpu.free_vram_bytes is None
    assert gpu.compute_capability == ""
    assert gpu.driver_version == "470.1"


def test_error_lines_are_skipped() -> None:
    [gpu] = parse_nvidia_smi_csv(WITH_ERROR_LINE)
    assert gpu.display_name == "Tesla T4"
    assert gpu.compute_capability == "7.5"


def test_a_name_with_a_comma_is_kept_whole() -> None:
    [gpu] = parse_nvidia_smi_csv("0, Quadro RTX 8000, Rev 2, GPU-abc, 49152, 48000, 7.5, 550.1\n")
    assert gpu.display_name == "Quadro RTX 8000, Rev 2"
    assert gpu.uuid == "GPU-abc"
    assert gpu.total_vram_bytes == 49152 * MIB


def test_parses_the_query_without_compute_cap() -> None:
    """Old drivers reject compute_cap; detect_devices asks again without it."""
    fields = tuple(f for f in GPU_QUERY_FIELDS if f != "compute_cap")
    [gpu] = parse_nvidia_smi_csv("0, Tesla K80, GPU-k80, 11441, 11378, 418.226.00\n", fields)
    assert gpu.compute_capability == ""
    assert gpu.driver_version == "418.226.00"
    assert gpu.free_vram_bytes == 11378 * MIB


def test_empty_and_garbage_output_mean_no_gpus() -> None:
    assert parse_nvidia_smi_csv("") == []
    assert parse_nvidia_smi_csv("No devices were found\n") == []
    assert parse_nvidia_smi_csv("x, a, b, 1, 2, 3.0, 4\n") == []


def test_meminfo() -> None:
    text = (
        "MemTotal:       16303428 kB\n"
        "MemFree:          311084 kB\n"
        "MemAvailable:    9823208 kB\n"
        "HugePages_Total:       0\n"
    )
    assert parse_meminfo(text) == (16303428 * 1024, 9823208 * 1024)
    assert parse_meminfo("MemTotal: 1024 kB\n") == (1024 * 1024, None)


def test_cpu_model_names() -> None:
    x86 = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC 7763 64-Core Processor\n"
    )
    assert parse_cpu_model(x86) == "AMD EPYC 7763 64-Core Processor"
    pi = (
        "processor\t: 0\nBogoMIPS\t: 108.00\nHardware\t: BCM2835\n"
        "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    )
    assert parse_cpu_model(pi) == "BCM2835"
    arm_server = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert parse_cpu_model(arm_server) == ""


def test_the_real_cpu_comes_first() -> None:
    devices = detect_devices(nvidia_smi=None)
    cpu = devices[0]
    assert cpu.name == "devices/cpu" and cpu.kind is DeviceKind.CPU
    assert cpu.worker_device == "cpu"
    expected_cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    assert cpu.cpu_cores == expected_cores
    assert cpu.cpu_architecture == platform.machine()
    assert cpu.total_ram_bytes is not None and cpu.total_ram_bytes > 0
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        assert cpu.total_ram_bytes == total_kib * 1024
        assert cpu.free_ram_bytes is not None
        assert 0 < cpu.free_ram_bytes <= cpu.total_ram_bytes
    assert cpu.total_vram_bytes is None
    assert all(d.kind is not DeviceKind.CUDA for d in devices)  # nvidia-smi skipped


def test_a_missing_nvidia_smi_means_no_cuda_devices() -> None:
    devices = detect_devices(nvidia_smi="/nonexistent/bin/nvidia-smi")
    assert devices[0].kind is DeviceKind.CPU
    assert [d for d in devices if d.kind is DeviceKind.CUDA] == []


def test_claims_come_off_free_memory_never_below_zero() -> None:
    gpu = HostDevice(
        name="devices/cuda-1",
        kind=DeviceKind.CUDA,
        index=1,
        total_ram_bytes=64 * MIB,
        free_ram_bytes=32 * MIB,
        total_vram_bytes=24 * MIB,
        free_vram_bytes=20 * MIB,
    )
    device = gpu.for_compatibility(claimed_ram=2 * MIB, claimed_vram=50 * MIB)
    assert device.kind is DeviceKind.CUDA
    assert device.name == "cuda-1"
    assert (device.total_ram_bytes, device.free_ram_bytes) == (64 * MIB, 30 * MIB)
    assert (device.total_vram_bytes, device.free_vram_bytes) == (24 * MIB, 0)
    unknown = HostDevice(name="devices/cpu", kind=DeviceKind.CPU)
    assert unknown.for_compatibility(claimed_ram=5).free_ram_bytes is None


def test_unified_memory_claims_share_one_pool() -> None:
    cpu = HostDevice(
        name="devices/cpu",
        kind=DeviceKind.CPU,
        display_name="Apple M2 Pro",
        total_ram_bytes=32 * MIB,
        free_ram_bytes=20 * MIB,
        cpu_architecture="arm64",
    )
    metal = apple_gpu(cpu, system="Darwin", machine="arm64", os_version="14.5")
    assert metal is not None
    assert (metal.name, metal.kind, metal.worker_device) == (
        "devices/metal-0",
        DeviceKind.METAL,
        "mps",
    )
    assert metal.unified_memory and metal.display_name == "Apple M2 Pro"
    assert metal.driver_version == "14.5"
    device = metal.for_compatibility(claimed_ram=3 * MIB, claimed_vram=4 * MIB)
    assert device.unified_memory
    assert device.free_ram_bytes == 13 * MIB
    assert apple_gpu(cpu, system="Darwin", machine="x86_64") is None
    assert apple_gpu(cpu, system="Linux", machine="aarch64") is None


def test_torch_cuda_conversion() -> None:
    """torch is only read when it is already imported; this is the shape it reports
    (checked against torch 2.x on an H100: props.uuid has no "GPU-" prefix)."""
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        total_memory=85017493504,
        major=9,
        minor=0,
        uuid="a2f6de7f-95e2-5a98-93a0-4bb7f40a1644",
    )
    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda i: props
    )
    [gpu] = torch_cuda_devices(SimpleNamespace(cuda=cuda))
    assert gpu.name == "devices/cuda-0"
    assert gpu.uuid == "GPU-a2f6de7f-95e2-5a98-93a0-4bb7f40a1644"
    assert gpu.total_vram_bytes == 85017493504 and gpu.free_vram_bytes is None
    assert gpu.compute_capability == "9.0"
    no_gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    assert torch_cuda_devices(no_gpu) == []

    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    assert torch_cuda_devices(SimpleNamespace(cuda=SimpleNamespace(is_available=broken))) == []
