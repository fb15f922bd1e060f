"""Recipes end to end on this machine: PKGBUILDs read by bash, builds from a local git fixture.

No network: the sources are a generated git repository (`git+file://...#tag=v1`) and a local
file with its real sha256. Each test builds in its own RBEE_HOME under tmp_path.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tarfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.catalog.domain import Install
from services.catalog.worker_types import host_platform
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RbeeError,
)
from services.provisioner.recipes.build import STAGING_DIR
from services.provisioner.recipes.installs import (
    InstallEvent,
    InstallItem,
    InstallJobRecord,
    InstallJobState,
    InstallJobStore,
    InstallManager,
    InstallOptions,
    system_installs,
)
from services.provisioner.recipes.pkgbuild import (
    RecipeBook,
    default_recipe_directories,
    project_root,
    read_pkgbuild,
)
from tests.fixtures.fake_cdn import FakeCdn
from tests.fixtures.recipe_repos import (
    GitRepo,
    make_git_repo,
    write_hello_recipe,
    write_pkgbuild,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

THIS_ARCH = host_platform()[1]
OTHER_ARCH = "aarch64" if THIS_ARCH == "x86_64" else "x86_64"


# --- reading PKGBUILDs with bash ---------------------------------------------------------------


def test_multiline_arrays_expansion_conditionals_and_quoting(tmp_path: Path) -> None:
    path = write_pkgbuild(
        tmp_path / "r",
        """\
pkgname=demo
pkgver=0.3.36
pkgrel=2
_flavour="with spaces"
arch=(
    'x86_64'   # a comment inside the array
    "aarch64"
)
if [[ $CARCH == x86_64 ]]; then
    _extra=avx2
else
    _extra=neon
fi
depends=("python>=3.11"
         "$_flavour"
         "lib-$_extra")
source=("demo-$pkgver.tar.gz::file:///srv/demo-${pkgver}.tar.gz")
sha256sums=('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef')
echo "top-level output must not confuse the reader"
build() { :; }
package() { :; }
""",
    )
    pb = read_pkgbuild(path, carch="x86_64")
    assert pb.pkgname == "demo" and pb.version == "0.3.36-2"
    assert pb.arch == ["x86_64", "aarch64"]
    assert pb.depends == ["python>=3.11", "with spaces", "lib-avx2"]
    assert pb.source == ["demo-0.3.36.tar.gz::file:///srv/demo-0.3.36.tar.gz"]
    assert pb.functions == ["build", "package"]
    assert read_pkgbuild(path, carch="aarch64").depends[-1] == "lib-neon"


def test_a_pkgbuild_that_fails_to_source_is_recipe_invalid(tmp_path: Path) -> None:
    path = write_pkgbuild(tmp_path / "r", "pkgname=x\nfalse_command_that_breaks() {\n")
    with pytest.raises(FailedPrecondition) as info:
        read_pkgbuild(path)
    assert info.value.reason == "RECIPE_INVALID"
    assert "could not source" in info.value.message


def test_missing_fields_and_mismatched_arrays_are_recipe_invalid(tmp_path: Path) -> None:
    base = "pkgver=1\npkgrel=1\narch=(any)\npackage() { :; }\n"
    with pytest.raises(FailedPrecondition, match="pkgname is missing") as info:
        read_pkgbuild(write_pkgbuild(tmp_path / "a", base))
    assert info.value.reason == "RECIPE_INVALID"
    text = "pkgname=x\n" + base + "source=(a.txt b.txt)\nsha256sums=(" + "0" * 64 + ")\n"
    with pytest.raises(FailedPrecondition, match="source has 2 entries but sha256sums has 1"):
        read_pkgbuild(write_pkgbuild(tmp_path / "b", text))
    with pytest.raises(FailedPrecondition, match="SKIP is allowed for VCS sources only"):
        read_pkgbuild(
            write_pkgbuild(
                tmp_path / "c", "pkgname=x\n" + base + "source=(a.txt)\nsha256sums=(SKIP)\n"
            )
        )


def test_a_pkgbuild_that_hangs_times_out(tmp_path: Path) -> None:
    path = write_pkgbuild(tmp_path / "r", "sleep 30\npkgname=x\n")
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match="longer than 1 s"):
        read_pkgbuild(path, timeout=1.0)
    assert time.monotonic() - started < 5


@pytest.mark.security
def test_the_parent_environment_is_not_visible_while_sourcing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_parse_secret")
    path = write_pkgbuild(
        tmp_path / "r",
        'pkgname=x\npkgver=1\npkgrel=1\narch=(any)\npkgdesc="token=[${HF_TOKEN:-none}]"\n'
        "package() { :; }\n",
    )
    assert read_pkgbuild(path).pkgdesc == "token=[none]"


# --- the recipe book ---------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return make_git_repo(tmp_path / "hello-repo")


@pytest.mark.security
def test_recipes_are_found_only_by_slug_names_inside_their_directories(
    tmp_path: Path, repo: GitRepo
) -> None:
    recipes = tmp_path / "recipes"
    write_hello_recipe(recipes, repo)
    write_hello_recipe(recipes, repo, name="other-arch", arch=(OTHER_ARCH,))
    outside = write_pkgbuild(tmp_path / "outside", "pkgname=x\n")
    (recipes / "escape").symlink_to(outside.parent)
    book = RecipeBook([recipes])

    hello = book.get("recipes/hello")
    assert hello.worker_type == "cpu-llm" and hello.supported_on_host
    assert hello.sources[0].sha256 == "SKIP"
    other = book.get("other-arch")
    assert not other.supported_on_host and OTHER_ARCH in other.unsupported_reason

    for bad in ("../outside", "recipes/../outside", "/etc", "a/b", "x\0y", "Hello", "", "a" * 80):
        with pytest.raises(InvalidArgument) as info:
            book.get(bad)
        assert info.value.reason == "INVALID_NAME"
    with pytest.raises(FailedPrecondition, match="outside its recipe directory"):
        book.get("escape")
    with pytest.raises(NotFound) as not_found:
        book.get("missing")
    assert not_found.value.reason == "RECIPE_NOT_FOUND"
    listed = list(book.list())
    assert [r.id for r in listed if not isinstance(r, RbeeError)] == ["hello", "other-arch"]


def test_the_repository_recipes_parse_for_every_worker_type(tmp_path: Path) -> None:
    book = RecipeBook(default_recipe_directories(tmp_path / "home"))
    recipes = [r for r in book.list() if not isinstance(r, RbeeError)]
    assert sorted(r.id for r in recipes) == [
        "cpu-llm",
        "cpu-sd",
        "cuda-llm",
        "cuda-sd",
        "metal-llm",
        "metal-sd",
    ]
    platform, _ = host_platform()
    for recipe in recipes:
        assert recipe.worker_type == recipe.id
        assert {"build", "package"} <= set(recipe.pkgbuild.functions)
        assert recipe.pkgbuild.rbee_backend
        if recipe.id.startswith("metal-"):
            assert recipe.supported_on_host == (platform == "macos" and THIS_ARCH == "aarch64")
        if recipe.id.startswith("cpu-"):
            assert recipe.supported_on_host
    cuda = book.get("cuda-llm")
    assert cuda.directory == str(project_root() / "recipes" / "cuda-llm")


async def test_a_recipe_whose_build_tools_are_missing_is_refused_before_it_runs(
    tmp_path: Path,
) -> None:
    def no_cuda(name: str) -> str | None:
        return None if name == "cuda" else f"/usr/bin/{name}"

    book = RecipeBook(default_recipe_directories(tmp_path / "home"), find_tool=no_cuda)
    cuda = book.get("cuda-llm")
    assert not cuda.supported_on_host
    assert "cuda (nvcc is not on the build's PATH" in cuda.unsupported_reason
    assert book.get("cpu-llm").supported_on_host  # cmake and gcc are found
    manager = InstallManager(recipes=book, home=tmp_path / "home")
    await manager.start()
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await manager.install("cuda-llm", InstallOptions())
        assert refused.value.reason == "UNSUPPORTED_PLATFORM"
        assert "lacks what it needs to build: cuda" in refused.value.message
        assert not (tmp_path / "home" / "provisioner" / "builds").exists()
    finally:
        await manager.close()


# --- installs ----------------------------------------------------------------------------------


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[InstallManager]:
    mgr = InstallManager(recipes=RecipeBook([tmp_path / "recipes"]), home=tmp_path / "home")
    await mgr.start()
    try:
        yield mgr
    finally:
        await mgr.close()


async def _collect(stream: AsyncIterator[InstallItem]) -> tuple[list[InstallEvent], Install]:
    events: list[InstallEvent] = []
    async for item in stream:
        if isinstance(item, InstallEvent):
            events.append(item)
        else:
            return events, item
    raise AssertionError("the stream ended without an Install")


def _states(events: list[InstallEvent]) -> list[InstallJobState]:
    order: list[InstallJobState] = []
    for event in events:
        if not order or order[-1] is not event.state:
            order.append(event.state)
    return order


def _leftovers(home: Path) -> list[Path]:
    staging = home / "installs" / STAGING_DIR
    builds = home / "provisioner" / "builds"
    return [p for d in (staging, builds) if d.exists() for p in d.iterdir()]


async def test_a_full_install_of_the_fixture_recipe(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    write_hello_recipe(tmp_path / "recipes", repo)
    events, install = await _collect(
        await manager.install("worker-types/cpu-llm", InstallOptions(recipe="hello"))
    )
    assert _states(events) == [
        InstallJobState.QUEUED,
        InstallJobState.FETCHING,
        InstallJobState.PREPARING,
        InstallJobState.BUILDING,
        InstallJobState.CHECKING,
        InstallJobState.PACKAGING,
        InstallJobState.REGISTERING,
        InstallJobState.SUCCEEDED,
    ]
    lines = [(e.state, line.text) for e in events for line in e.log_lines]
    assert (InstallJobState.BUILDING, "building rbee-hello 1.0 from 1.0") in lines  # the tag
    assert (InstallJobState.CHECKING, "check ok") in lines
    assert any(text == "notes.txt: sha256 OK" or text.endswith("sha256 OK") for _, text in lines)

    home = tmp_path / "home"
    assert install.id == "cpu-llm-1-0-1" and install.worker_type == "cpu-llm"
    assert install.path == str(home / "installs" / "cpu-llm-1-0-1")
    root = Path(install.path)
    assert (root / "lib" / "hello" / "__init__.py").read_text() == 'VERSION = "1.0"\n'
    assert os.access(root / "bin" / "hello", os.X_OK)
    assert (root / "notes.txt").exists()
    assert install.version == "1.0-1"
    assert install.backend_version == "hello 1.0"
    assert re.fullmatch(r"3\.\d+\.\d+", install.python_version)
    assert install.labels["source.hello-repo.commit"] == repo.tag_commit
    assert _leftovers(home) == []
    assert manager.installed() == [install.model_copy(update={"path": install.path})]

    job_name = events[0].install_job
    record = manager.get(job_name)
    assert record.state is InstallJobState.SUCCEEDED and record.install == install.name
    page, token, total = manager.list(filter_text="worker_type=cpu-llm")
    assert [r.name for r in page] == [job_name] and token == "" and total == 1
    assert (home / "provisioner" / "install-jobs" / f"{record.id}.json").exists()
    watched = await _collect(await manager.watch(job_name))
    assert watched[1].id == install.id

    # Installed already: a second install ends at once with the same install, no build.
    again_events, again = await _collect(
        await manager.install("cpu-llm", InstallOptions(recipe="hello"))
    )
    assert again.id == install.id
    assert InstallJobState.BUILDING not in _states(again_events)


@pytest.mark.security
async def test_a_wrong_sha256_fails_before_anything_runs(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    marker = tmp_path / "prepare-ran"
    write_hello_recipe(
        tmp_path / "recipes", repo, notes_sha256="0" * 64, prepare=f'touch "{marker}"'
    )
    events: list[InstallEvent] = []
    with pytest.raises(FailedPrecondition) as info:
        async for item in await manager.install("cpu-llm", InstallOptions(recipe="hello")):
            assert isinstance(item, InstallEvent)
            events.append(item)
    assert info.value.reason == "SOURCE_CHECKSUM_MISMATCH"
    assert info.value.metadata["expected"] == "0" * 64
    assert _states(events)[-1] is InstallJobState.FAILED
    assert InstallJobState.PREPARING not in _states(events)
    assert not marker.exists()
    installs = tmp_path / "home" / "installs"
    assert [p.name for p in installs.iterdir() if p.name != STAGING_DIR] == []
    assert _leftovers(tmp_path / "home") == []


def _group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie (PID 1 here may not reap orphans)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


async def test_cancel_kills_the_build_process_group_and_leaves_nothing(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    write_hello_recipe(
        tmp_path / "recipes",
        repo,
        build='echo "pgid $$"\nsleep 30 &\nsleep 30\necho "not reached"',
    )
    stream = await manager.install("cpu-llm", InstallOptions(recipe="hello"))
    pgid = 0
    job_name = ""
    async for item in stream:
        assert isinstance(item, InstallEvent)
        job_name = item.install_job
        for line in item.log_lines:
            if line.text.startswith("pgid "):
                pgid = int(line.text.split()[1])
        if pgid:
            break
    assert pgid > 1 and _group_alive(pgid)
    watcher = await manager.watch(job_name)  # keeps the job watched while `stream` is closed
    await stream.aclose()  # type: ignore[attr-defined]
    started = time.monotonic()
    record = await manager.cancel(job_name)
    assert record.state is InstallJobState.CANCELLED
    # cancel() returns once the build task has ended: SIGTERM to the group, SIGKILL after the
    # grace, the leader reaped.
    assert time.monotonic() - started < 1.0, "cancel took more than a second"
    assert not _group_alive(pgid), "the build's process group outlived the cancel"
    with pytest.raises(Cancelled):
        await _collect(watcher)
    assert _leftovers(tmp_path / "home") == []
    assert not (tmp_path / "home" / "installs" / "cpu-llm-1-0-1").exists()


async def test_a_failing_build_is_build_failed_with_the_phase_exit_code_and_tail(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    write_hello_recipe(
        tmp_path / "recipes", repo, build='echo "compiling"\necho "boom" >&2\nexit 3'
    )
    with pytest.raises(FailedPrecondition) as info:
        await _collect(await manager.install("cpu-llm", InstallOptions(recipe="hello")))
    error = info.value
    assert error.reason == "BUILD_FAILED"
    assert error.metadata["phase"] == "building" and error.metadata["exit_code"] == "3"
    assert "build() failed (exit code 3)" in error.message
    assert error.message.rstrip().endswith("boom")
    page, _, _ = manager.list(filter_text="state=failed")
    assert len(page) == 1 and page[0].error is not None
    assert page[0].error.reason == "BUILD_FAILED"
    assert [line.text for line in page[0].log_tail][-2:] == ["compiling", "boom"]
    assert _leftovers(tmp_path / "home") == []


async def test_a_recipe_whose_arch_excludes_this_host_is_refused_before_anything_runs(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    marker = tmp_path / "fetched"
    write_hello_recipe(tmp_path / "recipes", repo, arch=(OTHER_ARCH,), prepare=f'touch "{marker}"')
    with pytest.raises(FailedPrecondition) as info:
        await manager.install("cpu-llm", InstallOptions(recipe="hello"))
    assert info.value.reason == "UNSUPPORTED_PLATFORM"
    assert manager.list()[2] == 0
    assert not (tmp_path / "home" / "provisioner" / "builds").exists() or not _leftovers(
        tmp_path / "home"
    )
    assert not marker.exists()


@pytest.mark.security
async def test_tokens_in_the_parent_environment_are_not_visible_to_the_build(
    tmp_path: Path, repo: GitRepo, manager: InstallManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "HF_TOKEN": "hf_secret_value_123",
        "CIVITAI_API_TOKEN": "civitai_secret_value_456",
        "RBEE_PROVISIONER_HF_TOKEN": "rbee_secret_value_789",
        "RBEE_HOME": str(tmp_path / "elsewhere"),
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    dump = tmp_path / "build-env.txt"
    write_hello_recipe(tmp_path / "recipes", repo, build=f'env > "{dump}"')
    await _collect(
        await manager.install(
            "cpu-llm", InstallOptions(recipe="hello", build_env={"CMAKE_ARGS": "-DGGML_CUDA=on"})
        )
    )
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    for key, value in secrets.items():
        assert key not in env
        assert value not in dump.read_text()
    assert env["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert {"srcdir", "pkgdir", "startdir", "PYTHON"} <= set(env)
    assert env["startdir"] == str(tmp_path / "recipes" / "hello")
    with pytest.raises(InvalidArgument):
        await manager.install(
            "cpu-llm", InstallOptions(recipe="hello", build_env={"MY_TOKEN": "x"})
        )


async def test_a_second_caller_attaches_to_the_running_job(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    write_hello_recipe(tmp_path / "recipes", repo, build="sleep 0.5")
    first = await manager.install("cpu-llm", InstallOptions(recipe="hello"))
    second = await manager.install("cpu-llm", InstallOptions(recipe="hello"))
    (events_a, install_a), (events_b, install_b) = await asyncio.gather(
        _collect(first), _collect(second)
    )
    assert events_a[0].install_job == events_b[0].install_job
    assert install_a == install_b
    assert manager.list()[2] == 1


@pytest.mark.security
async def test_traversal_in_recipe_names_is_refused_by_install(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    write_hello_recipe(tmp_path / "recipes", repo)
    for bad in ("../hello", "/etc/passwd", "hello/../../x", "hello\0"):
        with pytest.raises(InvalidArgument):
            await manager.install("cpu-llm", InstallOptions(recipe=bad))
    with pytest.raises(InvalidArgument):
        await manager.install("../cpu-llm", InstallOptions(recipe="hello"))
    with pytest.raises(InvalidArgument, match="builds worker type cpu-llm"):
        await manager.install("cpu-sd", InstallOptions(recipe="hello"))


async def test_validate_only_checks_sources_without_building(
    tmp_path: Path, repo: GitRepo, manager: InstallManager
) -> None:
    marker = tmp_path / "built"
    write_hello_recipe(tmp_path / "recipes", repo, build=f'touch "{marker}"')
    events, install = await _collect(
        await manager.install("cpu-llm", InstallOptions(recipe="hello", validate_only=True))
    )
    assert install.id == "cpu-llm-1-0-1"
    assert not await asyncio.to_thread(os.path.exists, install.path)
    assert not marker.exists() and manager.list()[2] == 0
    assert any("sha256 OK" in line.text for e in events for line in e.log_lines)


async def test_a_restart_fails_interrupted_jobs_and_removes_leftovers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # What a kill -9 mid-build leaves: a record saying BUILDING, a staging and a work directory.
    now = datetime.now(UTC)
    record = InstallJobRecord(
        id="cpu-llm-20250101-000000-abcdef",
        worker_type="cpu-llm",
        recipe="recipes/cpu-llm",
        state=InstallJobState.BUILDING,
        created_at=now,
        updated_at=now,
    )
    InstallJobStore(home / "provisioner" / "install-jobs").save(record)
    (home / "installs" / STAGING_DIR / "cpu-llm-1-0-1-0a0b0c0d" / "lib").mkdir(parents=True)
    (home / "provisioner" / "builds" / record.id / "src").mkdir(parents=True)
    manager = InstallManager(recipes=RecipeBook([tmp_path / "recipes"]), home=home)
    await manager.start()
    try:
        loaded = manager.get(record.name)
        assert loaded.state is InstallJobState.FAILED
        assert "interrupted" in loaded.state_message
        assert loaded.error is not None and loaded.error.code == "UNAVAILABLE"
        assert _leftovers(home) == []
        with pytest.raises(FailedPrecondition) as info:
            await manager.cancel(record.name)
        assert info.value.reason == "JOB_FINISHED"
    finally:
        await manager.close()


# --- the services' own environment -------------------------------------------------------------


@pytest.mark.slow
def test_system_installs_report_the_backends_that_import_here() -> None:
    installs = {i.worker_type: i for i in system_installs()}
    try:
        import llama_cpp  # noqa: F401

        has_llama = True
    except ImportError:
        has_llama = False
    assert ("cpu-llm" in installs) == has_llama
    if has_llama:
        assert installs["cpu-llm"].id == "system-cpu-llm"
        assert installs["cpu-llm"].backend_version.startswith("llama-cpp-python ")
        assert installs["cpu-llm"].path == ""
    assert not any(wt.startswith("metal-") for wt in installs) or host_platform()[0] == "macos"


async def test_an_https_style_tarball_source_is_downloaded_checked_and_extracted(
    tmp_path: Path, manager: InstallManager
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"from the tarball\n"
        info = tarfile.TarInfo("tool-1.0/tool.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    with FakeCdn() as cdn:
        url = cdn.url_for(cdn.add_blob(archive), "tool-1.0.tar.gz")
        write_pkgbuild(
            tmp_path / "recipes" / "tool",
            f"""\
pkgname=tool
pkgver=1.0
pkgrel=1
arch=(any)
rbee_worker_type=cpu-sd
source=("tool-$pkgver.tar.gz::{url}")
sha256sums=('{hashlib.sha256(archive).hexdigest()}')
package() {{ cp "$srcdir/tool-$pkgver/tool.txt" "$pkgdir/"; }}
""",
        )
        events, install = await _collect(
            await manager.install("cpu-sd", InstallOptions(recipe="tool"))
        )
    assert (Path(install.path) / "tool.txt").read_bytes() == b"from the tarball\n"
    assert any(e.fetch_done == len(archive) for e in events)
    lines = [line.text for e in events for line in e.log_lines]
    assert "==> tool-1.0.tar.gz: sha256 OK" in lines
    assert not any("X-Signature" in line for line in lines)  # the signed query is not logged
