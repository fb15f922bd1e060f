"""PKGBUILD recipes: read by bash itself, found only in the configured recipe directories.

A PKGBUILD is a bash script. The original rbee read it with a line-based parser that broke on
multi-line arrays, `$pkgver` inside `source`, conditionals and quoting
(reference/rbee-original.md, item 17). Here bash sources the file and prints the fields, so
whatever bash means is what we read:

- `env -i` with a minimal PATH, HOME in a fresh temporary directory and `CARCH` set to this
  host's CPU architecture (as makepkg does): no token of ours is visible to the file.
- The file's own output goes to stderr; the fields are written to a separate descriptor as
  NUL-separated records (`NAME`, kind, count, items...). Bash strings cannot hold NUL, so no
  value can forge a record.
- A timeout bounds the run (a PKGBUILD that loops at top level is RECIPE_INVALID, not a hang).

Sourcing runs the file's top-level code, which is why recipes are read only from configured
recipe directories (a list; by default the repository's `recipes/` and `RBEE_HOME/recipes`),
under a validated slug name: `<dir>/<recipe>/PKGBUILD`.

Every problem with a recipe is FAILED_PRECONDITION with reason RECIPE_INVALID and a message that
says what is wrong; an unknown recipe is NOT_FOUND (RECIPE_NOT_FOUND); a recipe name that is not
a slug (traversal, absolute paths, NUL bytes) is INVALID_ARGUMENT (INVALID_NAME).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from services.catalog.domain import ID_PATTERN, WorkerType
from services.catalog.worker_types import (
    build_worker_types,
    host_platform,
    host_supports,
    normalize_machine,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

PARSE_TIMEOUT = 10.0  # seconds for bash to source a PKGBUILD and print its fields
PARSE_PATH = "/usr/local/bin:/usr/bin:/bin"
PKGBUILD_FILE = "PKGBUILD"

SCALAR_FIELDS = ("pkgname", "pkgver", "pkgrel", "pkgdesc", "rbee_worker_type", "rbee_backend")
ARRAY_FIELDS = ("arch", "depends", "makedepends", "source", "sha256sums")
PHASE_FUNCTIONS = ("prepare", "build", "check", "package")
REQUIRED_SCALARS = ("pkgname", "pkgver", "pkgrel")

# makepkg's own rules for the name, version and release.
_PKGNAME = re.compile(r"^[a-z0-9@_+][a-z0-9@._+-]*$")
_PKGVER = re.compile(r"^[A-Za-z0-9._+]+$")
_PKGREL = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_VCS_PREFIXES = ("git+",)

# The bash side: source the file with its output on stderr, then print every field on fd 3.
# Records: NAME \0 KIND \0 COUNT \0 ITEM \0 ... with KIND one of unset, scalar, array, function.
_DUMP_SCRIPT = r"""
exec 3>&1 1>&2
cd -- "$(dirname -- "$1")" || exit 90
source "./$(basename -- "$1")" || exit 91
emit_field() {
    local name=$1 decl
    decl=$(declare -p "$name" 2>/dev/null) || { printf '%s\0unset\0000\0' "$name" >&3; return; }
    if [[ $decl == "declare -a"* ]]; then
        local -n ref=$name
        printf '%s\0array\0%d\0' "$name" "${#ref[@]}" >&3
        (( ${#ref[@]} )) && printf '%s\0' "${ref[@]}" >&3
    elif [[ $decl == "declare -A"* ]]; then
        printf '%s\0unset\0000\0' "$name" >&3
    else
        local -n ref=$name
        printf '%s\0scalar\0001\0%s\0' "$name" "$ref" >&3
    fi
    return 0
}
for f in "${@:2}"; do
    if [[ $f == fn:* ]]; then
        if declare -F "${f#fn:}" >/dev/null; then
            printf '%s\0function\0000\0' "$f" >&3
        else
            printf '%s\0unset\0000\0' "$f" >&3
        fi
    else
        emit_field "$f"
    fi
done
exit 0
"""


class SourceKind(StrEnum):
    """Where a recipe source comes from."""

    LOCAL = "local"  # a file beside the PKGBUILD
    FILE = "file"  # file:///absolute/path
    HTTP = "http"  # http(s)://
    GIT = "git"  # git+<url>[#tag=|branch=|commit=]


@dataclass(frozen=True)
class SourceEntry:
    """One `source` entry, split: `[name::]url[#fragment]` with its sha256sums entry."""

    raw: str  # as written, after bash expansion
    kind: SourceKind
    name: str  # the file or directory name inside $srcdir
    location: str  # the URL or path without `name::`, `git+` and the fragment
    ref_kind: str = ""  # git: tag, branch, commit, or "" for the default branch
    ref: str = ""
    sha256: str = ""  # lower-case hex, or "SKIP"

    @property
    def is_vcs(self) -> bool:
        return self.kind is SourceKind.GIT


class RecipeSource(BaseModel):
    """A source with its checksum, as the API shows it."""

    model_config = ConfigDict(frozen=True)

    url: str
    sha256: str


class Pkgbuild(BaseModel):
    """The fields of a PKGBUILD, as bash read them."""

    model_config = ConfigDict(frozen=True)

    path: str
    pkgname: str
    pkgver: str
    pkgrel: str
    pkgdesc: str = ""
    arch: list[str]
    depends: list[str] = []
    makedepends: list[str] = []
    source: list[str] = []
    sha256sums: list[str] = []
    functions: list[str] = []  # which of prepare/build/check/package are defined
    rbee_worker_type: str = ""  # our extension: the worker type it builds
    rbee_backend: str = ""  # our extension: the backend distribution (for the record)

    @property
    def version(self) -> str:
        return f"{self.pkgver}-{self.pkgrel}"

    def sources(self) -> list[SourceEntry]:
        """The sources, split and paired with their checksums (validated at read time)."""
        return [parse_source_entry(s, c) for s, c in zip(self.source, self.sha256sums, strict=True)]


class Recipe(BaseModel):
    """A recipe (`recipes/{id}`): a directory with a PKGBUILD in a configured recipe directory."""

    model_config = ConfigDict(frozen=True)

    id: str
    worker_type: str
    directory: str
    pkgbuild: Pkgbuild
    supported_on_host: bool
    unsupported_reason: str = ""

    @property
    def name(self) -> str:
        return f"recipes/{self.id}"

    @property
    def path(self) -> str:
        return self.pkgbuild.path

    @property
    def sources(self) -> list[RecipeSource]:
        pb = self.pkgbuild
        return [
            RecipeSource(url=u, sha256=c) for u, c in zip(pb.source, pb.sha256sums, strict=True)
        ]


def _invalid(path: Path | str, why: str) -> FailedPrecondition:
    return FailedPrecondition(f"recipe {path}: {why}", reason="RECIPE_INVALID")


def parse_source_entry(raw: str, sha256: str) -> SourceEntry:
    """Split one `source` entry (makepkg syntax). Raises RECIPE_INVALID when malformed."""
    name = ""
    rest = raw
    if "::" in raw:
        name, rest = raw.split("::", 1)
        if not _SOURCE_NAME.fullmatch(name) or name in (".", ".."):
            raise _invalid(raw, f"bad source name {name!r}")
    checksum = sha256.strip().lower() if sha256 != "SKIP" else "SKIP"
    if checksum != "SKIP" and not _SHA256.fullmatch(checksum):
        raise _invalid(raw, f"sha256sums entry {sha256!r} is neither 64 hex digits nor SKIP")
    if rest.startswith(_VCS_PREFIXES):
        url, _, fragment = rest[len("git+") :].partition("#")
        ref_kind, ref = "", ""
        if fragment:
            ref_kind, sep, ref = fragment.partition("=")
            if not sep or ref_kind not in ("tag", "branch", "commit") or not ref:
                raise _invalid(raw, "git fragment must be #tag=, #branch= or #commit=")
            if ref.startswith("-") or any(c.isspace() for c in ref):
                raise _invalid(raw, f"bad git ref {ref!r}")
            if ref_kind == "commit" and not re.fullmatch(r"[0-9a-f]{7,64}", ref):
                raise _invalid(raw, "#commit= must be a hex object id")
        if not url or url.startswith("-"):
            raise _invalid(raw, "git source has no URL")
        if checksum != "SKIP":
            # A commit pin is a VCS source's integrity; a sum we could not check is refused
            # rather than silently ignored.
            raise _invalid(raw, "VCS sources take SKIP in sha256sums (pin a #commit= instead)")
        base = url.rstrip("/").rsplit("/", 1)[-1]
        base = base.removesuffix(".git")
        return SourceEntry(
            raw=raw,
            kind=SourceKind.GIT,
            name=name or base,
            location=url,
            ref_kind=ref_kind,
            ref=ref,
            sha256=checksum,
        )
    if checksum == "SKIP":
        raise _invalid(raw, "SKIP is allowed for VCS sources only; give the file's sha256")
    if rest.startswith(("http://", "https://")):
        base = rest.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        kind, location = SourceKind.HTTP, rest
    elif rest.startswith("file://"):
        location = rest[len("file://") :]
        if not location.startswith("/"):
            raise _invalid(raw, "file:// sources take an absolute path")
        base = location.rstrip("/").rsplit("/", 1)[-1]
        kind = SourceKind.FILE
    elif "://" in rest:
        raise _invalid(raw, "unsupported source scheme (use git+, https://, file:// or a file)")
    else:
        if rest.startswith("/") or ".." in Path(rest).parts or not rest:
            raise _invalid(raw, "local sources are paths inside the recipe directory")
        base = Path(rest).name
        kind, location = SourceKind.LOCAL, rest
    final = name or base
    if not _SOURCE_NAME.fullmatch(final) or final in (".", ".."):
        raise _invalid(raw, f"cannot derive a file name from the source (got {final!r})")
    return SourceEntry(raw=raw, kind=kind, name=final, location=location, sha256=checksum)


def decode_fields(output: bytes) -> dict[str, str | list[str] | bool | None]:
    """Decode the NUL-separated records the dump script writes.

    Scalars become str, arrays list[str], functions `fn:NAME` -> True, unset -> None.
    Raises ValueError on a malformed stream (which would be a bug in the script).
    """
    parts = output.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    fields: dict[str, str | list[str] | bool | None] = {}
    i = 0
    while i < len(parts):
        if i + 3 > len(parts):
            raise ValueError("truncated record")
        name = parts[i].decode("utf-8", "replace")
        kind = parts[i + 1].decode("ascii")
        count = int(parts[i + 2])
        items = [p.decode("utf-8", "replace") for p in parts[i + 3 : i + 3 + count]]
        if len(items) != count:
            raise ValueError(f"record {name} is short")
        i += 3 + count
        if kind == "unset":
            fields[name] = None
        elif kind == "scalar":
            fields[name] = items[0]
        elif kind == "array":
            fields[name] = items
        elif kind == "function":
            fields[name] = True
        else:
            raise ValueError(f"unknown record kind {kind!r}")
    return fields


def pkgbuild_from_fields(
    path: Path | str, fields: Mapping[str, str | list[str] | bool | None]
) -> Pkgbuild:
    """Validate decoded fields into a Pkgbuild (RECIPE_INVALID with the reason otherwise)."""

    def scalar(name: str) -> str:
        value = fields.get(name)
        if value is None:
            return ""
        if isinstance(value, list):
            # bash: an array used as a scalar means its first element; a PKGBUILD that does this
            # for pkgname is a mistake worth naming.
            raise _invalid(path, f"{name} must be a plain variable, not an array")
        return str(value)

    def array(name: str) -> list[str]:
        value = fields.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]  # `arch=x86_64` is a one-element array to bash's ${arch[@]}
        if isinstance(value, bool):
            return []
        return list(value)

    for required in REQUIRED_SCALARS:
        if not scalar(required):
            raise _invalid(path, f"required field {required} is missing or empty")
    pkgname, pkgver, pkgrel = scalar("pkgname"), scalar("pkgver"), scalar("pkgrel")
    if not _PKGNAME.fullmatch(pkgname):
        raise _invalid(path, f"pkgname {pkgname!r} is not a valid package name")
    if not _PKGVER.fullmatch(pkgver):
        raise _invalid(path, f"pkgver {pkgver!r} may hold letters, digits and . _ + only")
    if not _PKGREL.fullmatch(pkgrel):
        raise _invalid(path, f"pkgrel {pkgrel!r} must be a number (e.g. 1 or 1.1)")
    arch = array("arch")
    if not arch:
        raise _invalid(path, "required array arch is missing or empty")
    source, sums = array("source"), array("sha256sums")
    if len(source) != len(sums):
        raise _invalid(
            path,
            f"source has {len(source)} entries but sha256sums has {len(sums)}; "
            "give one checksum (or SKIP for VCS) per source",
        )
    functions = [f for f in PHASE_FUNCTIONS if fields.get(f"fn:{f}") is True]
    if "package" not in functions:
        raise _invalid(path, "package() is not defined")
    worker_type = scalar("rbee_worker_type")
    if worker_type and not ID_PATTERN.fullmatch(worker_type):
        raise _invalid(path, f"rbee_worker_type {worker_type!r} is not a worker type id")
    pkgbuild = Pkgbuild(
        path=str(path),
        pkgname=pkgname,
        pkgver=pkgver,
        pkgrel=pkgrel,
        pkgdesc=scalar("pkgdesc"),
        arch=arch,
        depends=array("depends"),
        makedepends=array("makedepends"),
        source=source,
        sha256sums=sums,
        functions=functions,
        rbee_worker_type=worker_type,
        rbee_backend=scalar("rbee_backend"),
    )
    pkgbuild.sources()  # every entry parses, every checksum is well-formed
    return pkgbuild


def host_carch() -> str:
    """This host's CPU architecture as PKGBUILDs name it (CARCH): x86_64, aarch64."""
    return host_platform()[1]


def read_pkgbuild(
    path: Path, *, carch: str | None = None, timeout: float = PARSE_TIMEOUT
) -> Pkgbuild:
    """Source the PKGBUILD at `path` in a clean bash and return its fields.

    Blocking (runs bash): call it in a thread from async code.
    """
    if not path.is_file():
        raise _invalid(path, "no such file")
    names = list(SCALAR_FIELDS) + list(ARRAY_FIELDS) + [f"fn:{f}" for f in PHASE_FUNCTIONS]
    with tempfile.TemporaryDirectory(prefix="rbee-pkgbuild-") as home:
        env = {
            "PATH": PARSE_PATH,
            "HOME": home,
            "TMPDIR": home,
            "LC_ALL": "C.UTF-8",
            "CARCH": carch or host_carch(),
        }
        try:
            proc = subprocess.run(
                [
                    "bash",
                    "--noprofile",
                    "--norc",
                    "-c",
                    _DUMP_SCRIPT,
                    "rbee-pkgbuild",
                    str(path),
                    *names,
                ],
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                start_new_session=True,  # a timeout kills bash; the group goes with the session
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise _invalid(path, f"sourcing it took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        detail = f": {' | '.join(tail)}" if tail else ""
        raise _invalid(path, f"bash could not source it (exit {proc.returncode}){detail}")
    try:
        fields = decode_fields(proc.stdout)
    except ValueError as exc:
        raise _invalid(path, f"unreadable field dump ({exc})") from None
    return pkgbuild_from_fields(path, fields)


def validate_recipe_name(name: str, field_name: str = "recipe") -> str:
    """The recipe id of `name` (`recipes/{id}` or a bare id); INVALID_ARGUMENT otherwise.

    Ids are slugs: no `/`, `..`, NUL or absolute paths can ever reach a path join.
    """
    recipe_id = name.removeprefix("recipes/")
    if not recipe_id or not ID_PATTERN.fullmatch(recipe_id):
        raise InvalidArgument.for_field(
            field_name,
            f"expected recipes/{{recipe}} with a slug id (lower-case letters, digits, hyphens), "
            f"got {name[:100]!r}",
            reason="INVALID_NAME",
        )
    return recipe_id


# The PATH a build runs with after the services' interpreter's own bin directory
# (build.build_environment): where the tools a recipe depends on are looked for.
BUILD_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# CUDA's compiler where the toolkit installs it when it is not on the PATH.
CUDA_HOMES = ("/usr/local/cuda",)
_DEPENDENCY = re.compile(r"^([A-Za-z0-9_.+-]+?)\s*(>=|<=|==|=|>|<)?\s*([0-9][0-9.]*)?$")


def build_tool_path() -> str:
    """The PATH a build gets (build.build_environment): the services' interpreter first."""
    return f"{Path(sys.executable).parent}:{BUILD_BASE_PATH}"


def find_tool(name: str) -> str | None:
    """Where the build would find `name`; `cuda` is CUDA's compiler (nvcc on the build's
    PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin)."""
    if name != "cuda":
        return shutil.which(name, path=build_tool_path())
    found = shutil.which("nvcc", path=build_tool_path())
    if found is not None:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), *CUDA_HOMES]
    for home in filter(None, homes):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return str(nvcc)
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part)


def missing_dependencies(
    pkgbuild: Pkgbuild,
    *,
    find: Callable[[str], str | None] = find_tool,
    python_version: tuple[int, ...] = tuple(sys.version_info[:3]),
) -> list[str]:
    """What of `depends` and `makedepends` this host lacks, each with why: `python` (with an
    optional version bound) is the services' interpreter, which builds use; `cuda` is CUDA's
    compiler; any other name is a command on the build's PATH. Checked before a build runs,
    so a recipe that cannot build here fails at once instead of minutes into its build."""
    missing: list[str] = []
    for dependency in [*pkgbuild.depends, *pkgbuild.makedepends]:
        match = _DEPENDENCY.match(dependency.strip())
        if match is None:
            continue  # not a name we can check (the build will say)
        name, op, version = match.groups()
        if name == "python":
            if op and version and not _satisfies(python_version, op, _version_tuple(version)):
                shown = ".".join(str(part) for part in python_version)
                missing.append(f"{dependency} (the services run Python {shown})")
            continue
        if find(name) is None:
            where = (
                "nvcc is not on the build's PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
                if name == "cuda"
                else f"no {name} on the build's PATH"
            )
            missing.append(f"{name} ({where})")
    return missing


def _satisfies(have: tuple[int, ...], op: str, want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    a = have + (0,) * (width - len(have))
    b = want + (0,) * (width - len(want))
    return {
        ">=": a >= b,
        "<=": a <= b,
        "==": a == b,
        "=": a == b,
        ">": a > b,
        "<": a < b,
    }[op]


@dataclass
class RecipeBook:
    """The recipes of the configured recipe directories (earlier directories win a name).

    `worker_types` tells which platforms and CPU architectures each worker type supports (a
    metal recipe is unsupported on Linux whatever its arch says); default: the six seeds.
    """

    directories: Sequence[Path]
    worker_types: Mapping[str, WorkerType] = field(
        default_factory=lambda: {wt.id: wt for wt in build_worker_types()}
    )
    host: tuple[str, str] = field(default_factory=host_platform)  # (platform, machine)
    parse_timeout: float = PARSE_TIMEOUT
    # Where a build finds a tool a recipe depends on (missing_dependencies); tests fake it.
    find_tool: Callable[[str], str | None] = find_tool

    def _locate(self, recipe_id: str) -> Path | None:
        for directory in self.directories:
            root = directory.resolve()
            candidate = root / recipe_id / PKGBUILD_FILE
            if not candidate.is_file():
                continue
            # A symlinked recipe directory that leads out of the configured directory is not
            # a recipe of that directory.
            if not candidate.resolve().is_relative_to(root):
                raise _invalid(candidate, "resolves outside its recipe directory")
            return candidate
        return None

    def get(self, name: str) -> Recipe:
        """The recipe `recipes/{id}` (or a bare id). Blocking: runs bash."""
        recipe_id = validate_recipe_name(name, "name")
        path = self._locate(recipe_id)
        if path is None:
            raise NotFound(
                f"recipes/{recipe_id} is not in any recipe directory "
                f"({', '.join(str(d) for d in self.directories) or 'none configured'})",
                resource_type="recipe",
                resource_name=f"recipes/{recipe_id}",
                reason="RECIPE_NOT_FOUND",
            )
        return self._recipe(recipe_id, path)

    def ids(self) -> list[str]:
        """Every recipe id found, sorted (first directory wins a duplicate)."""
        found: set[str] = set()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                for entry in directory.iterdir():
                    if ID_PATTERN.fullmatch(entry.name) and (entry / PKGBUILD_FILE).is_file():
                        found.add(entry.name)
        return sorted(found)

    def list(self) -> Iterable[Recipe | FailedPrecondition]:
        """Every recipe, by id; an unreadable one comes back as its RECIPE_INVALID error."""
        for recipe_id in self.ids():
            try:
                yield self.get(recipe_id)
            except FailedPrecondition as exc:
                yield exc

    def _recipe(self, recipe_id: str, path: Path) -> Recipe:
        machine = self.host[1]
        pkgbuild = read_pkgbuild(path, carch=normalize_machine(machine), timeout=self.parse_timeout)
        worker_type = pkgbuild.rbee_worker_type or recipe_id
        supported, reason = self.supports(pkgbuild, worker_type)
        return Recipe(
            id=recipe_id,
            worker_type=worker_type,
            directory=str(path.parent),
            pkgbuild=pkgbuild,
            supported_on_host=supported,
            unsupported_reason=reason,
        )

    def supports(self, pkgbuild: Pkgbuild, worker_type: str) -> tuple[bool, str]:
        """(whether it builds here, why not): the PKGBUILD's arch and the worker type's
        platforms and CPU architectures against this host, then its depends and makedepends
        (missing_dependencies)."""
        platform, machine = self.host
        carch = normalize_machine(machine)
        if "any" not in pkgbuild.arch and carch not in pkgbuild.arch:
            return False, f"arch=({' '.join(pkgbuild.arch)}) does not include this host's {carch}"
        wt = self.worker_types.get(worker_type)
        if wt is not None and not host_supports(wt, platform, machine):
            return False, (
                f"worker type {worker_type} runs on {'/'.join(wt.platforms)} "
                f"({'/'.join(wt.cpu_architectures)}); this host is {platform} {carch}"
            )
        missing = missing_dependencies(pkgbuild, find=self.find_tool)
        if missing:
            return False, f"this host lacks what it needs to build: {'; '.join(missing)}"
        return True, ""


def default_recipe_directories(home: Path) -> list[Path]:
    """The repository's recipes/ (beside services/) and RBEE_HOME/recipes."""
    return [project_root() / "recipes", home / "recipes"]


def project_root() -> Path:
    """This project's source tree (the directory that holds services/ and pyproject.toml)."""
    return Path(__file__).resolve().parents[3]
