"""Local sources: `file:PATH` or an absolute path, registered in place (copied when asked).

In place: nothing is planned and the catalog registers the path itself. With
`options.copy_files`: every file is planned as a `file://` transfer (same hashing and
progress as a download) into `<models_dir>/local/<16 hex of sha256(path)>/`, keeping a
folder's relative layout.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from services.catalog.domain import ModelSource, SourceKind
from services.common.errors import InvalidArgument, NotFound
from services.provisioner.domain import (
    LocalSpec,
    PlannedFile,
    PullOptions,
    RemoteFileInfo,
    Resolution,
)
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.files import (
    drop_model_suffix,
    format_from_name,
    model_slug,
    quantization_from_name,
    sanitize_filename,
)

MAX_FOLDER_FILES = 100_000
# A model folder is shallow (a diffusers pipeline is two levels deep): a source that walks
# deeper or through more folders than this is not a model (`file:/` is refused quickly).
MAX_FOLDER_DEPTH = 8
MAX_FOLDER_DIRS = 10_000


def _not_a_model_folder(folder: Path, why: str) -> InvalidArgument:
    return InvalidArgument.for_field("source", f"{folder} is not a model folder: {why}")


def _walk(folder: Path) -> list[Path]:
    """The regular files of a model folder, sorted, hidden ones left out. Symlinked folders are
    not followed; device files, sockets and FIFOs are refused (a copy of /dev/zero never ends)."""
    files: list[Path] = []
    dirs_seen = 0
    for root, dirs, names in os.walk(folder):
        dirs_seen += 1
        depth = len(Path(root).relative_to(folder).parts)
        if depth > MAX_FOLDER_DEPTH or dirs_seen > MAX_FOLDER_DIRS:
            raise _not_a_model_folder(
                folder, f"more than {MAX_FOLDER_DEPTH} levels or {MAX_FOLDER_DIRS} folders"
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue  # .cache/, .gitattributes, editor files: not part of the model
            member = Path(root) / name
            _check_regular(member)
            files.append(member)
            if len(files) > MAX_FOLDER_FILES:
                raise _not_a_model_folder(folder, f"more than {MAX_FOLDER_FILES} files")
    return files


def _check_regular(path: Path) -> None:
    """A model file is a regular file (a symlink to one is fine)."""
    try:
        mode = path.stat().st_mode
    except OSError:  # a dangling symlink: nothing to read
        raise InvalidArgument.for_field("source", f"{path}: a broken link") from None
    if not stat.S_ISREG(mode):
        raise InvalidArgument.for_field(
            "source", f"{path} is not a regular file (a device, socket or pipe)"
        )


def resolve_local(spec: LocalSpec, options: PullOptions, ctx: SourceContext) -> Resolution:
    """Resolve a local file or folder (FILE_NOT_FOUND when it does not exist)."""
    path = Path(os.path.abspath(spec.path))
    if not path.exists():
        raise NotFound(
            f"{path}: no such file or directory on the provisioner's machine",
            resource_type="file",
            resource_name=str(path),
            reason="FILE_NOT_FOUND",
        )
    is_dir = path.is_dir()
    if not is_dir:
        _check_regular(path)
    members = _walk(path) if is_dir else [path]
    relative = [m.relative_to(path).as_posix() if is_dir else path.name for m in members]
    sizes = [m.stat().st_size for m in members]
    source = ModelSource(kind=SourceKind.LOCAL, path=str(path))
    infos = [
        RemoteFileInfo(
            path=rel,
            size=size,
            quantization=quantization_from_name(rel) if rel.endswith(".gguf") else None,
            format=format_from_name(rel),
            selected=True,
            present_bytes=size,
        )
        for rel, size in zip(relative, sizes, strict=True)
    ]
    hint = model_slug(drop_model_suffix(path.name), quantization_from_name(path.name))
    if not options.copy_files:
        return Resolution(
            source=source,
            files=infos,
            planned=[],
            model_paths=[str(path)],
            model_id_hint=hint,
            display_name=path.name,
        )
    target = ctx.models_dir / "local" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    root = target / sanitize_filename(path.name) if is_dir else target
    planned = []
    for member, rel, size in zip(members, relative, sizes, strict=True):
        dest = root / rel if is_dir else target / sanitize_filename(path.name)
        # Never `cached`: a same-size copy may be stale; the transfer re-copies and hashes.
        planned.append(PlannedFile(path=rel, url=member.as_uri(), dest=dest, size=size))
    model_path = root if is_dir else planned[0].dest
    return Resolution(
        source=source,
        files=infos,
        planned=planned,
        model_paths=[str(model_path)],
        model_id_hint=hint,
        display_name=path.name,
    )
