"""PKGBUILD handling without running bash: the field dump decoder, validation, source entries,
names, build environments, and which backends count as "system" installs.

Reading real PKGBUILDs (multi-line arrays, expansion, conditionals, quoting) runs bash, so those
tests live in tests/integration/test_recipes_install.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.catalog.domain import DeviceKind
from services.common.errors import FailedPrecondition, InvalidArgument
from services.provisioner.recipes.build import build_environment, validate_build_env
from services.provisioner.recipes.installs import (
    BackendProbe,
    parse_install_job_name,
    parse_worker_type,
    system_installs,
)
from services.provisioner.recipes.pkgbuild import (
    SourceKind,
    decode_fields,
    parse_source_entry,
    pkgbuild_from_fields,
    validate_recipe_name,
)

pytestmark = pytest.mark.unit

SUM = "ab" * 32


def _dump(*records: tuple[str, str, list[str]]) -> bytes:
    out = b""
    for name, kind, items in records:
        out += f"{name}\0{kind}\0{len(items)}\0".encode()
        out += b"".join(i.encode() + b"\0" for i in items)
    return out


FieldValue = str | list[str] | bool | None


def _fields(**overrides: FieldValue) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {
        "pkgname": "demo",
        "pkgver": "1.0",
        "pkgrel": "1",
        "arch": ["x86_64"],
        "source": [],
        "sha256sums": [],
        "fn:build": True,
        "fn:package": True,
        "fn:check": None,
    }
    fields.update(overrides)
    return fields


def test_decode_fields_keeps_spaces_newlines_and_empty_items() -> None:
    raw = _dump(
        ("pkgname", "scalar", ["demo"]),
        ("depends", "array", ["with space", "two\nlines", ""]),
        ("makedepends", "array", []),
        ("pkgdesc", "unset", []),
        ("fn:build", "function", []),
    )
    fields = decode_fields(raw)
    assert fields == {
        "pkgname": "demo",
        "depends": ["with space", "two\nlines", ""],
        "makedepends": [],
        "pkgdesc": None,
        "fn:build": True,
    }
    with pytest.raises(ValueError):
        decode_fields(b"depends\0array\0003\0only-one\0")


def test_a_valid_field_set_becomes_a_pkgbuild() -> None:
    pb = pkgbuild_from_fields(
        "/r/PKGBUILD",
        _fields(
            arch="any",
            source=["git+https://example.org/x.git#tag=v1", "x.patch"],
            sha256sums=["SKIP", SUM.upper()],
        ),
    )
    assert pb.arch == ["any"]  # a scalar arch is a one-element array to bash
    assert pb.functions == ["build", "package"]
    assert pb.version == "1.0-1"
    git, patch = pb.sources()
    assert (git.kind, git.name, git.ref_kind, git.ref) == (SourceKind.GIT, "x", "tag", "v1")
    assert (patch.kind, patch.sha256) == (SourceKind.LOCAL, SUM)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"pkgname": None}, "pkgname is missing"),
        ({"pkgver": ""}, "pkgver is missing"),
        ({"pkgrel": None}, "pkgrel is missing"),
        ({"arch": []}, "arch is missing"),
        ({"pkgname": "Bad Name"}, "not a valid package name"),
        ({"pkgver": "1-2"}, "pkgver"),
        ({"pkgrel": "one"}, "pkgrel"),
        ({"pkgname": ["a", "b"]}, "must be a plain variable"),
        ({"source": ["a.txt", "b.txt"], "sha256sums": [SUM]}, "source has 2 entries"),
        ({"source": ["a.txt"], "sha256sums": ["SKIP"]}, "SKIP is allowed for VCS sources only"),
        ({"source": ["a.txt"], "sha256sums": ["abc"]}, "neither 64 hex digits"),
        ({"fn:package": None}, "package() is not defined"),
        ({"rbee_worker_type": "../x"}, "rbee_worker_type"),
    ],
)
def test_invalid_field_sets_are_recipe_invalid(overrides: dict[str, object], why: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        pkgbuild_from_fields("/r/PKGBUILD", _fields(**overrides))  # type: ignore[arg-type]
    assert info.value.reason == "RECIPE_INVALID"
    assert why in info.value.message


@pytest.mark.parametrize(
    ("raw", "kind", "name", "location"),
    [
        ("notes.txt", SourceKind.LOCAL, "notes.txt", "notes.txt"),
        ("sub/dir/f.patch", SourceKind.LOCAL, "f.patch", "sub/dir/f.patch"),
        ("x.tgz::file:///srv/a.tgz", SourceKind.FILE, "x.tgz", "/srv/a.tgz"),
        ("https://h.example/p/a-1.0.tar.gz?x=1", SourceKind.HTTP, "a-1.0.tar.gz", None),
    ],
)
def test_file_sources(raw: str, kind: SourceKind, name: str, location: str | None) -> None:
    entry = parse_source_entry(raw, SUM)
    assert (entry.kind, entry.name) == (kind, name)
    assert entry.location == (location if location is not None else raw)
    assert not entry.is_vcs


def test_git_sources() -> None:
    entry = parse_source_entry("src::git+file:///tmp/repo.git#commit=abc1234", "SKIP")
    assert (entry.kind, entry.name, entry.location) == (
        SourceKind.GIT,
        "src",
        "file:///tmp/repo.git",
    )
    assert (entry.ref_kind, entry.ref) == ("commit", "abc1234")
    branch = parse_source_entry("git+https://example.org/llama.git#branch=main", "SKIP")
    assert (branch.name, branch.ref_kind) == ("llama", "branch")
    assert parse_source_entry("git+https://example.org/x", "SKIP").ref_kind == ""


@pytest.mark.parametrize(
    ("raw", "sha"),
    [
        ("git+file:///r#tag=v1", SUM),  # VCS sources take SKIP
        ("git+file:///r#rev=v1", "SKIP"),
        ("git+file:///r#commit=not-hex", "SKIP"),
        ("git+file:///r#tag=--upload-pack=x", "SKIP"),
        ("../outside.txt", SUM),
        ("/etc/passwd", SUM),
        ("file://relative/path", SUM),
        ("ftp://example.org/a.tgz", SUM),
        ("..::https://example.org/a", SUM),
    ],
)
def test_bad_sources_are_recipe_invalid(raw: str, sha: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_source_entry(raw, sha)
    assert info.value.reason == "RECIPE_INVALID"


def test_recipe_and_job_names() -> None:
    assert validate_recipe_name("recipes/cpu-llm") == "cpu-llm"
    assert validate_recipe_name("cuda-sd") == "cuda-sd"
    for bad in ("../x", "recipes/../x", "/abs", "a/b", "x\0", "UPPER", "", "a" * 64, "-x"):
        with pytest.raises(InvalidArgument) as info:
            validate_recipe_name(bad)
        assert info.value.reason == "INVALID_NAME"
    assert parse_worker_type("worker-types/cpu-llm") == "cpu-llm"
    with pytest.raises(InvalidArgument):
        parse_worker_type("worker-types/../x")
    assert parse_install_job_name("install-jobs/cpu-llm-1") == "cpu-llm-1"
    with pytest.raises(InvalidArgument):
        parse_install_job_name("cpu-llm-1")


def test_build_env_refuses_reserved_and_secret_names() -> None:
    validate_build_env({"CMAKE_ARGS": "-DGGML_CUDA=on", "TORCH_INDEX_URL": "https://x"})
    for bad in (
        {"HF_TOKEN": "x"},
        {"CIVITAI_API_TOKEN": "x"},
        {"RBEE_HOME": "/x"},
        {"GITHUB_TOKEN": "x"},
        {"AWS_SECRET_ACCESS_KEY": "x"},
        {"pkgdir": "/x"},
        {"PATH": "/x"},
        {"NOT A NAME": "x"},
    ):
        with pytest.raises(InvalidArgument):
            validate_build_env(bad)


def test_the_build_environment_is_made_from_nothing() -> None:
    base = Path("/w")
    env = build_environment(
        python="/opt/py/bin/python3",
        srcdir=base / "src",
        pkgdir=base / "pkg",
        startdir=base / "recipe",
        home=base / "home",
        tmpdir=base / "tmp",
        carch="x86_64",
        extra={"CMAKE_ARGS": "-DGGML_CUDA=on"},
    )
    assert env["PATH"] == "/opt/py/bin:/usr/local/bin:/usr/bin:/bin"
    assert env["srcdir"] == "/w/src" and env["pkgdir"] == "/w/pkg"
    assert env["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert not any("TOKEN" in k or k.startswith("RBEE_") for k in env)


LINUX = ("linux", "x86_64")
CPU_ONLY = frozenset({DeviceKind.CPU})
CPU_CUDA = frozenset({DeviceKind.CPU, DeviceKind.CUDA})


def _types(probe: BackendProbe, host: tuple[str, str], kinds: frozenset[DeviceKind]) -> list[str]:
    return [i.worker_type for i in system_installs(probe, host=host, device_kinds=kinds)]


def test_system_installs_follow_what_imports_and_the_devices_present() -> None:
    nothing = BackendProbe(python_version="3.11.7")
    llama_cpu = BackendProbe(python_version="3.11.7", llama_cpp_version="0.3.36")
    llama_gpu = BackendProbe(llama_cpp_version="0.3.36", llama_gpu_offload=True)
    sd_cpu = BackendProbe(torch_version="2.13.0+cpu", diffusers_version="0.42.1")
    sd_cuda = BackendProbe(torch_version="2.13.0", diffusers_version="0.42.1", torch_cuda=True)
    sd_mps = BackendProbe(torch_version="2.13.0", diffusers_version="0.42.1", torch_mps=True)
    torch_only = BackendProbe(torch_version="2.13.0")

    assert _types(nothing, LINUX, CPU_CUDA) == []
    assert _types(llama_cpu, LINUX, CPU_CUDA) == ["cpu-llm"]
    assert _types(llama_gpu, LINUX, CPU_CUDA) == ["cpu-llm", "cuda-llm"]
    assert _types(llama_gpu, LINUX, CPU_ONLY) == ["cpu-llm"]  # a CUDA build, but no GPU here
    assert _types(sd_cpu, LINUX, CPU_CUDA) == ["cpu-sd"]
    assert _types(sd_cuda, LINUX, CPU_CUDA) == ["cpu-sd", "cuda-sd"]
    assert _types(torch_only, LINUX, CPU_CUDA) == []  # diffusers must import too
    mac = ("macos", "aarch64")
    metal = frozenset({DeviceKind.CPU, DeviceKind.METAL})
    assert _types(llama_gpu, mac, metal) == ["cpu-llm", "metal-llm"]
    assert _types(sd_mps, mac, metal) == ["cpu-sd", "metal-sd"]
    assert _types(sd_mps, LINUX, CPU_ONLY) == ["cpu-sd"]

    (install,) = system_installs(llama_cpu, host=LINUX, device_kinds=CPU_ONLY)
    assert install.id == "system-cpu-llm" and install.name == "installs/system-cpu-llm"
    assert install.path == "" and install.version == "system"
    assert install.backend_version == "llama-cpp-python 0.3.36"
    assert (install.platform, install.cpu_architecture) == LINUX
    assert install.labels == {"system": "true"}
