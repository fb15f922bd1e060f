"""The catalog store over a real SQLite file in a temporary directory."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.catalog.domain import (
    Install,
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
    SplitInfo,
    WeightsBreakdown,
)
from services.catalog.filtering import ModelFilter, parse_model_filter
from services.catalog.store import SCHEMA_VERSION, CatalogStore, model_filter_to_sql
from services.common.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

pytestmark = pytest.mark.unit

_CREATED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def _model(
    model_id: str,
    *,
    fmt: ModelFormat | None = ModelFormat.GGUF,
    model_type: ModelType = ModelType.LLM,
    architecture: str | None = "llama",
    family: str | None = None,
    quantization: str | None = "Q4_K_M",
    state: ModelState = ModelState.READY,
    kind: SourceKind = SourceKind.HUGGINGFACE,
    labels: dict[str, str] | None = None,
    paths: list[str] | None = None,
) -> Model:
    metadata = (
        None
        if fmt is None
        else ModelMetadata(
            format=fmt,
            model_type=model_type,
            architecture=architecture,
            family=family,
            quantization=quantization,
        )
    )
    return Model(
        id=model_id,
        source=ModelSource(kind=kind, repo=f"org/{model_id}", files=[f"{model_id}.gguf"]),
        paths=paths if paths is not None else [f"/models/{model_id}.gguf"],
        state=state,
        metadata=metadata,
        labels=labels or {},
        created_at=_CREATED,
        updated_at=_CREATED,
    )


def _full_model() -> Model:
    metadata = ModelMetadata(
        format=ModelFormat.GGUF,
        model_type=ModelType.LLM,
        name="Llama 2 7B",
        architecture="llama",
        family=None,
        variant="chat",
        quantization="Q4_K_M",
        file_type=15,
        parameter_count=6_738_415_616,
        context_length=4096,
        block_count=32,
        embedding_length=4096,
        feed_forward_length=11008,
        head_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        expert_count=8,
        expert_used_count=2,
        vocab_size=32000,
        sliding_window=4096,
        tokenizer_model="llama",
        has_chat_template=True,
        kv_cache_bytes_per_token=524288,
        needs_components=["vae"],
        dtypes={"q4_K": 193, "f32": 65},
        tensor_count=291,
        split=SplitInfo(index=1, count=2, files_found=2, tensors_total=291),
        weights=WeightsBreakdown(
            total_bytes=4_000_000,
            input_bytes=10,
            output_bytes=20,
            other_bytes=30,
            layer_bytes=[1, 2],
        ),
        size_bytes=4_081_004_224,
        hints={"modelspec.title": "Llama — ünïcode ✓"},
        warnings=["split GGUF: 1 of 2 shards"],
    )
    return Model(
        id="llama-2-7b-chat-q4-k-m-0a1b2c3d",
        display_name="Llama 2 7B Chat",
        source=ModelSource(
            kind=SourceKind.HUGGINGFACE,
            repo="TheBloke/Llama-2-7B-Chat-GGUF",
            revision="main",
            commit="a" * 40,
            files=["llama-2-7b-chat.Q4_K_M-00001-of-00002.gguf"],
        ),
        paths=["/hf/blobs/x", "/hf/blobs/y"],
        size_bytes=4_081_004_224,
        sha256="b" * 64,
        state=ModelState.READY,
        state_message="",
        metadata=metadata,
        labels={"team": "ml", "app.kubernetes.io/name": "chat"},
        created_at=_CREATED,
        updated_at=_CREATED,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "catalog.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[CatalogStore]:
    opened = CatalogStore.open(db_path)
    try:
        yield opened
    finally:
        opened.close()


# --- open, schema, durability settings ----------------------------------------------------


def test_open_creates_the_file_with_wal_and_schema_version(
    store: CatalogStore, db_path: Path
) -> None:
    assert db_path.is_file()
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = other.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
    other.close()


def test_reopening_is_idempotent_and_keeps_data_and_tokens(db_path: Path) -> None:
    first = CatalogStore.open(db_path)
    for index in range(5):
        first.create_model(_model(f"m-{index}"))
    _, token = first.list_models(page_size=2)
    first.close()
    first.close()  # closing twice is harmless
    second = CatalogStore.open(db_path)
    try:
        assert second.get_model("m-3").id == "m-3"
        # The signing secret is persisted, so a token survives a restart.
        page, _ = second.list_models(page_size=2, page_token=token)
        assert [model.id for model in page] == ["m-2", "m-3"]
    finally:
        second.close()


def test_closed_store_raises_unavailable(store: CatalogStore) -> None:
    store.close()
    with pytest.raises(Unavailable):
        store.get_model("m-1")


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    CatalogStore.open(db_path).close()
    with sqlite3.connect(db_path) as other:
        other.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    other.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        CatalogStore.open(db_path)


def test_a_file_that_is_not_a_database_is_data_loss(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not an sqlite database, just some bytes" * 100)
    with pytest.raises(DataLoss, match="damaged"):
        CatalogStore.open(path)


# --- models: CRUD -------------------------------------------------------------------------


def test_full_model_round_trips_through_json(store: CatalogStore) -> None:
    original = _full_model()
    stored = store.create_model(original)
    loaded = store.get_model(original.id)
    assert loaded == stored
    assert loaded.model_dump(exclude={"updated_at", "etag"}) == original.model_dump(
        exclude={"updated_at", "etag"}
    )
    assert loaded.metadata is not None
    assert loaded.metadata.split == SplitInfo(index=1, count=2, files_found=2, tensors_total=291)
    assert loaded.metadata.hints["modelspec.title"] == "Llama — ünïcode ✓"


def test_create_sets_etag_and_utc_updated_at(store: CatalogStore) -> None:
    before = datetime.now(UTC)
    naive = _model("m-1").model_copy(update={"created_at": datetime(2024, 1, 1, 12)})
    stored = store.create_model(naive)
    assert stored.etag
    assert stored.updated_at.tzinfo is not None
    assert stored.updated_at.utcoffset() == timedelta(0)
    assert stored.updated_at >= before
    assert stored.created_at == datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert store.get_model("m-1").created_at == datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_create_twice_is_already_exists(store: CatalogStore) -> None:
    store.create_model(_model("m-1"))
    with pytest.raises(AlreadyExists) as caught:
        store.create_model(_model("m-1", fmt=ModelFormat.SAFETENSORS))
    error = caught.value
    assert error.reason == "MODEL_ALREADY_EXISTS"
    assert error.resource_type == "model"
    assert error.resource_name == "models/m-1"
    # The failed create changed nothing.
    loaded = store.get_model("m-1")
    assert loaded.metadata is not None
    assert loaded.metadata.format is ModelFormat.GGUF


def test_create_with_an_invalid_id_is_refused(store: CatalogStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.create_model(_model("m-1").model_copy(update={"id": "../etc"}))
    assert caught.value.reason == "INVALID_NAME"
    assert caught.value.field_violations[0].field == "model_id"


def test_create_models_is_one_all_or_nothing_transaction(store: CatalogStore) -> None:
    created = store.create_models([_model("m-1", labels={"k": "v"}), _model("m-2")])
    assert [m.id for m in created] == ["m-1", "m-2"]
    assert store.get_model("m-1") == created[0]
    assert store.count_models(parse_model_filter("labels.k=v")) == 1
    with pytest.raises(AlreadyExists):
        store.create_models([_model("m-3"), _model("m-1")])
    # The batch failed as a whole: m-3 was not kept.
    assert store.count_models() == 2


def test_get_missing_is_not_found(store: CatalogStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.get_model("nope")
    error = caught.value
    assert error.reason == "MODEL_NOT_FOUND"
    assert error.resource_type == "model"
    assert error.resource_name == "models/nope"


def test_update_replaces_and_refreshes_etag(store: CatalogStore) -> None:
    created = store.create_model(_model("m-1", labels={"a": "1"}, paths=["/old.gguf"]))
    changed = created.model_copy(
        update={
            "state": ModelState.FAILED,
            "state_message": "sha256 mismatch",
            "labels": {"b": "2"},
            "paths": ["/new.gguf"],
            "created_at": datetime(2000, 1, 1, tzinfo=UTC),  # ignored: the store keeps it
        }
    )
    updated = store.update_model(changed, expected_etag=created.etag)
    assert updated.etag != created.etag
    assert updated.updated_at >= created.updated_at
    assert updated.created_at == created.created_at
    loaded = store.get_model("m-1")
    assert loaded == updated
    assert loaded.state is ModelState.FAILED
    assert store.find_models_by_path("/old.gguf") == []
    assert [m.id for m in store.find_models_by_path("/new.gguf")] == ["m-1"]
    assert store.count_models(parse_model_filter("labels.a=1")) == 0
    assert store.count_models(parse_model_filter("labels.b=2")) == 1
    assert store.count_models(parse_model_filter("state=failed")) == 1
    # Without an expected etag the write is unconditional, and still gets a fresh etag.
    again = store.update_model(loaded)
    assert again.etag not in {created.etag, updated.etag}


def test_update_with_a_stale_etag_is_aborted(store: CatalogStore) -> None:
    created = store.create_model(_model("m-1"))
    store.update_model(created.model_copy(update={"display_name": "first writer"}))
    with pytest.raises(Aborted) as caught:
        store.update_model(
            created.model_copy(update={"display_name": "second writer"}),
            expected_etag=created.etag,
        )
    assert caught.value.reason == "ETAG_MISMATCH"
    assert store.get_model("m-1").display_name == "first writer"


def test_update_missing_is_not_found(store: CatalogStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.update_model(_model("ghost"))
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_delete_returns_the_model_and_removes_labels_and_paths(store: CatalogStore) -> None:
    stored = store.create_model(_model("m-1", labels={"k": "v"}, paths=["/a", "/b"]))
    assert store.delete_model("m-1") == stored
    with pytest.raises(NotFound):
        store.get_model("m-1")
    with pytest.raises(NotFound) as caught:
        store.delete_model("m-1")
    assert caught.value.resource_name == "models/m-1"
    assert store.find_models_by_path("/a") == []
    assert store.count_models(parse_model_filter("labels.k=v")) == 0
    # The id can be used again, and its old labels do not come back.
    store.create_model(_model("m-1"))
    assert store.count_models(parse_model_filter("labels.k=v")) == 0


def test_find_by_path_and_by_source(store: CatalogStore) -> None:
    first = store.create_model(_model("m-1", paths=["/shared.gguf", "/m1.gguf", "/m1.gguf"]))
    store.create_model(_model("m-2", paths=["/shared.gguf"]))
    assert [m.id for m in store.find_models_by_path("/shared.gguf")] == ["m-1", "m-2"]
    assert [m.id for m in store.find_models_by_path("/m1.gguf")] == ["m-1"]
    assert store.find_models_by_path("/m1") == []
    assert store.find_model_by_source(first.source.canonical()) == first
    assert store.find_model_by_source(ModelSource(kind=SourceKind.LOCAL).canonical()) is None


def test_writes_from_several_threads_are_serialised(store: CatalogStore) -> None:
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for index in range(20):
                created = store.create_model(_model(f"{prefix}-{index}"))
                store.update_model(created, expected_etag=created.etag)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert store.count_models() == 80


# --- list, filters, pagination ------------------------------------------------------------


def _catalog(store: CatalogStore) -> list[Model]:
    """A varied catalog: every filter field takes several values, some models have none."""
    formats = [ModelFormat.GGUF, ModelFormat.SAFETENSORS, ModelFormat.DIFFUSERS, None]
    families = [None, "sdxl", "SD1", "flux-dev", ""]
    quantizations = ["Q4_K_M", "q8_0", None]
    kinds = list(SourceKind)
    states = list(ModelState)
    types = [ModelType.LLM, ModelType.IMAGE, ModelType.LORA]
    models = []
    for index in range(60):
        models.append(
            _model(
                f"{'ab'[index % 2]}{index:03d}",
                fmt=formats[index % 4],
                model_type=types[index % 3],
                architecture=["llama", "Qwen2", None][index % 3],
                family=families[index % 5],
                quantization=quantizations[index % 3],
                state=states[index % 3],
                kind=kinds[index % 4],
                labels={
                    "team": ["ml", "ops"][index % 2],
                    **({"tier": "gold"} if index % 7 == 0 else {}),
                },
            )
        )
    return [store.create_model(model) for model in models]


def _meta(model: Model) -> ModelMetadata:
    assert model.metadata is not None
    return model.metadata


# Each filter with an independent, hand-written predicate of what it must select.
_FILTER_CASES: list[tuple[str, Callable[[Model], bool]]] = [
    ("format=gguf", lambda m: m.metadata is not None and _meta(m).format is ModelFormat.GGUF),
    ("format!=gguf", lambda m: m.metadata is None or _meta(m).format is not ModelFormat.GGUF),
    (
        "model_type=image",
        lambda m: m.metadata is not None and _meta(m).model_type is ModelType.IMAGE,
    ),
    ("architecture=qwen2", lambda m: m.metadata is not None and _meta(m).architecture == "Qwen2"),
    ("architecture!=LLAMA", lambda m: m.metadata is None or _meta(m).architecture != "llama"),
    ("family=sd1", lambda m: m.metadata is not None and _meta(m).family == "SD1"),
    ('family=""', lambda m: m.metadata is None or not _meta(m).family),
    ('family!=""', lambda m: m.metadata is not None and bool(_meta(m).family)),
    ("quantization=Q8_0", lambda m: m.metadata is not None and _meta(m).quantization == "q8_0"),
    ("state=failed", lambda m: m.state is ModelState.FAILED),
    ("state!=ready", lambda m: m.state is not ModelState.READY),
    ("source=civitai", lambda m: m.source.kind is SourceKind.CIVITAI),
    ("name=a*", lambda m: m.id.startswith("a")),
    ("name!=models/b0*", lambda m: not m.id.startswith("b0")),
    ("name=models/a010", lambda m: m.id == "a010"),
    ("name!=a010", lambda m: m.id != "a010"),
    ("labels.team=ops", lambda m: m.labels.get("team") == "ops"),
    ("labels.tier!=gold", lambda m: m.labels.get("tier") != "gold"),
    ("labels.nothing=x", lambda m: False),
    ('family="x\' OR 1=1 --"', lambda m: False),
    (
        "format=gguf AND state!=downloading AND labels.team=ml",
        lambda m: (
            m.metadata is not None
            and _meta(m).format is ModelFormat.GGUF
            and m.state is not ModelState.DOWNLOADING
            and m.labels.get("team") == "ml"
        ),
    ),
]


@pytest.mark.parametrize(("text", "predicate"), _FILTER_CASES, ids=[c[0] for c in _FILTER_CASES])
def test_every_filter_field_selects_the_right_models(
    store: CatalogStore, text: str, predicate: Callable[[Model], bool]
) -> None:
    models = _catalog(store)
    flt = parse_model_filter(text)
    expected = sorted(m.id for m in models if predicate(m))
    page, token = store.list_models(flt, page_size=1000)
    assert [m.id for m in page] == expected
    assert token == ""
    assert store.count_models(flt) == len(expected)
    # The in-memory evaluation agrees with the SQL.
    assert sorted(m.id for m in models if flt.matches(m)) == expected


def _collect(
    store: CatalogStore,
    flt: ModelFilter,
    page_size: int,
    between: Callable[[int], None] = lambda _: None,
) -> list[str]:
    seen: list[str] = []
    token = ""
    for page_number in range(1000):
        page, token = store.list_models(flt, page_size=page_size, page_token=token)
        assert len(page) <= page_size
        seen.extend(m.id for m in page)
        if not token:
            return seen
        assert len(page) == page_size  # only the last page may be short
        between(page_number)
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("page_size", [1, 7, 20, 59, 60, 61])
@pytest.mark.parametrize("text", ["", "format=gguf", "labels.team=ml AND state!=failed"])
def test_pages_cover_everything_once_in_order(
    store: CatalogStore, page_size: int, text: str
) -> None:
    models = _catalog(store)
    flt = parse_model_filter(text)
    expected = sorted(m.id for m in models if flt.matches(m))
    assert _collect(store, flt, page_size) == expected


@pytest.mark.parametrize("text", ["", "state=ready", "labels.team=ml AND format=gguf"])
def test_model_records_are_the_listed_models_unparsed(store: CatalogStore, text: str) -> None:
    _catalog(store)
    flt = parse_model_filter(text)
    token, record_token = "", ""
    for _ in range(100):
        models, token = store.list_models(flt, page_size=7, page_token=token)
        records, record_token = store.list_model_records(flt, page_size=7, page_token=record_token)
        # The same page, the same next token (either one continues either listing).
        assert [(r.id, r.etag) for r in records] == [(m.id, m.etag) for m in models]
        assert [r.model() for r in records] == models
        assert record_token == token
        if not token:
            break
    else:
        raise AssertionError("pagination did not end")


def test_model_record_versions_change_with_every_write(store: CatalogStore) -> None:
    created = store.create_model(_model("a1", labels={"team": "ml"}))
    first = store.get_model_record("a1")
    assert (first.id, first.etag) == ("a1", created.etag)
    assert first.model() == store.get_model("a1") == created
    # Each call parses afresh: what a caller changes is its own.
    assert first.model() is not first.model()

    updated = store.update_model(created.model_copy(update={"display_name": "renamed"}))
    second = store.get_model_record("a1")
    assert second.etag == updated.etag != first.etag
    assert second.model().display_name == "renamed"
    [listed] = store.list_model_records(parse_model_filter("labels.team=ml"))[0]
    assert listed == second

    store.delete_model("a1")
    with pytest.raises(NotFound):
        store.get_model_record("a1")
    assert store.list_model_records()[0] == []
    recreated = store.create_model(_model("a1"))
    assert store.get_model_record("a1").etag == recreated.etag not in {first.etag, second.etag}


def test_default_page_size_is_50(store: CatalogStore) -> None:
    _catalog(store)
    page, token = store.list_models(page_size=0)
    assert len(page) == 50
    assert token
    with pytest.raises(InvalidArgument) as caught:
        store.list_models(page_size=-1)
    assert caught.value.reason == "INVALID_ARGUMENT"


def test_pagination_is_stable_when_rows_change_between_pages(store: CatalogStore) -> None:
    models = _catalog(store)
    original = sorted(m.id for m in models)
    inserted: list[str] = []

    def insert_some(page_number: int) -> None:
        # Before the cursor (never served), after it (served later), and a deletion ahead.
        for model_id in (f"0-early-{page_number}", f"zz-late-{page_number}"):
            store.create_model(_model(model_id))
            inserted.append(model_id)
        if page_number == 0:
            store.delete_model("b059")

    seen = _collect(store, ModelFilter(), 9, insert_some)
    assert len(seen) == len(set(seen)), "no duplicates"
    still_there = [model_id for model_id in original if model_id != "b059"]
    assert [model_id for model_id in seen if model_id in original] == still_there, "no gaps"
    assert all(model_id in seen for model_id in inserted if model_id.startswith("zz-"))
    assert not any(model_id.startswith("0-early") for model_id in seen)


def test_tokens_are_bound_to_their_filter_and_store(store: CatalogStore, tmp_path: Path) -> None:
    _catalog(store)
    gguf = parse_model_filter("format=gguf")
    _, token = store.list_models(gguf, page_size=2)
    # The same filter written differently is the same listing.
    same = parse_model_filter("format = GGUF")
    assert store.list_models(same, page_size=2, page_token=token)[0]
    for other_filter in (ModelFilter(), parse_model_filter("format=safetensors")):
        with pytest.raises(InvalidArgument) as caught:
            store.list_models(other_filter, page_size=2, page_token=token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
        assert caught.value.field_violations[0].field == "page_token"
    with pytest.raises(InvalidArgument) as caught:
        store.list_installs(page_token=store.list_models(page_size=1)[1])
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    other_store = CatalogStore.open(tmp_path / "other.db")
    try:
        with pytest.raises(InvalidArgument) as caught:
            other_store.list_models(gguf, page_token=token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
    finally:
        other_store.close()
    for garbage in ("x", token + "x", token[:-2], token.replace(".", "")):
        with pytest.raises(InvalidArgument) as caught:
            store.list_models(gguf, page_token=garbage)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"


def test_filtered_keyset_queries_walk_an_index_without_sorting(
    store: CatalogStore, db_path: Path
) -> None:
    _catalog(store)
    with sqlite3.connect(db_path) as other:
        for text, index in [
            ("format=gguf", "models_format_id"),
            ("state=ready", "models_state_id"),
            ("quantization=q4_k_m", "models_quantization_id"),
            ("family=sdxl", "models_family_id"),
            ("labels.team=ml", "model_labels_key_value"),
            ("labels.team=ml AND state=failed AND labels.tier!=gold", "model_labels_key_value"),
            ("", "sqlite_autoindex_models_1"),
            ("name=a*", "sqlite_autoindex_models_1"),
            ("state!=ready", "sqlite_autoindex_models_1"),
        ]:
            query = model_filter_to_sql(parse_model_filter(text))
            conditions = [*query.conditions, f"{query.key} > ?"]
            sql = (
                f"EXPLAIN QUERY PLAN SELECT m.data FROM {query.source} WHERE "
                + " AND ".join(conditions)
                + f" ORDER BY {query.key} LIMIT 101"
            )
            plan = " | ".join(row[3] for row in other.execute(sql, (*query.params, "a")))
            assert index in plan, (text, plan)
            assert "TEMP B-TREE" not in plan, (text, plan)
            # Filter values are parameters, never SQL text.
            for param in query.params:
                assert f"'{param}'" not in query.source + " ".join(query.conditions)
        get_plan = " ".join(
            row[3]
            for row in other.execute(
                "EXPLAIN QUERY PLAN SELECT data FROM models WHERE id = ?", ("x",)
            )
        )
        assert "USING INDEX sqlite_autoindex_models_1 (id=?)" in get_plan
    other.close()


# --- installs -----------------------------------------------------------------------------


def _install(install_id: str, worker_type: str = "cpu-llm") -> Install:
    return Install(
        id=install_id,
        worker_type=worker_type,
        version="1.0",
        path=f"/installs/{install_id}",
        backend_version="llama-cpp-python 0.3.36",
        labels={"k": "v"},
        created_at=_CREATED,
        updated_at=_CREATED,
    )


def test_install_crud_and_errors(store: CatalogStore) -> None:
    stored = store.create_install(_install("cpu-llm-1"))
    assert store.get_install("cpu-llm-1") == stored
    assert stored.updated_at.tzinfo is not None
    with pytest.raises(AlreadyExists) as exists:
        store.create_install(_install("cpu-llm-1"))
    assert exists.value.reason == "INSTALL_ALREADY_EXISTS"
    assert exists.value.resource_type == "install"
    assert exists.value.resource_name == "installs/cpu-llm-1"
    updated = store.update_install(stored.model_copy(update={"version": "2.0"}))
    assert store.get_install("cpu-llm-1").version == "2.0"
    assert updated.created_at == stored.created_at
    assert store.delete_install("cpu-llm-1") == updated
    for call in (store.get_install, store.delete_install):
        with pytest.raises(NotFound) as missing:
            call("cpu-llm-1")
        assert missing.value.reason == "INSTALL_NOT_FOUND"
        assert missing.value.resource_type == "install"
        assert missing.value.resource_name == "installs/cpu-llm-1"
    with pytest.raises(NotFound):
        store.update_install(_install("ghost"))
    with pytest.raises(InvalidArgument) as invalid:
        store.create_install(_install("Bad_Id"))
    assert invalid.value.field_violations[0].field == "install_id"


def test_install_listing_pages_and_filters_by_worker_type(store: CatalogStore) -> None:
    for index in range(11):
        store.create_install(_install(f"i-{index:02d}", ["cpu-llm", "cuda-sd"][index % 2]))
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_installs(page_size=3, page_token=token)
        seen.extend(install.id for install in page)
        if not token:
            break
    assert seen == [f"i-{index:02d}" for index in range(11)]
    cuda, token = store.list_installs(worker_type="cuda-sd", page_size=100)
    assert [i.id for i in cuda] == [f"i-{index:02d}" for index in range(1, 11, 2)]
    assert token == ""
    _, cpu_token = store.list_installs(worker_type="cpu-llm", page_size=1)
    with pytest.raises(InvalidArgument) as caught:
        store.list_installs(worker_type="cuda-sd", page_token=cpu_token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
