"""Resource ids and names: validation, parsing, and ids derived from a model's source.

Ids are AIP-122 style slugs (`domain.ID_PATTERN`); they are validated once, here, and never
joined raw into file paths. Source coordinates (repo, file, url, path) stay fields of
`ModelSource`; the id only carries a readable slug plus a short hash of the canonical source,
so two different sources never map to the same id even when their slugs agree (the original
rbee turned `/` and `:` into `-`, so `a/b:c` and `a-b-c` collided).
"""

from __future__ import annotations

import hashlib
import re

from services.catalog.domain import ID_PATTERN, ModelSource, SourceKind
from services.common.errors import InvalidArgument

MAX_ID_LENGTH = 63
ID_RULE = (
    "must be 1-63 characters of lower-case letters, digits and hyphens, "
    "starting with a letter or digit and not ending with a hyphen"
)
_HASH_HEX_CHARS = 8
# A slug plus "-" plus the hash suffix must fit in MAX_ID_LENGTH.
_MAX_SLUG_LENGTH = MAX_ID_LENGTH - 1 - _HASH_HEX_CHARS
# Refuse absurd inputs before any regex work (names are short; 10,000-char names are attacks).
_MAX_NAME_LENGTH = 256
# File suffixes that say nothing about the model, dropped from the readable part of an id.
_DROPPED_SUFFIXES = (
    ".gguf",
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".onnx",
)
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def validate_id(value: str, *, field: str = "id") -> str:
    """Return `value` when it is a valid resource id, else raise InvalidArgument (INVALID_NAME).

    `field` names the request field in the error's field violation (e.g. "model_id").
    """
    if not _is_valid_id(value):
        raise InvalidArgument.for_field(
            field, f"{_shown(value)} is not a valid id: {ID_RULE}", reason="INVALID_NAME"
        )
    return value


def parse_resource_name(name: str, collection: str, *, field: str = "name") -> str:
    """Return the id in `name`, which must be exactly `{collection}/{id}` with a valid id.

    Anything else (`models/../etc`, `models/a/b`, `/abs`, NUL bytes, overlong names, an empty
    id) raises InvalidArgument with reason INVALID_NAME naming the expected form.
    """
    expected = f"expected {collection}/{{id}} where the id {ID_RULE}"
    if not isinstance(name, str) or len(name) > _MAX_NAME_LENGTH:
        raise InvalidArgument.for_field(
            field, f"resource name is too long; {expected}", reason="INVALID_NAME"
        )
    prefix = f"{collection}/"
    if not name.startswith(prefix):
        raise InvalidArgument.for_field(
            field, f"{_shown(name)} is not a valid resource name; {expected}", reason="INVALID_NAME"
        )
    candidate = name[len(prefix) :]
    if not _is_valid_id(candidate):
        raise InvalidArgument.for_field(
            field, f"{_shown(name)} is not a valid resource name; {expected}", reason="INVALID_NAME"
        )
    return candidate


def slugify(text: str) -> str:
    """Lower-case `text` and turn every run of other characters into one hyphen.

    The result may be empty; it never starts or ends with a hyphen.
    """
    return _NOT_SLUG.sub("-", text.lower()).strip("-")


def source_hash_suffix(source: ModelSource) -> str:
    """The first 8 hex characters of sha256(source.canonical()): the part of an id that keeps
    ids of different sources apart."""
    return hashlib.sha256(source.canonical().encode("utf-8")).hexdigest()[:_HASH_HEX_CHARS]


def model_id_for_source(source: ModelSource, hint: str | None = None) -> str:
    """A readable, valid, source-unique id: `{slug}-{8 hex of sha256(canonical source)}`.

    The slug comes from `hint` (a file or repo name; e.g. "llama-2-7b.Q4_K_M.gguf" gives
    "llama-2-7b-q4-k-m") or, without one, from the source itself; it is cut so that the whole
    id is at most 63 characters. The hash suffix differs for different canonical sources even
    when their slugs agree.
    """
    readable = hint if hint is not None else _default_hint(source)
    slug = slugify(_drop_suffix(_last_component(readable)))
    slug = slug[:_MAX_SLUG_LENGTH].rstrip("-") or "model"
    return f"{slug}-{source_hash_suffix(source)}"


def _is_valid_id(value: object) -> bool:
    # fullmatch, not match: ID_PATTERN ends in `$`, which also matches before a trailing "\n".
    return (
        isinstance(value, str)
        and len(value) <= MAX_ID_LENGTH
        and ID_PATTERN.fullmatch(value) is not None
    )


def _default_hint(source: ModelSource) -> str:
    """The most telling name the source offers: its first file, repo, url file, or path."""
    if source.files:
        return sorted(source.files)[0]
    if source.kind is SourceKind.HUGGINGFACE and source.repo:
        return source.repo
    if source.kind is SourceKind.CIVITAI and source.civitai_version_id is not None:
        return f"civitai-{source.civitai_version_id}"
    if source.url:
        # Drop a query string and fragment: they carry tokens and noise, not names.
        return source.url.split("?", 1)[0].split("#", 1)[0]
    if source.path:
        return source.path
    return source.kind.value


def _last_component(text: str) -> str:
    """The last non-empty `/`-separated part (a repo's name, a file's base name)."""
    parts = [part for part in text.replace("\\", "/").split("/") if part]
    return parts[-1] if parts else text


def _drop_suffix(text: str) -> str:
    lowered = text.lower()
    for suffix in _DROPPED_SUFFIXES:
        if lowered.endswith(suffix) and len(text) > len(suffix):
            return text[: -len(suffix)]
    return text


def _shown(value: object) -> str:
    """A short, printable rendering of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
