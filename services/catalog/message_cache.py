"""rbee.catalog.v1.Model messages built once per stored model version, for GetModel/ListModels.

Building a Model message costs about 40 us of Python (`convert.model_to_pb`, one setattr per
field) on top of about 50 us for the JSON parse into the pydantic Model; a ListModels page of 50
paid both for every row, about 4 ms of CPU. Here each version (model id, etag) is converted
once and kept as its serialized bytes. The servicer sends those bytes as they are
(services.common.interceptors.EncodedResponse): a GetModel hit is one dictionary lookup, and a
ListModels page is its models' cached bytes, each framed as a `models` field, joined: no parse
into a message and no re-serialization by grpc (together ~0.3 ms of a page's ~1.7 ms of CPU).

`CompatibilityResponseCache` does the same for EvaluateCompatibility of a stored model: its
response is a pure function of the model version and the request (the worker types are fixed
for the process), so it is kept per (model id, etag) and request bytes.

Why here and why bytes: this is the transport side (the servicer's), so the domain never sees
protobuf, and the store only keeps bytes it does not read. Bytes are immutable, so no caller can
change a cached message. Correctness comes from the key (see `version_cache`): every write gives
a model a new etag, so a newer version misses and replaces the entry, and a deleted model is
never read again.

Stored encodings: the catalog opens its store with `ProtobufModelEncoder`, so the store writes
each model version's serialized message in the same transaction as the model and hands it out
with the record (`ModelRecord.encoded`). A record that carries one is served as it is: reading a
model the cache never saw converts nothing (the cache alone helped only the models read before;
a random GetModel over 100,000 models missed it 96% of the time and paid the parse and the
conversion, 0.3 to 0.4 ms of its 1.5 ms over gRPC). The encoder's name carries a fingerprint of
the Model message's protos and of this converter's code, so bytes written by another build are
never served: the store ignores them and the catalog's backfill rewrites them.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.descriptor import FileDescriptor

from rbee.catalog.v1 import catalog_pb2 as pb
from services.catalog import convert
from services.catalog.domain import Model
from services.catalog.store import ModelRecord
from services.catalog.version_cache import DEFAULT_MAX_ENTRIES, ModelVersionCache
from services.common.info import UNKNOWN_VERSION, project_version

# A serialized Model of a realistic catalog entry is 1 to 2 kB: 4,096 entries hold about 8 MB,
# enough for every model of a typical hive and for the pages a busy client walks again.
DEFAULT_MESSAGE_CACHE_ENTRIES = DEFAULT_MAX_ENTRIES

# The wire tag of ListModelsResponse.models (field number, length-delimited wire type 2).
_MODELS_TAG = bytes([pb.ListModelsResponse.DESCRIPTOR.fields_by_name["models"].number << 3 | 2])

# A Model framed as a ListModelsResponse `models` field, and where the message starts in it.
_Framed = tuple[bytes, int]


class ModelMessageCache:
    """Serialized Model messages per model version, at most `max_entries` models (LRU).

    Each version is kept framed as a ListModelsResponse `models` field (tag, length, message):
    a page is then one join of cached bytes, and GetModel's bare message is the bytes after
    the frame's header.
    """

    def __init__(self, max_entries: int = DEFAULT_MESSAGE_CACHE_ENTRIES) -> None:
        self._wire: ModelVersionCache[_Framed] = ModelVersionCache(max_entries)

    @property
    def versions(self) -> ModelVersionCache[_Framed]:
        """The underlying cache (size, bound, hit and miss counts)."""
        return self._wire

    def serialized(self, record: ModelRecord) -> bytes:
        """The serialized Model message of this stored version: the stored encoding when the
        record carries one, else built on the first ask and cached."""
        if record.encoded is not None:
            return record.encoded
        framed, header = self._wire.get_or_compute(record.id, record.etag, lambda: _framed(record))
        return framed[header:]

    def to_pb(self, record: ModelRecord) -> pb.Model:
        """A new Model message for this stored version (the caller owns it)."""
        return pb.Model.FromString(self.serialized(record))

    def list_response_wire(
        self, records: Sequence[ModelRecord], *, next_page_token: str, total_size: int
    ) -> bytes:
        """The serialized ListModelsResponse holding one Model per record, in order: the
        cached `models` frames, then the page token and total (a protobuf message's encoding
        may be concatenated from its fields' encodings)."""
        parts = [framed for framed, _ in self._framed_many(records)]
        parts.append(
            pb.ListModelsResponse(
                next_page_token=next_page_token, total_size=total_size
            ).SerializeToString()
        )
        return b"".join(parts)

    def _framed_many(self, records: Sequence[ModelRecord]) -> list[_Framed]:
        """Each record framed: its stored encoding, else the cached or newly built frame."""
        framed = [_frame(r.encoded) if r.encoded is not None else None for r in records]
        missing = [index for index, frame in enumerate(framed) if frame is None]
        if missing:
            cached = self._wire.get_many([(records[i].id, records[i].etag) for i in missing])
            for index, hit in zip(missing, cached, strict=True):
                if hit is not None:
                    framed[index] = hit
                    continue
                record = records[index]
                built = framed[index] = _framed(record)
                self._wire.put(record.id, record.etag, built)
        return framed  # type: ignore[return-value]  # every None was replaced

    def list_response(
        self, records: Sequence[ModelRecord], *, next_page_token: str, total_size: int
    ) -> pb.ListModelsResponse:
        """`list_response_wire` as a message (parsed in ONE upb call)."""
        return pb.ListModelsResponse.FromString(
            self.list_response_wire(records, next_page_token=next_page_token, total_size=total_size)
        )

    def discard(self, model_id: str) -> None:
        """Drop the model's cached message (after the servicer changed or deleted it); only
        frees memory early, the etag key already keeps answers right."""
        self._wire.discard(model_id)


# Distinct requests kept per model version: clients ask with few option sets (defaults, a
# device, a context length), and the bound keeps a client that varies them from growing it.
DEFAULT_COMPAT_REQUESTS_PER_MODEL = 8
# Models kept: a response for six worker types is 1 to 2 kB, so at most ~16 MB in all.
DEFAULT_COMPAT_MODELS = 1024


class CompatibilityResponseCache:
    """Serialized EvaluateCompatibilityResponse per (model id, etag) and request bytes.

    Correct only while evaluation depends on nothing but the stored model version and the
    request (today: its metadata and state, the request's options and the process's fixed
    worker types); the caller also checks that the version did not change while it evaluated.
    Thread-safe (one lock around each operation).
    """

    def __init__(
        self,
        max_models: int = DEFAULT_COMPAT_MODELS,
        requests_per_model: int = DEFAULT_COMPAT_REQUESTS_PER_MODEL,
    ) -> None:
        if requests_per_model < 1:
            raise ValueError(f"requests_per_model must be at least 1, got {requests_per_model}")
        self._versions: ModelVersionCache[dict[bytes, bytes]] = ModelVersionCache(max_models)
        self._per_model = requests_per_model
        self._lock = threading.Lock()  # around each model's dict of responses

    @property
    def versions(self) -> ModelVersionCache[dict[bytes, bytes]]:
        """The underlying cache (one entry per model; size, bound, hit and miss counts)."""
        return self._versions

    def get(self, record: ModelRecord, request_key: bytes) -> bytes | None:
        """The cached response for this version and request, or None."""
        responses = self._versions.get(record.id, record.etag)
        if responses is None:
            return None
        with self._lock:
            return responses.get(request_key)

    def put(self, record: ModelRecord, request_key: bytes, wire: bytes) -> None:
        """Remember the response for this version and request (oldest request dropped past
        the per-model bound)."""
        with self._lock:
            responses = self._versions.get(record.id, record.etag)
            if responses is None:
                responses = {}
                self._versions.put(record.id, record.etag, responses)
            responses[request_key] = wire
            while len(responses) > self._per_model:
                del responses[next(iter(responses))]

    def discard(self, model_id: str) -> None:
        """Drop the model's cached responses (after a write; frees memory early)."""
        self._versions.discard(model_id)


def encoding_fingerprint(files: Sequence[FileDescriptor], sources: Sequence[Path]) -> str:
    """A short digest of the proto files `files` (with every file they import, recursively)
    and of the code in `sources`: what decides the bytes an encoder makes. A source that
    cannot be read (an install without .py files) counts as this distribution's version."""
    found: dict[str, FileDescriptor] = {}
    pending = list(files)
    while pending:
        file = pending.pop()
        if file.name not in found:
            found[file.name] = file
            pending.extend(file.dependencies)
    digest = hashlib.sha256()
    for name in sorted(found):
        digest.update(name.encode("utf-8"))
        digest.update(found[name].serialized_pb)
    for source in sources:
        try:
            digest.update(source.read_bytes())
        except OSError:
            digest.update(_unreadable_source_tag().encode("utf-8"))
    return digest.hexdigest()[:16]


def _unreadable_source_tag() -> str:
    """This install's version, or (with no version either) a tag of this process alone: then
    nothing another process stored is ever served."""
    version = project_version()
    return version if version != UNKNOWN_VERSION else secrets.token_hex(16)


# The stored encodings' tag: another build of the protos or of the converter writes (and
# serves) its own.
MODEL_ENCODING = "rbee.catalog.v1.Model/" + encoding_fingerprint(
    [pb.Model.DESCRIPTOR.file], [Path(convert.__file__), Path(__file__)]
)


class ProtobufModelEncoder:
    """The encoding the catalog's store keeps per model version: the serialized
    rbee.catalog.v1.Model, exactly what `convert.model_to_pb` makes of the stored model."""

    name = MODEL_ENCODING

    def encode(self, model: Model) -> bytes:
        """The serialized Model message of `model`."""
        return convert.model_to_pb(model).SerializeToString()


def _framed(record: ModelRecord) -> _Framed:
    return _frame(convert.model_to_pb(record.model()).SerializeToString())


def _frame(wire: bytes) -> _Framed:
    """`wire` framed as a ListModelsResponse `models` field, and where the message starts."""
    header = _MODELS_TAG + _varint(len(wire))
    return header + wire, len(header)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (a length prefix)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
