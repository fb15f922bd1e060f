"""rbee.catalog.v1.Model messages built once per stored model version, for GetModel/ListModels.

Building a Model message costs about 40 us of Python (`convert.model_to_pb`, one setattr per
field) on top of about 50 us for the JSON parse into the pydantic Model; a ListModels page of 50
paid both for every row, about 4 ms of CPU. Here each version (model id, etag) is converted
once and kept as its serialized bytes; a hit costs one `MergeFromString` in upb's C code
(about 7 us) and no parse at all.

Why here and why bytes: this is the transport side (the servicer's), so the domain and the store
never see protobuf; the store only hands out unparsed `ModelRecord`s through a narrow method.
The cache lives in memory, never in the database, so an encoding from an older build of the
protos cannot outlive a restart. Bytes are immutable, so no caller can change a cached message.
Correctness comes from the key (see `version_cache`): every write gives a model a new etag, so a
newer version misses and replaces the entry, and a deleted model is never read again.
"""

from __future__ import annotations

from collections.abc import Sequence

from rbee.catalog.v1 import catalog_pb2 as pb
from services.catalog import convert
from services.catalog.store import ModelRecord
from services.catalog.version_cache import DEFAULT_MAX_ENTRIES, ModelVersionCache

# A serialized Model of a realistic catalog entry is 1 to 2 kB: 4,096 entries hold about 8 MB,
# enough for every model of a typical hive and for the pages a busy client walks again.
DEFAULT_MESSAGE_CACHE_ENTRIES = DEFAULT_MAX_ENTRIES

# The wire tag of ListModelsResponse.models (field number, length-delimited wire type 2).
_MODELS_TAG = bytes([pb.ListModelsResponse.DESCRIPTOR.fields_by_name["models"].number << 3 | 2])


class ModelMessageCache:
    """Serialized Model messages per model version, at most `max_entries` models (LRU)."""

    def __init__(self, max_entries: int = DEFAULT_MESSAGE_CACHE_ENTRIES) -> None:
        self._wire: ModelVersionCache[bytes] = ModelVersionCache(max_entries)

    @property
    def versions(self) -> ModelVersionCache[bytes]:
        """The underlying cache (size, bound, hit and miss counts)."""
        return self._wire

    def serialized(self, record: ModelRecord) -> bytes:
        """The serialized Model message of this stored version, built on the first ask."""
        return self._wire.get_or_compute(record.id, record.etag, lambda: _serialize(record))

    def serialized_many(self, records: Sequence[ModelRecord]) -> list[bytes]:
        """`serialized` for each record, in order (one cache lookup for the whole page)."""
        found = self._wire.get_many([(record.id, record.etag) for record in records])
        wire: list[bytes] = []
        for record, cached in zip(records, found, strict=True):
            if cached is not None:
                wire.append(cached)
                continue
            built = _serialize(record)
            self._wire.put(record.id, record.etag, built)
            wire.append(built)
        return wire

    def to_pb(self, record: ModelRecord) -> pb.Model:
        """A new Model message for this stored version (the caller owns it)."""
        return pb.Model.FromString(self.serialized(record))

    def list_response(
        self, records: Sequence[ModelRecord], *, next_page_token: str, total_size: int
    ) -> pb.ListModelsResponse:
        """A ListModelsResponse holding one Model per record, in order. The page is parsed in
        ONE upb call from the cached bytes, each framed as a `models` field (tag, length):
        fifty `models.add().MergeFromString` calls cost about twice as much."""
        response = pb.ListModelsResponse(next_page_token=next_page_token, total_size=total_size)
        frames = [_MODELS_TAG + _varint(len(wire)) + wire for wire in self.serialized_many(records)]
        response.MergeFromString(b"".join(frames))
        return response

    def discard(self, model_id: str) -> None:
        """Drop the model's cached message (after the servicer changed or deleted it); only
        frees memory early, the etag key already keeps answers right."""
        self._wire.discard(model_id)


def _serialize(record: ModelRecord) -> bytes:
    return convert.model_to_pb(record.model()).SerializeToString()


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (a length prefix)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
