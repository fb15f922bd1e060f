"""The catalog's serialized-message caches without a server: the ListModels page encoding built
from cached frames, and the bounds of the EvaluateCompatibility response cache."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from rbee.catalog.v1 import catalog_pb2 as pb
from services.catalog import convert
from services.catalog.domain import Model, ModelSource, ModelState, SourceKind
from services.catalog.message_cache import (
    MODEL_ENCODING,
    CompatibilityResponseCache,
    ModelMessageCache,
    ProtobufModelEncoder,
    encoding_fingerprint,
)
from services.catalog.store import ModelRecord
from services.common.info import UNKNOWN_VERSION, project_version

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def record(model_id: str, etag: str, *, size: int = 1) -> ModelRecord:
    model = Model(
        id=model_id,
        name=f"models/{model_id}",
        source=ModelSource(kind=SourceKind.URL, url=f"https://example.invalid/{model_id}"),
        display_name=model_id * size,  # long names make frames with multi-byte lengths
        state=ModelState.READY,
        created_at=NOW,
        updated_at=NOW,
        etag=etag,
    )
    return ModelRecord(model_id, etag, model.model_dump_json())


def test_a_page_from_cached_frames_is_the_message_convert_builds() -> None:
    cache = ModelMessageCache()
    records = [record("a", "1"), record("b", "1", size=200), record("c", "1", size=5000)]
    expected = pb.ListModelsResponse(
        models=[convert.model_to_pb(r.model()) for r in records],
        next_page_token="tok",
        total_size=7,
    )

    for _ in range(2):  # built, then from the cache
        wire = cache.list_response_wire(records, next_page_token="tok", total_size=7)
        assert pb.ListModelsResponse.FromString(wire) == expected
        assert cache.list_response(records, next_page_token="tok", total_size=7) == expected
        for r in records:
            assert pb.Model.FromString(cache.serialized(r)) == convert.model_to_pb(r.model())
    assert cache.versions.hits >= len(records)
    empty = pb.ListModelsResponse.FromString(
        cache.list_response_wire([], next_page_token="", total_size=0)
    )
    assert empty == pb.ListModelsResponse()


def test_a_new_version_replaces_the_cached_frame() -> None:
    cache = ModelMessageCache()
    old, new = record("a", "1"), record("a", "2", size=3)
    assert pb.Model.FromString(cache.serialized(old)).etag == "1"
    assert pb.Model.FromString(cache.serialized(new)).display_name == "aaa"
    assert len(cache.versions) == 1


def test_compatibility_cache_keys_by_version_and_request_and_is_bounded() -> None:
    cache = CompatibilityResponseCache(max_models=2, requests_per_model=2)
    v1, v2 = record("a", "1"), record("a", "2")

    cache.put(v1, b"req-1", b"answer-1")
    assert cache.get(v1, b"req-1") == b"answer-1"
    assert cache.get(v1, b"req-2") is None
    assert cache.get(v2, b"req-1") is None  # another version of the model

    cache.put(v1, b"req-2", b"answer-2")
    cache.put(v1, b"req-3", b"answer-3")  # past the per-model bound: the oldest goes
    assert [cache.get(v1, key) for key in (b"req-1", b"req-2", b"req-3")] == [
        None,
        b"answer-2",
        b"answer-3",
    ]

    cache.put(record("b", "1"), b"req-1", b"b")
    cache.put(record("c", "1"), b"req-1", b"c")  # past the model bound: "a" (LRU) goes
    assert len(cache.versions) == 2
    assert cache.get(v1, b"req-2") is None

    cache.discard("c")
    assert cache.get(record("c", "1"), b"req-1") is None
    with pytest.raises(ValueError):
        CompatibilityResponseCache(requests_per_model=0)


def encoded(r: ModelRecord) -> ModelRecord:
    """`r` as a store with the catalog's encoder hands it out."""
    return ModelRecord(r.id, r.etag, r.data, ProtobufModelEncoder().encode(r.model()))


def test_the_encoder_writes_what_convert_builds() -> None:
    encoder = ProtobufModelEncoder()
    model = record("a", "1", size=300).model()
    assert encoder.encode(model) == convert.model_to_pb(model).SerializeToString()
    assert encoder.name == MODEL_ENCODING
    assert MODEL_ENCODING.startswith("rbee.catalog.v1.Model/")


def test_stored_encodings_are_served_as_they_are_and_never_cached() -> None:
    cache = ModelMessageCache()
    plain = [record("a", "1"), record("b", "1", size=200), record("c", "1", size=5000)]
    stored = [encoded(r) for r in plain]
    reference = ModelMessageCache().list_response_wire(plain, next_page_token="t", total_size=3)

    # A page all of stored encodings, and one mixing them with records converted here.
    mixed = [stored[0], plain[1], stored[2]]
    for page in (stored, mixed):
        assert cache.list_response_wire(page, next_page_token="t", total_size=3) == reference
    for r in stored:
        assert cache.serialized(r) is r.encoded
    assert len(cache.versions) == 1  # only b, the one record without its encoding


def test_the_encoding_name_follows_the_protos_and_the_code(tmp_path: Path) -> None:
    source = tmp_path / "convert.py"
    source.write_text("def model_to_pb(model): ...\n")
    files = [pb.Model.DESCRIPTOR.file]
    first = encoding_fingerprint(files, [source])
    assert encoding_fingerprint(files, [source]) == first
    source.write_text("def model_to_pb(model): return None\n")
    assert encoding_fingerprint(files, [source]) != first
    # Other protos, another name.
    assert encoding_fingerprint([Timestamp.DESCRIPTOR.file], [source]) != first
    # A source that cannot be read counts as this install's version: stable across
    # processes of one install; without a version, a name of this process alone.
    missing = tmp_path / "gone.py"
    if project_version() != UNKNOWN_VERSION:
        assert encoding_fingerprint(files, [missing]) == encoding_fingerprint(files, [missing])
    else:
        assert encoding_fingerprint(files, [missing]) != encoding_fingerprint(files, [missing])
