"""Local sources: `file:PATH` or an absolute path, registered in place (copied when asked).

In place: nothing is planned and the catalog registers the path itself. With
`options.copy_files`: every file is planned as a `file://` transfer (same hashing and
progress as a download) into `<models_dir>/local/<16 hex of sha256(path)>/`, keeping a
folder's relative layout.
"""

from __future__ import annotations

import hashlib
import os
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


def _walk(folder: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue  # .cache/, .gitattributes, editor files: not part of the model
            files.append(Path(root) / name)
            if len(files) > MAX_FOLDER_FILES:
                raise InvalidArgument.for_field(
                    "source", f"{folder} holds more than {MAX_FOLDER_FILES} files"
                )
    return files


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
