"""Inspect a remote model before downloading it: headers only, over HTTP Range requests.

The source is resolved as for a pull (nothing is written to the HF cache), then only what the
catalog's inspector reads is fetched into a temporary folder that mirrors the remote layout:

- GGUF: a prefix of each file (shards included), starting at 1 MiB and doubling until the
  header (KVs + tensor infos) parses, up to the reader's `MAX_HEADER_BYTES`;
- safetensors: the 8-byte header length, then exactly the JSON header;
- diffusers / transformers repos: the small JSON configs, plus the safetensors headers of
  the weights.

Each fetched prefix is extended to the real remote size as a sparse file (a hole, never
written), so the inspector sees the true file sizes and reports no truncation; then
`services.catalog.inspect.inspect_path` does the rest. `bytes_read` is the exact number of
body bytes read from the network.
"""

from __future__ import annotations

import posixpath
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.catalog.domain import ModelMetadata
from services.catalog.inspect import SAFETENSORS_MAX_HEADER_BYTES, InspectError, inspect_path
from services.catalog.inspect.gguf import MAX_HEADER_BYTES, read_gguf_header
from services.common.errors import Unavailable
from services.provisioner import http
from services.provisioner.domain import (
    AuthScope,
    LocalSpec,
    PlannedFile,
    PullOptions,
    Resolution,
    SourceSpec,
)
from services.provisioner.sources import SourceContext, resolve
from services.provisioner.sources.url import total_from_content_range

FIRST_GGUF_PREFIX = 1024 * 1024
SNIFF_PREFIX = 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Files a folder inspection never needs (big tokenizer vocabularies): size-only placeholders.
_SKIPPED_CONFIGS = frozenset({"tokenizer.json", "vocab.json", "merges.txt"})
_CONFIG_SUFFIXES = (".json", ".jinja")
_TOKEN_SETTINGS = {AuthScope.HUGGINGFACE: "HF_TOKEN", AuthScope.CIVITAI: "CIVITAI_API_TOKEN"}


@dataclass(frozen=True)
class RemoteInspection:
    """What a pull of the source would fetch, what the model is, and what it cost to learn."""

    resolution: Resolution
    metadata: ModelMetadata
    bytes_read: int


class _RangeReader:
    """Range GETs through the one HTTP seam, counting every body byte read."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.bytes_read = 0
        self.sizes: dict[str, int] = {}  # planned path -> total size learned from Content-Range

    def size_of(self, planned: PlannedFile) -> int | None:
        return planned.size if planned.size is not None else self.sizes.get(planned.path)

    def fetch(self, planned: PlannedFile, start: int, end: int | None) -> bytes:
        """Bytes [start, end] (inclusive; end None: to the end of the file)."""
        token = self.ctx.credentials.token_for(planned.auth)
        what = planned.path or http.redact_url(planned.url)
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        with http.open_url(
            planned.url, headers=headers, token=token, timeout=self.ctx.timeout
        ) as resp:
            http.raise_for_status(
                resp, what=what, token=token, token_setting=_TOKEN_SETTINGS.get(planned.auth, "")
            )
            if resp.status == 206:
                total = total_from_content_range(resp.header("Content-Range"))
                if total is not None:
                    self.sizes[planned.path] = total
                want = None if end is None else end - start + 1
                data = resp.read(want) if want is not None else resp.read()
                self.bytes_read += len(data)
                return data
            # The server ignored the Range: read up to `end` from the start, keep the slice.
            length = resp.header("Content-Length")
            if length.isdigit():
                self.sizes[planned.path] = int(length)
            data = resp.read(end + 1) if end is not None else resp.read()
            self.bytes_read += len(data)
            return data[start:]

    def fetch_whole(self, planned: PlannedFile) -> bytes:
        data = self.fetch(planned, 0, None)
        self.sizes[planned.path] = len(data)
        return data


def _write_sparse(path: Path, prefix: bytes, size: int | None) -> None:
    """`prefix` followed by a hole up to `size` bytes (the remote file's real size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(prefix)
        if size is not None and size > len(prefix):
            f.truncate(size)


def _gguf_prefix(reader: _RangeReader, planned: PlannedFile, path: Path, first: bytes) -> bytes:
    """Grow the prefix until the GGUF header parses; returns the prefix."""
    data = bytearray(first)
    want = max(FIRST_GGUF_PREFIX, len(data))
    while True:
        size = reader.size_of(planned)
        limit = min(size, MAX_HEADER_BYTES) if size is not None else MAX_HEADER_BYTES
        if len(data) < min(want, limit):
            data += reader.fetch(planned, len(data), min(want, limit) - 1)
        _write_sparse(path, bytes(data), None)
        try:
            read_gguf_header(path)
            return bytes(data)  # the prefix is the whole file
        except InspectError as exc:
            if "truncated file" in exc.message:
                return bytes(data)  # the header is complete; only tensor data is missing
            if "truncated header" not in exc.message or len(data) >= limit:
                raise
        want *= 2


def _inspect_gguf(reader: _RangeReader, planned: list[PlannedFile], root: Path) -> Path:
    paths = []
    for item in planned:
        path = root / posixpath.basename(item.path)
        first = reader.fetch(item, 0, _first_end(reader, item, FIRST_GGUF_PREFIX))
        prefix = _gguf_prefix(reader, item, path, first)
        _write_sparse(path, prefix, reader.size_of(item))
        paths.append(path)
    return paths[0]


def _first_end(reader: _RangeReader, planned: PlannedFile, length: int) -> int:
    size = reader.size_of(planned)
    return (min(size, length) if size is not None else length) - 1


def _safetensors_header(reader: _RangeReader, planned: PlannedFile) -> bytes:
    """The 8-byte length, then exactly the JSON header (two small Range requests)."""
    head = reader.fetch(planned, 0, 7)
    if len(head) < 8:
        return head
    (length,) = struct.unpack("<Q", head[:8])
    size = reader.size_of(planned)
    if (
        length == 0
        or length > SAFETENSORS_MAX_HEADER_BYTES
        or (size is not None and 8 + length > size)
    ):
        return head  # the inspector reports the bad length precisely
    return head + reader.fetch(planned, 8, 8 + length - 1)


def _inspect_single(reader: _RangeReader, planned: PlannedFile, root: Path) -> Path:
    path = root / posixpath.basename(planned.path)
    if planned.path.lower().endswith(".safetensors"):
        _write_sparse(path, _safetensors_header(reader, planned), reader.size_of(planned))
        return path
    first = reader.fetch(planned, 0, _first_end(reader, planned, SNIFF_PREFIX))
    if first[:4] == b"GGUF":
        first = _gguf_prefix(reader, planned, path, first)
    elif len(first) >= 9 and first[8:9] == b"{":
        (length,) = struct.unpack("<Q", first[:8])
        if 8 + length > len(first) and length <= SAFETENSORS_MAX_HEADER_BYTES:
            first += reader.fetch(planned, len(first), 8 + length - 1)
    _write_sparse(path, first, reader.size_of(planned))
    return path


def _inspect_folder(reader: _RangeReader, planned: list[PlannedFile], root: Path) -> Path:
    for item in planned:
        path = root / item.path  # repo paths were validated by the resolver (no '..')
        name = posixpath.basename(item.path).lower()
        if name.endswith(".safetensors"):
            _write_sparse(path, _safetensors_header(reader, item), reader.size_of(item))
        elif (
            name.endswith(_CONFIG_SUFFIXES)
            and name not in _SKIPPED_CONFIGS
            and (item.size is None or item.size <= MAX_CONFIG_BYTES)
        ):
            _write_sparse(path, reader.fetch_whole(item), None)
        else:
            _write_sparse(path, b"", item.size)
    return root


def _is_folder(resolution: Resolution) -> bool:
    model = Path(resolution.model_paths[0]) if resolution.model_paths else None
    links = [p.link for p in resolution.planned]
    return (
        model is not None
        and bool(links)
        and all(link is not None and model in link.parents for link in links)
    )


def inspect_remote(spec: SourceSpec, options: PullOptions, ctx: SourceContext) -> RemoteInspection:
    """Resolve `spec` and inspect the model from its headers alone (blocking)."""
    resolution = resolve(spec, options, ctx, write_refs=False)
    if isinstance(spec, LocalSpec):
        metadata = inspect_path(Path(resolution.model_paths[0]))
        return RemoteInspection(resolution, metadata, 0)
    if not resolution.planned:
        raise Unavailable("the source resolved to no files", reason="UPSTREAM_UNAVAILABLE")
    reader = _RangeReader(ctx)
    with tempfile.TemporaryDirectory(prefix="rbee-inspect-") as tmp:
        root = Path(tmp)
        planned = resolution.planned
        if _is_folder(resolution):
            target = _inspect_folder(reader, planned, root)
        elif planned[0].path.lower().endswith(".gguf"):
            target = _inspect_gguf(reader, planned, root)
        else:
            target = _inspect_single(reader, planned[0], root)
        metadata = inspect_path(target)
    sizes = [reader.size_of(p) for p in planned]
    total = sum(s or 0 for s in sizes)
    warnings = [w for w in metadata.warnings if "truncated" not in w.lower()]
    update: dict[str, object] = {"warnings": warnings}
    if all(s is not None for s in sizes):
        update["size_bytes"] = total
    return RemoteInspection(resolution, metadata.model_copy(update=update), reader.bytes_read)
