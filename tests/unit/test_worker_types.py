"""The six worker types, host support, and where the LLM architecture list comes from."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

import pytest

from services.catalog import llm_architectures
from services.catalog.domain import Backend, DeviceKind, ModelFormat, ModelType
from services.catalog.llm_architectures import (
    NON_GENERATIVE_ARCHITECTURES,
    ArchitectureList,
    resolve_architectures,
)
from services.catalog.worker_types import (
    WorkerTypeRegistry,
    host_platform,
    host_supports,
    normalize_machine,
    normalize_platform,
)
from services.common.errors import NotFound

pytestmark = pytest.mark.unit

FIXED_ARCHS = ArchitectureList(
    names=frozenset({"llama", "qwen2", "bert"}),
    source="llama-cpp-python 0.3.36 (installed)",
    list_version="0.3.36",
    installed_version="0.3.36",
)


@pytest.fixture
def registry() -> WorkerTypeRegistry:
    return WorkerTypeRegistry(FIXED_ARCHS)


def test_six_worker_types_in_stable_order(registry: WorkerTypeRegistry) -> None:
    ids = [wt.id for wt in registry.list()]
    assert ids == ["cpu-llm", "cuda-llm", "metal-llm", "cpu-sd", "cuda-sd", "metal-sd"]
    assert registry.get("cpu-llm").name == "worker-types/cpu-llm"


def test_llm_worker_types_run_gguf_with_llama_cpp(registry: WorkerTypeRegistry) -> None:
    for wt_id in ("cpu-llm", "cuda-llm", "metal-llm"):
        wt = registry.get(wt_id)
        assert wt.backend is Backend.LLAMA_CPP
        assert wt.formats == [ModelFormat.GGUF]
        assert wt.model_types == [ModelType.LLM]
        assert set(wt.addon_model_types) == {ModelType.ADAPTER, ModelType.PROJECTOR}
        assert wt.llm_architectures == ["bert", "llama", "qwen2"]
        assert wt.llm_architectures_source == "llama-cpp-python 0.3.36 (installed)"
        assert "Q4_K_M" in wt.quantizations and "IQ4_XS" in wt.quantizations
        assert wt.families == []
        assert wt.streaming and not wt.batching
        assert "one request at a time" in wt.description
        assert wt.max_context_length is None


def test_sd_worker_types_run_safetensors_and_diffusers(registry: WorkerTypeRegistry) -> None:
    for wt_id in ("cpu-sd", "cuda-sd", "metal-sd"):
        wt = registry.get(wt_id)
        assert wt.backend is Backend.DIFFUSERS
        assert wt.formats == [ModelFormat.SAFETENSORS, ModelFormat.DIFFUSERS]
        assert wt.model_types == [ModelType.IMAGE]
        assert wt.addon_model_types == [ModelType.LORA]
        assert {"sd1", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell"} <= set(wt.families)
        assert "sdxl-refiner" not in wt.families  # image-to-image stage; we do text-to-image
        assert wt.llm_architectures == []
        assert wt.streaming and not wt.batching


def test_platforms_and_cpu_architectures(registry: WorkerTypeRegistry) -> None:
    for suffix in ("llm", "sd"):
        cpu, cuda, metal = (registry.get(f"{k}-{suffix}") for k in ("cpu", "cuda", "metal"))
        assert cpu.device_kind is DeviceKind.CPU
        assert cpu.platforms == ["linux", "macos", "windows"]
        assert cpu.cpu_architectures == ["x86_64", "aarch64"]
        assert cuda.platforms == ["linux", "windows"]
        assert cuda.cpu_architectures == ["x86_64", "aarch64"]
        assert metal.platforms == ["macos"]
        assert metal.cpu_architectures == ["aarch64"]


def test_get_unknown_worker_type_raises_not_found(registry: WorkerTypeRegistry) -> None:
    with pytest.raises(NotFound) as caught:
        registry.get("rocm-llm")
    assert caught.value.reason == "WORKER_TYPE_NOT_FOUND"
    assert caught.value.resource_type == "worker-type"
    assert caught.value.resource_name == "worker-types/rocm-llm"
    assert "rocm-llm" in caught.value.message


@pytest.mark.parametrize(
    ("wt_id", "system", "machine", "expected"),
    [
        ("metal-llm", "Linux", "x86_64", False),
        ("metal-llm", "Linux", "aarch64", False),
        ("metal-sd", "Darwin", "arm64", True),
        ("metal-sd", "Darwin", "x86_64", False),  # Intel Macs: no Metal worker
        ("cuda-llm", "Darwin", "arm64", False),
        ("cuda-llm", "Windows", "AMD64", True),
        ("cuda-sd", "Linux", "aarch64", True),
        ("cpu-llm", "Windows", "AMD64", True),
        ("cpu-sd", "Linux", "riscv64", False),
        ("cpu-sd", "FreeBSD", "amd64", False),
    ],
)
def test_host_supports(
    registry: WorkerTypeRegistry, wt_id: str, system: str, machine: str, expected: bool
) -> None:
    wt = registry.get(wt_id)
    assert registry.host_supports(wt, system, machine) is expected
    assert host_supports(wt, system, machine) is expected


def test_for_host_lists_installable_types(registry: WorkerTypeRegistry) -> None:
    assert [wt.id for wt in registry.for_host("linux", "x86_64")] == [
        "cpu-llm",
        "cuda-llm",
        "cpu-sd",
        "cuda-sd",
    ]
    assert [wt.id for wt in registry.for_host("Darwin", "arm64")] == [
        "cpu-llm",
        "metal-llm",
        "cpu-sd",
        "metal-sd",
    ]


def test_platform_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize_platform("Darwin") == "macos"
    assert normalize_platform("Linux") == "linux"
    assert normalize_platform("Windows") == "windows"
    assert normalize_machine("AMD64") == "x86_64"
    assert normalize_machine("arm64") == "aarch64"
    assert normalize_machine("aarch64") == "aarch64"
    import platform

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert host_platform() == ("macos", "aarch64")


def _fake_version(answer: str | None) -> Callable[[str], str]:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name != "llama-cpp-python":
            return real(name)
        if answer is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return answer

    return version


def test_architecture_source_installed_and_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", _fake_version("0.3.36"))
    archs = resolve_architectures()
    assert archs.source == "llama-cpp-python 0.3.36 (installed)"
    assert archs.installed_version == "0.3.36"
    assert {"llama", "qwen3", "gemma3", "gpt-oss", "clip"} <= archs.names
    # A registry built without an explicit list asks the same way.
    wt = WorkerTypeRegistry().get("cuda-llm")
    assert wt.llm_architectures_source == "llama-cpp-python 0.3.36 (installed)"
    assert "llama" in wt.llm_architectures


def test_architecture_source_installed_but_not_in_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", _fake_version("0.3.99"))
    archs = resolve_architectures()
    assert archs.source == "list for 0.3.36 (installed 0.3.99 not in the table)"
    assert archs.list_version == "0.3.36"
    assert archs.installed_version == "0.3.99"


def test_architecture_source_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", _fake_version(None))
    archs = resolve_architectures()
    assert archs.source == "llama-cpp-python not installed; list for 0.3.36"
    assert archs.installed_version is None
    assert archs.names == llm_architectures.KNOWN_ARCHITECTURES["0.3.36"]


def test_unknown_version_uses_newest_list_not_newer_than_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = {
        "0.3.36": frozenset({"llama"}),
        "0.3.40": frozenset({"llama", "newarch"}),
        "0.3.9": frozenset({"old"}),
    }
    monkeypatch.setattr(llm_architectures, "KNOWN_ARCHITECTURES", table)
    assert resolve_architectures("0.3.45").list_version == "0.3.40"
    # 0.3.38 > 0.3.36 > 0.3.9: numeric, not string, ordering.
    assert resolve_architectures("0.3.38").list_version == "0.3.36"
    assert resolve_architectures("0.3.10").list_version == "0.3.9"
    # Older than every list: the oldest one, and the source says it is a stand-in.
    older = resolve_architectures("0.2.0")
    assert older.list_version == "0.3.9"
    assert older.source == "list for 0.3.9 (installed 0.2.0 not in the table)"
    assert resolve_architectures(None).list_version in table  # whatever is installed here


def test_resolving_does_not_import_the_native_library() -> None:
    already = "llama_cpp" in sys.modules
    resolve_architectures()
    assert ("llama_cpp" in sys.modules) is already


def test_non_generative_architectures_are_known_to_llama_cpp() -> None:
    known = llm_architectures.KNOWN_ARCHITECTURES["0.3.36"]
    assert set(NON_GENERATIVE_ARCHITECTURES) <= known
    assert {"clip", "t5encoder", "wavtokenizer-dec", "eagle3", "bert"} <= set(
        NON_GENERATIVE_ARCHITECTURES
    )
    archs = resolve_architectures("0.3.36")
    assert "bert" not in archs.generative()
    assert "llama" in archs.generative()
