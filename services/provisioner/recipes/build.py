"""Building a recipe: fetch and check sources, run the PKGBUILD's functions, install atomically.

One build runs these phases in order:

- FETCHING: every source into `$srcdir`. Local files (paths inside the recipe directory),
  `file://` paths and http(s) URLs (through services.provisioner.http) are checked against their
  sha256sums entry BEFORE anything else happens: one mismatch is SOURCE_CHECKSUM_MISMATCH and no
  function runs. Git sources (`git+URL#tag=|branch=|commit=`) are cloned with git and checked
  out detached at the ref; their resolved commit is recorded in the install's labels. Archives
  (.tar.*, .tgz, .zip) are extracted beside themselves after the checks, as makepkg does.
- PREPARING, BUILDING, CHECKING, PACKAGING: `prepare`, `build`, `check`, `package` (the ones the
  PKGBUILD defines), each as `bash -c 'source PKGBUILD; set -e; cd "$srcdir"; <function>'` with
  `srcdir`, `pkgdir`, `startdir` and `CARCH` exported, in its own process group, stdout and
  stderr streamed line by line. A non-zero exit is BUILD_FAILED with the phase, the exit code
  (metadata) and the tail of the log (message).
- REGISTERING: `$pkgdir` is a staging directory inside RBEE_HOME/installs (same filesystem), so
  the install appears with one rename(2) as RBEE_HOME/installs/<install-id>, with a manifest
  (`rbee-install.json`). A failed or cancelled build removes its staging and work directories:
  nothing is ever half-installed.

The environment of every process is built from nothing (never inherited): a minimal PATH with
the services' own Python in front, HOME and TMPDIR inside the build's work directory, and the
caller's `build_env` (checked: no token-like or reserved names). HF_TOKEN, CIVITAI_API_TOKEN and
RBEE_* settings of the services are therefore never visible to a recipe.

Cancel (a `CancelToken`) sends SIGTERM to the whole process group, SIGKILL after a short grace
(0.5 s by default), so a build stops within a second, children included.

Versions: `package()` may write `$pkgdir/rbee-versions.txt` with `backend=...` and `python=...`
lines (the recipes in recipes/ do); they fill the Install's backend_version and python_version.
Recipes must not depend on the absolute path of `$pkgdir` (it is renamed); the worker of an
install runs as `<install>/venv/bin/python -m services.worker`, which survives the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
import tarfile
import threading
import zipfile
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from services.catalog.domain import ID_PATTERN, Install
from services.catalog.worker_types import host_platform
from services.common.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
)
from services.provisioner.http import open_url, raise_for_status, redact_url
from services.provisioner.recipes.pkgbuild import (
    BUILD_BASE_PATH,
    PKGBUILD_FILE,
    Recipe,
    SourceEntry,
    SourceKind,
    project_root,
)

BASE_PATH = BUILD_BASE_PATH
TERM_GRACE = 0.5  # seconds between SIGTERM and SIGKILL of a build's process group
MAX_LINE = 8192  # longer output lines are cut (a progress bar without newlines)
LOG_TAIL = 40  # lines kept for BUILD_FAILED messages and job records
ERROR_TAIL = 20  # lines of the tail put in a BUILD_FAILED message
FETCH_CHUNK = 1 << 20
MANIFEST_FILE = "rbee-install.json"
VERSIONS_FILE = "rbee-versions.txt"
STAGING_DIR = ".staging"  # inside the installs directory; never a valid install id
REDACTED = "**********"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the build environment must not take from a caller: ours to set, or secret-looking.
RESERVED_ENV = frozenset(
    {
        "srcdir",
        "pkgdir",
        "startdir",
        "CARCH",
        "PATH",
        "HOME",
        "TMPDIR",
        "PYTHON",
        "rbee_project_dir",
    }
)
_SECRET_HINTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "PRIVATE_KEY")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")


class InstallPhase(StrEnum):
    """The running phases of an install, in order."""

    FETCHING = "fetching"
    PREPARING = "preparing"
    BUILDING = "building"
    CHECKING = "checking"
    PACKAGING = "packaging"
    REGISTERING = "registering"


PHASE_FUNCTIONS: dict[InstallPhase, str] = {
    InstallPhase.PREPARING: "prepare",
    InstallPhase.BUILDING: "build",
    InstallPhase.CHECKING: "check",
    InstallPhase.PACKAGING: "package",
}


class LogStream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


class LogLine(BaseModel):
    """One line of build output (without its newline), secrets redacted."""

    model_config = ConfigDict(frozen=True)

    time: datetime
    stream: LogStream
    text: str


class CancelToken:
    """A cancel flag seen by coroutines (await `wait()`) and threads (`is_set()`).

    Set it from the event loop's thread.
    """

    def __init__(self) -> None:
        self._async = asyncio.Event()
        self._thread = threading.Event()
        self.reason = ""

    def set(self, reason: str = "cancelled") -> None:
        if not self._thread.is_set():
            self.reason = reason
        self._thread.set()
        self._async.set()

    def is_set(self) -> bool:
        return self._thread.is_set()

    async def wait(self) -> None:
        await self._async.wait()

    @property
    def threading_event(self) -> threading.Event:
        return self._thread


@dataclass
class BuildCallbacks:
    """Where a build reports: phase changes (awaited, so they are recorded in order), log lines
    and fetch progress (called on the event loop's thread, must not block)."""

    on_phase: Callable[[InstallPhase, str], Awaitable[None]]
    on_log: Callable[[LogLine], None] = lambda line: None
    on_fetch: Callable[[int, int | None], None] = lambda done, total: None


@dataclass
class BuildRequest:
    """One build of `recipe` into `installs_dir/install_id`."""

    recipe: Recipe
    install_id: str
    installs_dir: Path  # RBEE_HOME/installs
    work_dir: Path  # a fresh directory for srcdir, HOME and TMPDIR; removed at the end
    build_env: Mapping[str, str] = field(default_factory=dict)
    skip_check: bool = False
    replace_existing: bool = False  # force: swap out an install with the same id
    labels: Mapping[str, str] = field(default_factory=dict)


def validate_build_env(env: Mapping[str, str], field_name: str = "options.build_env") -> None:
    """Refuse names that are ours to set, that look like secrets, or that are not shell names."""
    for name, value in env.items():
        upper = name.upper()
        problem = ""
        if not _ENV_NAME.fullmatch(name):
            problem = "is not a shell variable name"
        elif name in RESERVED_ENV:
            problem = "is set by the build itself"
        elif upper.startswith("RBEE_") or upper in ("HF_TOKEN", "CIVITAI_API_TOKEN"):
            problem = "belongs to the services, not to builds"
        elif any(hint in upper for hint in _SECRET_HINTS):
            problem = "looks like a secret; builds never get tokens"
        elif "\0" in value:
            problem = "holds a NUL byte"
        if problem:
            raise InvalidArgument.for_field(f"{field_name}[{name[:64]!r}]", problem)


def build_environment(
    *,
    python: str,
    srcdir: Path,
    pkgdir: Path,
    startdir: Path,
    home: Path,
    tmpdir: Path,
    carch: str,
    extra: Mapping[str, str] = {},
) -> dict[str, str]:
    """The whole environment of a build process, made from nothing (nothing inherited)."""
    env = dict(extra)
    env.update(
        {
            "PATH": f"{Path(python).parent}:{BASE_PATH}",
            "HOME": str(home),
            "TMPDIR": str(tmpdir),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "CARCH": carch,
            "PYTHON": python,  # the services' Python: recipes make their venv from it
            "srcdir": str(srcdir),
            "pkgdir": str(pkgdir),
            "startdir": str(startdir),
            "rbee_project_dir": str(project_root()),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
        }
    )
    return env


def _now() -> datetime:
    return datetime.now(UTC)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    on_line: Callable[[LogStream, str], None],
    cancel: CancelToken,
    term_grace: float = TERM_GRACE,
) -> int:
    """Run `argv` in its own process group, streaming its output lines; return the exit code.

    Cancel (or the calling task being cancelled) stops the whole group: SIGTERM, then SIGKILL
    after `term_grace`. The group is SIGKILLed after a normal exit too, so a background child
    that a phase left behind does not outlive it. Raises Cancelled when cancelled.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=str(cwd),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own session and process group: pgid == pid
    )
    pgid = proc.pid
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        asyncio.create_task(_pump(proc.stdout, LogStream.STDOUT, on_line)),
        asyncio.create_task(_pump(proc.stderr, LogStream.STDERR, on_line)),
    ]
    exited = asyncio.create_task(proc.wait())
    cancelled = asyncio.create_task(cancel.wait())
    try:
        await asyncio.wait({exited, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            raise Cancelled(cancel.reason or "cancelled", reason="CANCELLED")
        return exited.result()
    finally:
        cancelled.cancel()
        if not exited.done():
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), term_grace)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), 5.0)
        # Output still buffered in the pipes is read; a pipe held open by something outside
        # the group cannot hold us for long.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 2.0)
        for reader in readers:
            reader.cancel()


async def _pump(
    stream: asyncio.StreamReader, kind: LogStream, on_line: Callable[[LogStream, str], None]
) -> None:
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            on_line(kind, raw.rstrip(b"\r")[:MAX_LINE].decode("utf-8", "replace"))
        if len(pending) > MAX_LINE:
            on_line(kind, pending[:MAX_LINE].decode("utf-8", "replace"))
            pending = b""
    if pending:
        on_line(kind, pending.rstrip(b"\r")[:MAX_LINE].decode("utf-8", "replace"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(FETCH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def _extract(archive: Path, into: Path) -> None:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (into / member).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise FailedPrecondition(
                        f"{archive.name}: member {member!r} leaves the source directory",
                        reason="RECIPE_INVALID",
                    )
            zf.extractall(into)
        return
    with tarfile.open(archive) as tf:
        # The "data" filter refuses absolute paths, .. members, devices and links that leave.
        tf.extractall(into, filter="data")


def read_versions(pkgdir: Path) -> dict[str, str]:
    """`key=value` lines of $pkgdir/rbee-versions.txt (absent: empty)."""
    path = pkgdir / VERSIONS_FILE
    values: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                values[key.strip()] = value.strip()
    return values


@dataclass
class _Fetched:
    entry: SourceEntry
    path: Path
    commit: str = ""


class RecipeBuilder:
    """Runs builds. One instance serves a provisioner; builds share nothing but settings."""

    def __init__(
        self,
        *,
        python: str = sys.executable,
        secrets_to_redact: Sequence[str] = (),
        term_grace: float = TERM_GRACE,
        http_timeout: float = 30.0,
    ) -> None:
        self._python = python
        self._secrets = [s for s in secrets_to_redact if s]
        self._term_grace = term_grace
        self._http_timeout = http_timeout

    def redact(self, text: str) -> str:
        """The line with every known secret replaced (builds never see them, but a recipe could
        print something it fetched)."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    # --- the whole build ----------------------------------------------------------------------

    async def build(
        self, request: BuildRequest, callbacks: BuildCallbacks, cancel: CancelToken
    ) -> Install:
        """Fetch, run the phases, install atomically; return the (unregistered) Install."""
        recipe = request.recipe
        if not ID_PATTERN.fullmatch(request.install_id):
            raise InvalidArgument.for_field("options.install_id", "must be a slug id")
        final = request.installs_dir / request.install_id
        if final.exists() and not request.replace_existing:
            raise AlreadyExists(
                f"installs/{request.install_id} already exists; install with force to rebuild",
                resource_type="install",
                resource_name=f"installs/{request.install_id}",
                reason="INSTALL_ALREADY_EXISTS",
            )
        staging_root = request.installs_dir / STAGING_DIR
        srcdir = request.work_dir / "src"
        home = request.work_dir / "home"
        tmpdir = request.work_dir / "tmp"
        pkgdir = staging_root / f"{request.install_id}-{secrets.token_hex(4)}"
        tail: deque[str] = deque(maxlen=LOG_TAIL)

        def on_line(kind: LogStream, text: str) -> None:
            text = self.redact(text)
            tail.append(text)
            callbacks.on_log(LogLine(time=_now(), stream=kind, text=text))

        installed = False
        try:
            for directory in (srcdir, home, tmpdir, staging_root):
                directory.mkdir(parents=True, exist_ok=True)
            pkgdir.mkdir()
            await callbacks.on_phase(
                InstallPhase.FETCHING, f"{len(recipe.pkgbuild.source)} source(s)"
            )
            fetched = await self.fetch(
                recipe, srcdir, home=home, on_line=on_line, callbacks=callbacks, cancel=cancel
            )
            env = build_environment(
                python=self._python,
                srcdir=srcdir,
                pkgdir=pkgdir,
                startdir=Path(recipe.directory),
                home=home,
                tmpdir=tmpdir,
                carch=host_platform()[1],
                extra=request.build_env,
            )
            for phase, function in PHASE_FUNCTIONS.items():
                if function not in recipe.pkgbuild.functions:
                    continue
                if phase is InstallPhase.CHECKING and request.skip_check:
                    continue
                if cancel.is_set():
                    raise Cancelled(cancel.reason or "cancelled", reason="CANCELLED")
                await callbacks.on_phase(phase, f"{function}()")
                code = await run_process(
                    [
                        "bash",
                        "--noprofile",
                        "--norc",
                        "-c",
                        'source "$startdir/PKGBUILD" || exit 97\nset -e\ncd -- "$srcdir"\n"$1"',
                        f"rbee-{function}",
                        function,
                    ],
                    env=env,
                    cwd=srcdir,
                    on_line=on_line,
                    cancel=cancel,
                    term_grace=self._term_grace,
                )
                if code != 0:
                    raise _build_failed(recipe, phase, function, code, list(tail))
            await callbacks.on_phase(InstallPhase.REGISTERING, f"installs/{request.install_id}")
            install = self._install_record(request, pkgdir, fetched)
            await asyncio.to_thread(self._move_into_place, install, pkgdir, final)
            installed = True
            return install.model_copy(update={"path": str(final)})
        finally:
            await asyncio.to_thread(_remove_tree, request.work_dir)
            if not installed:
                await asyncio.to_thread(_remove_tree, pkgdir)

    def _install_record(
        self, request: BuildRequest, pkgdir: Path, fetched: Sequence[_Fetched]
    ) -> Install:
        recipe = request.recipe
        versions = read_versions(pkgdir)
        platform, machine = host_platform()
        labels = {
            "recipe": recipe.id,
            "pkgname": recipe.pkgbuild.pkgname,
            **{f"source.{f.entry.name}.commit": f.commit for f in fetched if f.commit},
            **request.labels,
        }
        now = _now()
        return Install(
            id=request.install_id,
            worker_type=recipe.worker_type,
            version=recipe.pkgbuild.version,
            path=str(request.installs_dir / request.install_id),
            backend_version=versions.get("backend", ""),
            python_version=versions.get("python", ""),
            platform=platform,
            cpu_architecture=machine,
            labels=labels,
            created_at=now,
            updated_at=now,
        )

    @staticmethod
    def _move_into_place(install: Install, pkgdir: Path, final: Path) -> None:
        """Write the manifest, then one rename; a replaced install is swapped out first."""
        manifest = pkgdir / MANIFEST_FILE
        manifest.write_text(install.model_dump_json(indent=1), "utf-8")
        old: Path | None = None
        if final.exists():
            old = pkgdir.parent / f"{final.name}-old-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(pkgdir, final)
        _fsync_dir(final.parent)
        if old is not None:
            _remove_tree(old)

    # --- fetching -----------------------------------------------------------------------------

    async def fetch(
        self,
        recipe: Recipe,
        srcdir: Path,
        *,
        home: Path,
        on_line: Callable[[LogStream, str], None],
        callbacks: BuildCallbacks,
        cancel: CancelToken,
    ) -> list[_Fetched]:
        """Every source into `srcdir`; checksums first (nothing runs on a mismatch)."""
        entries = recipe.pkgbuild.sources()
        recipe_dir = await asyncio.to_thread(Path(recipe.directory).resolve)
        loop = asyncio.get_running_loop()

        def report_progress(done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(callbacks.on_fetch, done, total)

        fetched: list[_Fetched] = []
        # Files first, all verified, before any git or extraction runs.
        for entry in entries:
            if entry.is_vcs:
                continue
            if cancel.is_set():
                raise Cancelled(cancel.reason or "cancelled", reason="CANCELLED")
            dest = srcdir / entry.name
            if entry.kind is SourceKind.HTTP:
                on_line(LogStream.STDOUT, f"==> fetching {redact_url(entry.location)}")
                await asyncio.to_thread(
                    self._download, entry.location, dest, cancel.threading_event, report_progress
                )
            else:
                origin = (
                    (recipe_dir / entry.location)
                    if entry.kind is SourceKind.LOCAL
                    else Path(entry.location)
                )
                if entry.kind is SourceKind.LOCAL and not origin.resolve().is_relative_to(
                    recipe_dir
                ):
                    raise FailedPrecondition(
                        f"{recipe.name}: source {entry.raw!r} leaves the recipe directory",
                        reason="RECIPE_INVALID",
                    )
                if not origin.is_file():
                    raise FailedPrecondition(
                        f"{recipe.name}: source {entry.raw!r} is not a file",
                        reason="RECIPE_INVALID",
                    )
                on_line(LogStream.STDOUT, f"==> copying {entry.name}")
                await asyncio.to_thread(shutil.copyfile, origin, dest)
            actual = await asyncio.to_thread(_sha256_file, dest)
            if actual != entry.sha256:
                raise FailedPrecondition(
                    f"{recipe.name}: source {entry.name} has sha256 {actual}, but sha256sums "
                    f"says {entry.sha256}; nothing was built",
                    reason="SOURCE_CHECKSUM_MISMATCH",
                    metadata={"source": entry.name, "expected": entry.sha256, "actual": actual},
                )
            on_line(LogStream.STDOUT, f"==> {entry.name}: sha256 OK")
            fetched.append(_Fetched(entry=entry, path=dest))
        for entry in entries:
            if entry.is_vcs:
                fetched.append(
                    await self._clone(
                        recipe, entry, srcdir, home=home, on_line=on_line, cancel=cancel
                    )
                )
        for item in fetched:
            if not item.entry.is_vcs and _is_archive(item.entry.name):
                on_line(LogStream.STDOUT, f"==> extracting {item.entry.name}")
                try:
                    await asyncio.to_thread(_extract, item.path, srcdir)
                except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
                    raise FailedPrecondition(
                        f"{recipe.name}: cannot extract {item.entry.name}: {exc}",
                        reason="RECIPE_INVALID",
                    ) from None
        return fetched

    def _download(
        self,
        url: str,
        dest: Path,
        cancel: threading.Event,
        on_progress: Callable[[int, int | None], None],
    ) -> None:
        with open_url(url, timeout=self._http_timeout) as resp:
            raise_for_status(resp, what=redact_url(url), token=None)
            length = resp.header("Content-Length")
            total = int(length) if length.isdigit() else None
            resp.set_read_timeout(self._http_timeout)
            done = 0
            with dest.open("wb") as out:
                while True:
                    if cancel.is_set():
                        raise Cancelled("cancelled while fetching", reason="CANCELLED")
                    chunk = resp.read(FETCH_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    on_progress(done, total)

    async def _clone(
        self,
        recipe: Recipe,
        entry: SourceEntry,
        srcdir: Path,
        *,
        home: Path,
        on_line: Callable[[LogStream, str], None],
        cancel: CancelToken,
    ) -> _Fetched:
        dest = srcdir / entry.name
        env = {
            "PATH": BASE_PATH,
            "HOME": str(home),
            "LC_ALL": "C.UTF-8",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_SSH_COMMAND": "ssh -oBatchMode=yes",
        }
        on_line(LogStream.STDOUT, f"==> cloning {redact_url(entry.location)} ({entry.name})")
        revision = {
            "tag": f"refs/tags/{entry.ref}",
            "branch": f"refs/remotes/origin/{entry.ref}",
            "commit": entry.ref,
            "": "HEAD",
        }[entry.ref_kind]
        steps = [
            ["git", "clone", "--quiet", "--no-checkout", "--", entry.location, str(dest)],
            ["git", "-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet",
             "--detach", f"{revision}^{{commit}}"],
        ]  # fmt: skip
        for argv in steps:
            code = await run_process(
                argv, env=env, cwd=srcdir, on_line=on_line, cancel=cancel,
                term_grace=self._term_grace,
            )  # fmt: skip
            if code != 0:
                raise FailedPrecondition(
                    f"{recipe.name}: git could not fetch {entry.raw} at "
                    f"{entry.ref_kind or 'HEAD'} {entry.ref} (exit {code})",
                    reason="RECIPE_INVALID",
                    metadata={"source": entry.name, "exit_code": str(code)},
                )
        lines: list[str] = []
        await run_process(
            ["git", "-C", str(dest), "rev-parse", "HEAD"],
            env=env,
            cwd=srcdir,
            on_line=lambda kind, text: lines.append(text),
            cancel=cancel,
        )
        commit = lines[0].strip() if lines else ""
        if entry.ref_kind == "commit" and not commit.startswith(entry.ref):
            raise FailedPrecondition(
                f"{recipe.name}: {entry.name} is at {commit}, not the pinned commit {entry.ref}",
                reason="SOURCE_CHECKSUM_MISMATCH",
            )
        on_line(LogStream.STDOUT, f"==> {entry.name} at {commit}")
        return _Fetched(entry=entry, path=dest, commit=commit)


def _build_failed(
    recipe: Recipe, phase: InstallPhase, function: str, code: int, tail: Sequence[str]
) -> FailedPrecondition:
    shown = [line[:300] for line in tail[-ERROR_TAIL:]]
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    text = "\n".join(shown) if shown else "(no output)"
    return FailedPrecondition(
        f"{recipe.name}: {function}() failed ({how}) in phase {phase.value}; last lines:\n{text}",
        reason="BUILD_FAILED",
        metadata={"phase": phase.value, "function": function, "exit_code": str(code)},
    )


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = [
    "MANIFEST_FILE",
    "PKGBUILD_FILE",
    "STAGING_DIR",
    "BuildCallbacks",
    "BuildRequest",
    "CancelToken",
    "InstallPhase",
    "LogLine",
    "LogStream",
    "RecipeBuilder",
    "build_environment",
    "read_versions",
    "run_process",
    "validate_build_env",
]
