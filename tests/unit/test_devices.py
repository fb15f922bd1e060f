"""services.worker.devices: `--device` parsing and process binding."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.catalog.domain import DeviceKind
from services.worker.__main__ import settings_from_args
from services.worker.devices import (
    CUDA_VISIBLE_DEVICES,
    DeviceSpec,
    DeviceSpecError,
    bind_device,
    parse_device,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind", "index", "slug"),
    [
        ("cpu", DeviceKind.CPU, 0, "cpu"),
        (" CPU ", DeviceKind.CPU, 0, "cpu"),
        ("cuda", DeviceKind.CUDA, 0, "cuda-0"),
        ("cuda:0", DeviceKind.CUDA, 0, "cuda-0"),
        ("cuda:3", DeviceKind.CUDA, 3, "cuda-3"),
        ("cuda-12", DeviceKind.CUDA, 12, "cuda-12"),
        ("mps", DeviceKind.METAL, 0, "metal-0"),
        ("metal", DeviceKind.METAL, 0, "metal-0"),
        ("metal:0", DeviceKind.METAL, 0, "metal-0"),
    ],
)
def test_accepted_spellings(text: str, kind: DeviceKind, index: int, slug: str) -> None:
    device = parse_device(text)
    assert (device.kind, device.index, device.slug) == (kind, index, slug)
    assert device.resource_name == f"devices/{slug}"
    assert parse_device(str(device)) == device  # str() is a spelling parse_device accepts


@pytest.mark.parametrize(
    "text", ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "rocm:0", "cpu:0", "tpu"]
)
def test_invalid_devices_say_what_is_accepted(text: str) -> None:
    with pytest.raises(DeviceSpecError) as caught:
        parse_device(text)
    assert "cpu, cuda:N" in str(caught.value)
    assert isinstance(caught.value, ValueError)  # settings validators report it


def test_metal_has_one_device() -> None:
    with pytest.raises(DeviceSpecError, match="one Metal device"):
        parse_device("mps:1")


def test_bind_cuda_exposes_only_that_gpu() -> None:
    env: dict[str, str] = {CUDA_VISIBLE_DEVICES: "0,1,2,3"}
    bind_device(DeviceSpec(kind=DeviceKind.CUDA, index=2), env)
    assert env[CUDA_VISIBLE_DEVICES] == "2"


def test_bind_cpu_hides_every_gpu_and_metal_changes_nothing() -> None:
    env: dict[str, str] = {}
    bind_device(parse_device("cpu"), env)
    assert env == {CUDA_VISIBLE_DEVICES: ""}
    env = {"OTHER": "x"}
    bind_device(parse_device("mps"), env)
    assert env == {"OTHER": "x"}


def test_worker_settings_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_WORKER_ENGINE", "fake")
    monkeypatch.setenv("RBEE_WORKER_DEVICE", "cuda:1")
    monkeypatch.setenv("RBEE_WORKER_QUEUE_SIZE", "3")
    from_env = settings_from_args([])
    assert (from_env.engine, from_env.device_spec.slug, from_env.queue_size) == (
        "fake",
        "cuda-1",
        3,
    )
    assert from_env.listen == "127.0.0.1:50071"
    flags = settings_from_args(["--device", "cpu", "--queue-size", "0", "--gpu-layers", "4"])
    assert flags.device_spec.kind is DeviceKind.CPU and flags.queue_size == 0
    assert flags.load_options().gpu_layers == 4 and flags.engine == "fake"
    with pytest.raises(ValidationError, match="unknown device"):
        settings_from_args(["--device", "gpu0"])
