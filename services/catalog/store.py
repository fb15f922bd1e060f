"""The catalog's embedded store: one SQLite database, written only by the catalog process.

Durability: WAL journal with `synchronous=FULL`, so a write that returned survives kill -9 and
power loss (the WAL is fsynced on every commit). Every change is one `BEGIN IMMEDIATE`
transaction. One connection is shared by every caller and serialised with a lock, so the
store may be called from any thread, one at a time (the service calls it from a dedicated
thread).

Layout: each model is stored whole as JSON (`Model.model_dump_json`, the single source of
truth) plus denormalised columns for filtering, each indexed as (column, id, other filter
columns) so that a filtered, keyset-paginated list (`WHERE col = ? AND id > ? ORDER BY id
LIMIT n`) walks one index in order, checks the other filter terms inside it, and stops after n
matches. Labels and paths live in side tables that cascade on delete; a `labels.KEY=value`
filter walks the (key, value, model_id) index instead. At 100k models every measured filtered
page costs < 1 ms of SQL except rare matches of `!=`-only filters (an id-order scan).

Models are also read as `ModelRecord`s (id, etag and the JSON, unparsed): every write gives a
model a fresh etag, so a caller may keep what it derives from one (the servicer keeps the
protobuf encoding) under (id, etag) and skip the ~50 us pydantic parse per model on later reads.

Encodings: a store opened with a `ModelEncoder` also keeps, next to each model version, the
bytes that encoder makes of it (the catalog's: the serialized rbee.catalog.v1.Model), written in
the same transaction as the model, so a read hands them out with the record and serving a model
converts nothing. The store never looks inside them. Each is tagged with the encoder's `name`
and the model's etag, and a read returns only one whose tag and etag are both current: bytes
made by another build (another name) or of an older version are never served, and
`backfill_encodings` replaces them in bounded batches.

Schema changes are numbered migrations applied in order at open; `meta.schema_version` records
the last applied one. Opening does no full scan, so it stays fast at any size.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from services.catalog.domain import Install, Model
from services.catalog.filtering import (
    NAME_FIELD,
    TEXT_FIELDS,
    FilterOp,
    FilterTerm,
    ModelFilter,
    model_field_value,
)
from services.catalog.ids import validate_id
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    normalize_page_size,
)
from services.common.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    NotFound,
    Unavailable,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
_ORDER_BY_ID = "id"

# Migration n brings the schema from version n-1 to n. Never edit a released one; append.
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            # Filter columns come before `data`: SQLite reads a record's columns in order, so
            # checking a filter never has to touch the (large, possibly overflowing) JSON.
            """
            CREATE TABLE models (
                id TEXT PRIMARY KEY NOT NULL,
                state TEXT NOT NULL,
                source_kind TEXT NOT NULL,
                model_type TEXT,
                format TEXT,
                architecture TEXT COLLATE NOCASE,
                family TEXT COLLATE NOCASE,
                quantization TEXT COLLATE NOCASE,
                source_key TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                etag TEXT NOT NULL,
                data TEXT NOT NULL
            )
            """,
            # One index per filter column, ordered by (column, id) for keyset pages, and
            # carrying every other filter column: a combined filter (state=x AND format=y) is
            # checked inside the index and only matching rows are read from the table.
            "CREATE INDEX models_state_id ON models"
            " (state, id, source_kind, model_type, format, architecture, family, quantization)",
            "CREATE INDEX models_source_kind_id ON models"
            " (source_kind, id, state, model_type, format, architecture, family, quantization)",
            "CREATE INDEX models_model_type_id ON models"
            " (model_type, id, state, source_kind, format, architecture, family, quantization)",
            "CREATE INDEX models_format_id ON models"
            " (format, id, state, source_kind, model_type, architecture, family, quantization)",
            "CREATE INDEX models_architecture_id ON models"
            " (architecture, id, state, source_kind, model_type, format, family, quantization)",
            "CREATE INDEX models_family_id ON models"
            " (family, id, state, source_kind, model_type, format, architecture, quantization)",
            "CREATE INDEX models_quantization_id ON models"
            " (quantization, id, state, source_kind, model_type, format, architecture, family)",
            "CREATE INDEX models_source_key ON models (source_key)",
            """
            CREATE TABLE model_labels (
                model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (model_id, key)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX model_labels_key_value ON model_labels (key, value, model_id)",
            """
            CREATE TABLE model_paths (
                model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
                path TEXT NOT NULL,
                PRIMARY KEY (model_id, path)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX model_paths_path ON model_paths (path, model_id)",
            """
            CREATE TABLE installs (
                id TEXT PRIMARY KEY NOT NULL,
                worker_type TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                data TEXT NOT NULL
            )
            """,
            "CREATE INDEX installs_worker_type_id ON installs (worker_type, id)",
        ),
    ),
    (
        2,
        (
            # One encoding per model (see the module docstring), gone with the model.
            """
            CREATE TABLE model_encodings (
                model_id TEXT PRIMARY KEY NOT NULL REFERENCES models (id) ON DELETE CASCADE,
                encoding TEXT NOT NULL,
                etag TEXT NOT NULL,
                data BLOB NOT NULL
            ) WITHOUT ROWID
            """,
        ),
    ),
)

_INSERT_MODEL = (
    "INSERT INTO models (id, state, source_kind, model_type, format, architecture,"
    " family, quantization, source_key, created_at, updated_at, etag, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Filter field -> indexed column. Values reach SQL only as parameters, never as text.
_MODEL_COLUMNS = {
    "state": "m.state",
    "source": "m.source_kind",
    "model_type": "m.model_type",
    "format": "m.format",
    "architecture": "m.architecture",
    "family": "m.family",
    "quantization": "m.quantization",
}


class ModelEncoder(Protocol):
    """Makes the bytes a store keeps next to each model version (see the module docstring)."""

    @property
    def name(self) -> str:
        """Tags what `encode` makes: another name for every change to what it makes."""
        ...

    def encode(self, model: Model) -> bytes:
        """The encoding of `model` as stored (its etag and times set)."""
        ...


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One stored version of a model as the database holds it: its id, its etag and its JSON
    (`Model.model_dump_json`, which carries the same id and etag), and the store's encoding of
    this version when it has a current one (None otherwise).

    Every write of a model (create, update) gives it a fresh random etag, and the catalog is
    the single writer, so (id, etag) names exactly one content: whatever is derived from a
    record may be kept under that key, and is never stale while the key is still served.
    """

    id: str
    etag: str
    data: str
    encoded: bytes | None = None

    def model(self) -> Model:
        """The domain model (parsed on every call; callers may change what they get)."""
        return Model.model_validate_json(self.data)


class CatalogStore:
    """The catalog's persistent state: models and installs in one SQLite database."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        secret: bytes,
        point_reader: sqlite3.Connection | None = None,
        encoder: ModelEncoder | None = None,
    ) -> None:
        """Use `CatalogStore.open`; this wraps an already prepared connection (and an optional
        read-only one for point reads)."""
        self._connection: sqlite3.Connection | None = connection
        self._path = path
        self._encoder = encoder
        self._lock = threading.RLock()
        self._tokens = PageTokenCodec(secret)
        # Point reads (get by id) use their own read-only connection: in WAL mode it never
        # waits for a write in progress on the main connection, so a caller may serve them on
        # its event loop without a thread hop.
        self._point_reader = point_reader
        self._point_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, encoder: ModelEncoder | None = None) -> CatalogStore:
        """Open (creating it when missing) the database at `path` and bring its schema up to
        date. With `encoder`, every model written keeps its encoding, and reads hand out the
        current ones. Raises DataLoss when the file is not an SQLite database or is damaged,
        and FailedPrecondition when a newer rbee wrote it (or WAL is unavailable there)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        connection = sqlite3.connect(
            str(path),
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
            check_same_thread=False,  # the lock below serialises every use
        )
        try:
            secret = _prepare(connection, path)
        except sqlite3.DatabaseError as exc:
            connection.close()
            if getattr(exc, "sqlite_errorname", "") in {"SQLITE_NOTADB", "SQLITE_CORRUPT"}:
                raise DataLoss(f"the catalog database {path} is damaged: {exc}") from exc
            raise
        except BaseException:
            connection.close()
            raise
        reader = sqlite3.connect(
            str(path),
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,  # guarded by its own lock
        )
        reader.execute("PRAGMA query_only=ON")
        return cls(connection, path, secret, reader, encoder)

    def close(self) -> None:
        """Close the database (idempotent). Later calls raise Unavailable."""
        with self._point_lock:
            if self._point_reader is not None:
                self._point_reader.close()
                self._point_reader = None
        with self._lock:
            connection = self._connection
            if connection is None:
                return
            self._connection = None
            try:
                # Refresh planner statistics cheaply (bounded work) for the next open.
                connection.execute("PRAGMA analysis_limit=400")
                connection.execute("PRAGMA optimize")
            except sqlite3.Error:
                logger.warning("PRAGMA optimize failed on close of %s", self._path, exc_info=True)
            finally:
                connection.close()

    def __enter__(self) -> CatalogStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # --- models ---------------------------------------------------------------------------

    def create_model(self, model: Model) -> Model:
        """Insert `model` and return it as stored (fresh etag, updated_at = now).

        Raises InvalidArgument (INVALID_NAME) for a bad id and AlreadyExists
        (MODEL_ALREADY_EXISTS) when the id is taken.
        """
        with self._write() as connection:
            return _insert_model(connection, model, _utc_now(), self._encoder)

    def create_models(self, models: Iterable[Model]) -> list[Model]:
        """Insert many models in ONE transaction (one fsync): all or none.

        For imports and benchmarks; each model is stored exactly as `create_model` would
        store it, with the same errors (the first one aborts the whole batch).
        """
        now = _utc_now()
        with self._write() as connection:
            return [_insert_model(connection, model, now, self._encoder) for model in models]

    def get_model(self, model_id: str) -> Model:
        """The model with `model_id`; NotFound (MODEL_NOT_FOUND) when there is none.

        A point read on the read-only connection: it never waits for a write."""
        return self.get_model_record(model_id).model()

    def get_model_record(self, model_id: str) -> ModelRecord:
        """`get_model` without the parse: the stored version (id, etag, JSON) of the model,
        with its current encoding when there is one."""
        select, params = self._record_select("models AS m")
        with self._point_read() as connection:
            row = connection.execute(f"{select} WHERE m.id = ?", (*params, model_id)).fetchone()
        if row is None:
            raise _model_not_found(model_id)
        return ModelRecord(*row)

    def _record_select(self, source: str) -> tuple[str, tuple[str, ...]]:
        """`SELECT` of ModelRecord columns from `source` (which names models `m`), joining the
        current encoding when this store has an encoder; and the parameters it takes."""
        if self._encoder is None:
            return f"SELECT m.id, m.etag, m.data, NULL FROM {source}", ()
        return (
            f"SELECT m.id, m.etag, m.data, e.data FROM {source}"
            " LEFT JOIN model_encodings AS e"
            " ON e.model_id = m.id AND e.etag = m.etag AND e.encoding = ?",
            (self._encoder.name,),
        )

    def list_models(
        self,
        flt: ModelFilter | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Model], str]:
        """One page of models matching `flt`, ordered by id, and the next page token ("" after
        the last page); `list_model_records` with every record parsed."""
        records, next_token = self.list_model_records(
            flt, page_size=page_size, page_token=page_token
        )
        return [record.model() for record in records], next_token

    def list_model_records(
        self,
        flt: ModelFilter | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[ModelRecord], str]:
        """One page of stored model versions (id, etag, JSON) matching `flt`, ordered by id,
        and the next page token ("" after the last page). Nothing is parsed: a caller that
        keeps what it derives from a version (keyed by id and etag) skips the parse.

        Keyset pagination: the token carries the last id served, so rows inserted or deleted
        between pages cause neither duplicates nor gaps among the others. Raises
        InvalidArgument (INVALID_PAGE_TOKEN) for a token that is not ours or belongs to
        another filter, and for a negative page size.
        """
        flt = flt or ModelFilter()
        size = normalize_page_size(page_size)
        fingerprint = filter_fingerprint("models", flt.normalized(), _ORDER_BY_ID)
        after = self._tokens.decode(page_token, fingerprint)
        query = model_filter_to_sql(flt)
        conditions, params = list(query.conditions), list(query.params)
        if after is not None:
            conditions.append(f"{query.key} > ?")
            params.append(after)
        select, select_params = self._record_select(query.source)
        sql = f"{select}{_where(conditions)} ORDER BY {query.key} LIMIT ?"
        with self._read() as connection:
            rows = connection.execute(sql, (*select_params, *params, size + 1)).fetchall()
        records = [ModelRecord(*row) for row in rows[:size]]
        next_token = self._tokens.encode(records[-1].id, fingerprint) if len(rows) > size else ""
        return records, next_token

    def count_models(self, flt: ModelFilter | None = None) -> int:
        """How many models match `flt` (all models without one)."""
        query = model_filter_to_sql(flt or ModelFilter())
        sql = f"SELECT COUNT(*) FROM {query.source}{_where(query.conditions)}"
        with self._read() as connection:
            row = connection.execute(sql, query.params).fetchone()
        return int(row[0])

    def update_model(self, model: Model, *, expected_etag: str | None = None) -> Model:
        """Replace the stored model with `model` (same id) and return it as stored.

        `created_at` is kept from the stored model; `updated_at` and `etag` are set here.
        Raises NotFound (MODEL_NOT_FOUND) and, when `expected_etag` is given and differs from
        the stored etag, Aborted (ETAG_MISMATCH): someone else changed the model since it
        was read.
        """
        with self._write() as connection:
            row = connection.execute(
                "SELECT etag, created_at FROM models WHERE id = ?", (model.id,)
            ).fetchone()
            if row is None:
                raise _model_not_found(model.id)
            current_etag, created_at = row
            if expected_etag is not None and expected_etag != current_etag:
                raise Aborted(
                    f"model models/{model.id} was changed since it was read (etag "
                    f"{expected_etag!r} is not current); read it again and retry",
                    reason="ETAG_MISMATCH",
                    metadata={"resource_name": f"models/{model.id}"},
                )
            stored = model.model_copy(
                update={
                    "created_at": datetime.fromisoformat(created_at),
                    "updated_at": _utc_now(),
                    "etag": _new_etag(),
                }
            )
            connection.execute(
                "UPDATE models SET state = ?, source_kind = ?, model_type = ?, format = ?,"
                " architecture = ?, family = ?, quantization = ?, source_key = ?,"
                " created_at = ?, updated_at = ?, etag = ?, data = ? WHERE id = ?",
                (*_model_columns(stored), stored.id),
            )
            connection.execute("DELETE FROM model_labels WHERE model_id = ?", (stored.id,))
            connection.execute("DELETE FROM model_paths WHERE model_id = ?", (stored.id,))
            _write_model_children(connection, stored, self._encoder)
        return stored

    def delete_model(self, model_id: str) -> Model:
        """Delete the model and return what was stored; NotFound (MODEL_NOT_FOUND)."""
        with self._write() as connection:
            row = connection.execute("SELECT data FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                raise _model_not_found(model_id)
            # Labels and paths go with it (ON DELETE CASCADE).
            connection.execute("DELETE FROM models WHERE id = ?", (model_id,))
        return Model.model_validate_json(row[0])

    def find_models_by_path(self, path: str) -> list[Model]:
        """Models that list exactly `path` among their paths, by id."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT m.data FROM model_paths AS p JOIN models AS m ON m.id = p.model_id"
                " WHERE p.path = ? ORDER BY m.id",
                (path,),
            ).fetchall()
        return [Model.model_validate_json(row[0]) for row in rows]

    def find_model_by_source(self, canonical: str) -> Model | None:
        """The model whose `source.canonical()` is `canonical` (the lowest id if several)."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT data FROM models WHERE source_key = ? ORDER BY id LIMIT 1", (canonical,)
            ).fetchone()
        return None if row is None else Model.model_validate_json(row[0])

    # --- installs -------------------------------------------------------------------------

    def create_install(self, install: Install) -> Install:
        """Insert `install` (updated_at = now); AlreadyExists (INSTALL_ALREADY_EXISTS)."""
        validate_id(install.id, field="install_id")
        stored = install.model_copy(
            update={"created_at": _as_utc(install.created_at), "updated_at": _utc_now()}
        )
        with self._write() as connection:
            if _exists(connection, "installs", install.id):
                raise AlreadyExists(
                    f"install installs/{install.id} already exists",
                    reason="INSTALL_ALREADY_EXISTS",
                    resource_type="install",
                    resource_name=f"installs/{install.id}",
                )
            connection.execute(
                "INSERT INTO installs (id, worker_type, created_at, updated_at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.worker_type,
                    stored.created_at.isoformat(),
                    stored.updated_at.isoformat(),
                    stored.model_dump_json(),
                ),
            )
        return stored

    def get_install(self, install_id: str) -> Install:
        """The install with `install_id`; NotFound (INSTALL_NOT_FOUND)."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT data FROM installs WHERE id = ?", (install_id,)
            ).fetchone()
        if row is None:
            raise _install_not_found(install_id)
        return Install.model_validate_json(row[0])

    def list_installs(
        self,
        *,
        worker_type: str | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Install], str]:
        """One page of installs (of one worker type when given), by id, and the next token."""
        size = normalize_page_size(page_size)
        fingerprint = filter_fingerprint("installs", worker_type or "", _ORDER_BY_ID)
        after = self._tokens.decode(page_token, fingerprint)
        conditions: list[str] = []
        params: list[object] = []
        if worker_type is not None:
            conditions.append("worker_type = ?")
            params.append(worker_type)
        if after is not None:
            conditions.append("id > ?")
            params.append(after)
        sql = f"SELECT data FROM installs{_where(conditions)} ORDER BY id LIMIT ?"
        with self._read() as connection:
            rows = connection.execute(sql, (*params, size + 1)).fetchall()
        installs = [Install.model_validate_json(row[0]) for row in rows[:size]]
        next_token = self._tokens.encode(installs[-1].id, fingerprint) if len(rows) > size else ""
        return installs, next_token

    def update_install(self, install: Install) -> Install:
        """Replace the stored install (same id), keeping created_at; NotFound."""
        with self._write() as connection:
            row = connection.execute(
                "SELECT created_at FROM installs WHERE id = ?", (install.id,)
            ).fetchone()
            if row is None:
                raise _install_not_found(install.id)
            stored = install.model_copy(
                update={"created_at": datetime.fromisoformat(row[0]), "updated_at": _utc_now()}
            )
            connection.execute(
                "UPDATE installs SET worker_type = ?, updated_at = ?, data = ? WHERE id = ?",
                (
                    stored.worker_type,
                    stored.updated_at.isoformat(),
                    stored.model_dump_json(),
                    stored.id,
                ),
            )
        return stored

    def delete_install(self, install_id: str) -> Install:
        """Delete the install and return what was stored; NotFound (INSTALL_NOT_FOUND)."""
        with self._write() as connection:
            row = connection.execute(
                "SELECT data FROM installs WHERE id = ?", (install_id,)
            ).fetchone()
            if row is None:
                raise _install_not_found(install_id)
            connection.execute("DELETE FROM installs WHERE id = ?", (install_id,))
        return Install.model_validate_json(row[0])

    # --- encodings ------------------------------------------------------------------------

    def backfill_encodings(self, limit: int, after: str = "") -> tuple[int, str]:
        """Encode up to `limit` models, in id order after `after`, that have no current
        encoding (none yet, an older version's, another encoder's), in one transaction.
        Returns how many it encoded and where the next call goes on ("" when it reached the
        end, or when the store has no encoder). For a database written without this encoder:
        call it from "" until it returns "", between other work; each call holds the store
        for about 0.2 ms per model encoded, and the calls together read the table once."""
        encoder = self._encoder
        if encoder is None or limit <= 0:
            return 0, ""
        with self._write() as connection:
            rows = connection.execute(
                "SELECT m.id, m.data FROM models AS m LEFT JOIN model_encodings AS e"
                " ON e.model_id = m.id AND e.etag = m.etag AND e.encoding = ?"
                " WHERE m.id > ? AND e.model_id IS NULL ORDER BY m.id LIMIT ?",
                (encoder.name, after, limit),
            ).fetchall()
            for _, data in rows:
                _write_encoding(connection, Model.model_validate_json(data), encoder)
        return len(rows), rows[-1][0] if len(rows) == limit else ""

    # --- plumbing -------------------------------------------------------------------------

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise Unavailable("the catalog store is closed")
        return self._connection

    @contextmanager
    def _point_read(self) -> Iterator[sqlite3.Connection]:
        if self._point_reader is None:  # wrapped without one, or closed: the main connection
            with self._read() as connection:
                yield connection
            return
        with self._point_lock:
            yield self._point_reader

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A single SELECT in autocommit mode is its own consistent snapshot.
        with self._lock:
            yield self._open_connection()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            connection = self._open_connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise


@dataclass(frozen=True)
class ModelQuery:
    """A filter over models as SQL: `SELECT ... FROM {source} WHERE {conditions} ORDER BY {key}`.

    `source` names the models table `m`; `key` is the column that orders pages (always equal
    to `m.id`). Every value is a `?` parameter; only fixed column names and operators are text.
    """

    source: str
    key: str
    conditions: tuple[str, ...]
    params: tuple[object, ...]


def model_filter_to_sql(flt: ModelFilter) -> ModelQuery:
    """Turn `flt` into parameterised SQL over `models AS m`.

    With a `labels.KEY=value` term the query is driven by the label index instead
    (`model_labels AS d`, ordered by `d.model_id`): a page then reads only the models that carry
    the label, in id order, however rare or common the label is.
    """
    driver = next(
        (t for t in flt.terms if t.field == "labels" and t.op is FilterOp.EQ),
        None,
    )
    conditions: list[str] = []
    params: list[object] = []
    if driver is None:
        source, key = "models AS m", "m.id"
    else:
        source, key = "model_labels AS d JOIN models AS m ON m.id = d.model_id", "d.model_id"
        conditions.append("d.key = ? AND d.value = ?")
        params.extend([driver.label_key, driver.value])
    for term in flt.terms:
        if term is driver:
            continue
        condition, term_params = _term_sql(term)
        conditions.append(condition)
        params.extend(term_params)
    return ModelQuery(source, key, tuple(conditions), tuple(params))


def _term_sql(term: FilterTerm) -> tuple[str, list[object]]:
    negate = term.op is FilterOp.NE
    if term.field == "labels":
        # A primary-key probe per candidate row: (model_id, key) then the value.
        label_match = (
            "EXISTS (SELECT 1 FROM model_labels AS l"
            " WHERE l.model_id = m.id AND l.key = ? AND l.value = ?)"
        )
        return (f"NOT {label_match}" if negate else label_match), [term.label_key, term.value]
    if term.field == NAME_FIELD:
        if not term.prefix:
            return ("m.id != ?" if negate else "m.id = ?"), [term.value]
        if term.value == "":
            return ("0" if negate else "1"), []
        # A range on the primary key instead of LIKE: exact, case-sensitive, and indexed.
        upper = term.value[:-1] + chr(ord(term.value[-1]) + 1)
        condition = "m.id >= ? AND m.id < ?"
        return (f"NOT ({condition})" if negate else f"({condition})"), [term.value, upper]
    column = _MODEL_COLUMNS[term.field]
    if term.field in TEXT_FIELDS and term.value == "":
        if negate:
            return f"({column} IS NOT NULL AND {column} != '')", []
        return f"({column} IS NULL OR {column} = '')", []
    # IS NOT: models without a value (NULL) also differ from the given value.
    return (f"{column} IS NOT ?" if negate else f"{column} = ?"), [term.value]


def _where(conditions: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def _prepare(connection: sqlite3.Connection, path: Path) -> bytes:
    """Set the connection's pragmas, migrate the schema and return the page-token secret."""
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise FailedPrecondition(
            f"the catalog database {path} cannot use WAL journaling (got {mode!r}); "
            "put RBEE_HOME on a local file system",
        )
    # FULL: the WAL is fsynced at every commit, so acknowledged writes survive power loss.
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
            " WITHOUT ROWID"
        )
        version = _schema_version(connection)
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"the catalog database {path} has schema version {version}, newer than this "
                f"rbee understands ({SCHEMA_VERSION}); upgrade rbee",
            )
        for target, statements in _MIGRATIONS:
            if target <= version:
                continue
            for statement in statements:
                connection.execute(statement)
            _set_meta(connection, "schema_version", str(target))
            logger.info("catalog database %s migrated to schema version %d", path, target)
        row = connection.execute(
            "SELECT value FROM meta WHERE key = 'page_token_secret'"
        ).fetchone()
        if row is None:
            secret = new_secret()
            _set_meta(connection, "page_token_secret", secret.hex())
        else:
            secret = bytes.fromhex(row[0])
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return secret


def _schema_version(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _set_meta(connection: sqlite3.Connection, key: str, value: str) -> None:
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _exists(connection: sqlite3.Connection, table: str, row_id: str) -> bool:
    # `table` is one of our own constants, never client input.
    row = connection.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone()
    return row is not None


def _insert_model(
    connection: sqlite3.Connection, model: Model, now: datetime, encoder: ModelEncoder | None
) -> Model:
    """Validate, stamp and insert one model (and its encoding) inside the caller's
    transaction."""
    validate_id(model.id, field="model_id")
    stored = model.model_copy(
        update={"created_at": _as_utc(model.created_at), "updated_at": now, "etag": _new_etag()}
    )
    if _exists(connection, "models", model.id):
        raise AlreadyExists(
            f"model models/{model.id} already exists",
            reason="MODEL_ALREADY_EXISTS",
            resource_type="model",
            resource_name=f"models/{model.id}",
        )
    connection.execute(_INSERT_MODEL, (stored.id, *_model_columns(stored)))
    _write_model_children(connection, stored, encoder)
    return stored


def _model_columns(model: Model) -> tuple[object, ...]:
    """The denormalised column values, in the INSERT/UPDATE order after `id`."""
    return (
        model_field_value(model, "state"),
        model_field_value(model, "source"),
        model_field_value(model, "model_type"),
        model_field_value(model, "format"),
        model_field_value(model, "architecture"),
        model_field_value(model, "family"),
        model_field_value(model, "quantization"),
        model.source.canonical(),
        model.created_at.isoformat(),
        model.updated_at.isoformat(),
        model.etag,
        model.model_dump_json(),
    )


def _write_model_children(
    connection: sqlite3.Connection, model: Model, encoder: ModelEncoder | None
) -> None:
    """Labels, paths and the encoding of the model version just written."""
    connection.executemany(
        "INSERT INTO model_labels (model_id, key, value) VALUES (?, ?, ?)",
        [(model.id, key, value) for key, value in model.labels.items()],
    )
    connection.executemany(
        "INSERT INTO model_paths (model_id, path) VALUES (?, ?)",
        [(model.id, path) for path in sorted(set(model.paths))],
    )
    if encoder is not None:
        _write_encoding(connection, model, encoder)
    # Without an encoder an older version's encoding may stay: its etag keeps it from being
    # served, and the next backfill replaces it.


def _write_encoding(connection: sqlite3.Connection, model: Model, encoder: ModelEncoder) -> None:
    connection.execute(
        "INSERT INTO model_encodings (model_id, encoding, etag, data) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (model_id) DO UPDATE SET"
        " encoding = excluded.encoding, etag = excluded.etag, data = excluded.data",
        (model.id, encoder.name, model.etag, encoder.encode(model)),
    )


def _model_not_found(model_id: str) -> NotFound:
    return NotFound(
        f"model models/{model_id} not found",
        reason="MODEL_NOT_FOUND",
        resource_type="model",
        resource_name=f"models/{model_id}",
    )


def _install_not_found(install_id: str) -> NotFound:
    return NotFound(
        f"install installs/{install_id} not found",
        reason="INSTALL_NOT_FOUND",
        resource_type="install",
        resource_name=f"installs/{install_id}",
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    """A timezone-aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _new_etag() -> str:
    # Random, not a hash of the content: a rewrite with identical content still gets a fresh
    # etag, so a client holding the old one learns that someone wrote in between.
    return secrets.token_hex(8)
