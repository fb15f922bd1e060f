"""The encodings a store keeps beside each model version (CatalogStore with a ModelEncoder).

The store never reads them, so an encoder that writes a tagged copy of the model's JSON is
enough to check which version's bytes are kept and served.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.catalog.domain import Model
from services.catalog.filtering import parse_model_filter
from services.catalog.store import SCHEMA_VERSION, CatalogStore
from tests.unit.test_store import _catalog, _full_model, _model

pytestmark = pytest.mark.unit


class TaggingEncoder:
    """Bytes that name the encoder and the exact version they were made of."""

    def __init__(self, name: str = "test/1", *, fail_on: str = "") -> None:
        self.name = name
        self.calls = 0
        self._fail_on = fail_on

    def encode(self, model: Model) -> bytes:
        self.calls += 1
        if model.id == self._fail_on:
            raise RuntimeError(f"cannot encode {model.id}")
        return f"{self.name}|{model.id}|{model.etag}".encode()


def expected(encoder: TaggingEncoder, model: Model) -> bytes:
    return f"{encoder.name}|{model.id}|{model.etag}".encode()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.db"


@pytest.fixture
def encoder() -> TaggingEncoder:
    return TaggingEncoder()


@pytest.fixture
def store(db_path: Path, encoder: TaggingEncoder) -> Iterator[CatalogStore]:
    with CatalogStore.open(db_path, encoder=encoder) as opened:
        yield opened


def encoding_rows(db_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT model_id, encoding, etag FROM model_encodings ORDER BY model_id"
        ).fetchall()
    return [tuple(row) for row in rows]


def test_every_write_keeps_the_encoding_of_the_version_it_wrote(
    store: CatalogStore, encoder: TaggingEncoder, db_path: Path
) -> None:
    created = store.create_model(_full_model())
    record = store.get_model_record(created.id)
    assert record.encoded == expected(encoder, created)
    # The encoder saw the model as stored (its etag, its times), nothing else.
    assert record.model() == created

    updated = store.update_model(created.model_copy(update={"display_name": "renamed"}))
    record = store.get_model_record(created.id)
    assert record.etag == updated.etag != created.etag
    assert record.encoded == expected(encoder, updated)
    assert encoding_rows(db_path) == [(created.id, "test/1", updated.etag)]

    store.delete_model(created.id)
    assert encoding_rows(db_path) == []


def test_create_models_encodes_all_or_nothing(db_path: Path) -> None:
    failing = TaggingEncoder(fail_on="b001")
    with CatalogStore.open(db_path, encoder=failing) as store:
        with pytest.raises(RuntimeError, match="cannot encode b001"):
            store.create_models([_model("a000"), _model("b001"), _model("a002")])
        assert store.list_model_records()[0] == []
        assert encoding_rows(db_path) == []

        created = store.create_models([_model("a000"), _model("a002")])
        assert [store.get_model_record(m.id).encoded for m in created] == [
            expected(failing, m) for m in created
        ]


@pytest.mark.parametrize("text", ["", "state=ready", "labels.team=ml AND format=gguf"])
def test_listed_records_carry_their_encodings_and_the_same_pages(
    db_path: Path, text: str, encoder: TaggingEncoder
) -> None:
    with CatalogStore.open(db_path, encoder=encoder) as store:
        models = {m.id: m for m in _catalog(store)}
    flt = parse_model_filter(text)
    with CatalogStore.open(db_path) as plain, CatalogStore.open(db_path, encoder=encoder) as store:
        token, plain_token, pages = "", "", 0
        while True:
            records, token = store.list_model_records(flt, page_size=7, page_token=token)
            plain_records, plain_token = plain.list_model_records(
                flt, page_size=7, page_token=plain_token
            )
            # The join changes nothing but the encodings: same rows, order and tokens.
            assert [(r.id, r.etag, r.data) for r in records] == [
                (r.id, r.etag, r.data) for r in plain_records
            ]
            assert token == plain_token
            assert all(r.encoded is None for r in plain_records)
            want = [expected(encoder, models[r.id]) for r in records]
            assert [r.encoded for r in records] == want
            pages += 1
            if not token:
                break
    assert pages > 1


def test_an_encoding_of_another_version_or_encoder_is_never_served(
    db_path: Path, encoder: TaggingEncoder
) -> None:
    with CatalogStore.open(db_path, encoder=encoder) as store:
        first = store.create_model(_model("a1"))
        store.create_model(_model("a2"))
    # Written by a store without the encoder: a1's stored encoding is of the old version.
    with CatalogStore.open(db_path) as plain:
        second = plain.update_model(first.model_copy(update={"display_name": "renamed"}))
        assert plain.get_model_record("a1").encoded is None
    with CatalogStore.open(db_path, encoder=encoder) as store:
        assert store.get_model_record("a1").encoded is None
        assert store.get_model_record("a2").encoded is not None
    # Another build's encoder (another name) serves none of them.
    other = TaggingEncoder("test/2")
    with CatalogStore.open(db_path, encoder=other) as store:
        assert store.get_model_record("a2").encoded is None
        assert [r.encoded for r in store.list_model_records()[0]] == [None, None]
        # Its backfill replaces them: every model gets its current version's encoding.
        assert store.backfill_encodings(100) == (2, "")
        assert store.backfill_encodings(100) == (0, "")
        assert store.get_model_record("a1").encoded == expected(other, second)
    assert {(row[0], row[1]) for row in encoding_rows(db_path)} == {
        ("a1", "test/2"),
        ("a2", "test/2"),
    }


def test_backfill_works_in_bounded_batches(db_path: Path, encoder: TaggingEncoder) -> None:
    with CatalogStore.open(db_path) as plain:
        created = plain.create_models([_model(f"a{index:03d}") for index in range(25)])
    with CatalogStore.open(db_path, encoder=encoder) as store:
        assert encoder.calls == 0  # opening encodes nothing
        assert store.backfill_encodings(10) == (10, "a009")
        assert store.backfill_encodings(10, "a009") == (10, "a019")
        assert store.backfill_encodings(10, "a019") == (5, "")
        assert encoder.calls == 25
        assert store.backfill_encodings(10) == (0, "")
        assert [store.get_model_record(m.id).encoded for m in created] == [
            expected(encoder, m) for m in created
        ]
        assert store.backfill_encodings(0) == (0, "")
    with CatalogStore.open(db_path) as plain:
        assert plain.backfill_encodings(10) == (0, "")  # nothing to encode with


def test_a_version_1_database_is_migrated_and_keeps_its_models(
    db_path: Path, encoder: TaggingEncoder
) -> None:
    with CatalogStore.open(db_path) as plain:
        created = plain.create_model(_full_model())
    # What rbee before schema version 2 left on disk.
    with sqlite3.connect(db_path) as connection:
        connection.execute("DROP TABLE model_encodings")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with CatalogStore.open(db_path, encoder=encoder) as store:
        record = store.get_model_record(created.id)
        assert record.model() == created
        assert record.encoded is None
        assert store.backfill_encodings(10) == (1, "")
        assert store.get_model_record(created.id).encoded == expected(encoder, created)
    with sqlite3.connect(db_path) as connection:
        version = connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()[0]
    assert int(version) == SCHEMA_VERSION == 2
