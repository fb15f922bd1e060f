"""Model inspection: read a model file's or folder's header and say what it is.

`inspect_path` is the one entry point. It never reads tensor data: GGUF and safetensors
headers are parsed with bounded reads (every count and length is checked against the bytes
that remain before anything is allocated or looped over), folders by their small JSON configs
plus the safetensors headers of their weights.

Dispatch, in order:
- a missing path -> `NotFound` (reason FILE_NOT_FOUND);
- a file starting with the GGUF magic (or named `*.gguf`) -> `gguf.inspect_gguf`;
- a file whose first 8 bytes are a little-endian header length followed by `{` (or named
  `*.safetensors`) -> `safetensors.inspect_safetensors`;
- a directory with `model_index.json` -> diffusers folder; with `config.json` -> HF
  transformers folder (`folders.py`);
- anything else -> `InspectError` with reason UNSUPPORTED_FILE_FORMAT naming what was found.
"""

from __future__ import annotations

import pathlib

from services.catalog.domain import ModelMetadata
from services.common.errors import InvalidArgument, NotFound

MODEL_FILE_INVALID = "MODEL_FILE_INVALID"
UNSUPPORTED_FILE_FORMAT = "UNSUPPORTED_FILE_FORMAT"

GGUF_MAGIC = b"GGUF"
# The safetensors reference implementation refuses headers above 100 MB; so do we.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000

__all__ = [
    "MODEL_FILE_INVALID",
    "UNSUPPORTED_FILE_FORMAT",
    "InspectError",
    "inspect_path",
]


class InspectError(InvalidArgument):
    """The file or folder is not a model we can read.

    `reason` is MODEL_FILE_INVALID (corrupt, truncated, a bound exceeded) or
    UNSUPPORTED_FILE_FORMAT (not GGUF, not safetensors, not a known folder layout).
    """

    default_reason = MODEL_FILE_INVALID


def warm_imports() -> None:
    """Import the format readers (numpy with them) now, so that the first inspect does not
    pay for it: the catalog calls this in a thread at start."""
    from services.catalog.inspect import folders, gguf, safetensors  # noqa: F401


def inspect_path(path: pathlib.Path) -> ModelMetadata:
    """Inspect a model file or folder and return its metadata.

    Raises `NotFound` (reason FILE_NOT_FOUND) when `path` does not exist and `InspectError`
    when it exists but is not a readable model.
    """
    # Imported here: the format modules import InspectError from this package.
    from services.catalog.inspect import folders, gguf, safetensors

    path = pathlib.Path(path)
    if not path.exists():
        raise NotFound(
            f"{path}: no such file or directory",
            resource_type="file",
            resource_name=str(path),
            reason="FILE_NOT_FOUND",
        )
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return folders.inspect_diffusers_folder(path)
        if (path / "config.json").is_file():
            return folders.inspect_transformers_folder(path)
        raise InspectError(
            f"{path}: a directory without model_index.json or config.json "
            f"(found: {folders.describe_directory(path)})",
            reason=UNSUPPORTED_FILE_FORMAT,
        )
    if not path.is_file():
        raise InspectError(
            f"{path}: not a regular file or directory", reason=UNSUPPORTED_FILE_FORMAT
        )
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise InspectError(f"{path}: cannot read: {exc.strerror}") from exc
    suffix = path.suffix.lower()
    if head[:4] == GGUF_MAGIC or suffix == ".gguf":
        return gguf.inspect_gguf(path)
    if _looks_like_safetensors(head) or suffix == ".safetensors":
        return safetensors.inspect_safetensors(path)
    raise InspectError(
        f"{path}: not a GGUF or safetensors file (first bytes: {head[:8].hex() or 'empty'})",
        reason=UNSUPPORTED_FILE_FORMAT,
    )


def _looks_like_safetensors(head: bytes) -> bool:
    """8 bytes of u64 LE header length, then the JSON object's `{`.

    The length itself is checked by the reader, which reports a bad one precisely
    (MODEL_FILE_INVALID) instead of calling the file "unsupported".
    """
    return len(head) >= 9 and head[8:9] == b"{"
