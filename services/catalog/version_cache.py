"""A bounded LRU of values derived from one stored model version, keyed by (model id, etag).

The store gives a model a fresh random etag on every write (create, update), and the catalog is
the single writer of its database, so (id, etag) names one immutable version of a model: a value
computed from that version (its parsed form, its protobuf encoding) stays right for as long as
the key is asked for. A cache keyed this way needs no invalidation for correctness: a read that
returns a newer etag misses and replaces the entry, and a deleted model is never read again. The
write paths still `discard` what they replace or remove, only to give the memory back early.

One entry per model id (the newest version seen), at most `max_entries` of them, least recently
used evicted first. Thread-safe: one lock around each operation, so any thread may use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Value = TypeVar("Value")

DEFAULT_MAX_ENTRIES = 4096


class ModelVersionCache(Generic[Value]):
    """Values per model version: `get_or_compute(id, etag, compute)` computes once per version."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, Value]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def max_entries(self) -> int:
        """The most entries (model ids) held at once."""
        return self._max_entries

    @property
    def hits(self) -> int:
        """Lookups answered from the cache so far."""
        return self._hits

    @property
    def misses(self) -> int:
        """Lookups that had to compute so far."""
        return self._misses

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, model_id: str, etag: str) -> Value | None:
        """The cached value for this version, or None (absent, or cached for another etag)."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry[0] != etag:
                self._misses += 1
                return None
            self._entries.move_to_end(model_id)
            self._hits += 1
            return entry[1]

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[Value | None]:
        """`get` for each (model id, etag) in order, under one acquisition of the lock (a
        ListModels page asks for fifty at once)."""
        found: list[Value | None] = []
        with self._lock:
            for model_id, etag in keys:
                entry = self._entries.get(model_id)
                if entry is None or entry[0] != etag:
                    found.append(None)
                    continue
                self._entries.move_to_end(model_id)
                found.append(entry[1])
            hits = sum(value is not None for value in found)
            self._hits += hits
            self._misses += len(found) - hits
        return found

    def put(self, model_id: str, etag: str, value: Value) -> None:
        """Remember `value` for this version, replacing any other version of the model. An
        empty etag names no stored version (a validate-only create), so nothing is kept."""
        if not etag:
            return
        with self._lock:
            self._entries[model_id] = (etag, value)
            self._entries.move_to_end(model_id)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def get_or_compute(self, model_id: str, etag: str, compute: Callable[[], Value]) -> Value:
        """The cached value for this version, computing and caching it on a miss. `compute`
        runs outside the lock; two racing misses both compute the same value, which is fine."""
        cached = self.get(model_id, etag)
        if cached is not None:
            return cached
        value = compute()
        self.put(model_id, etag, value)
        return value

    def discard(self, model_id: str) -> None:
        """Forget every version of the model (after a write replaced or removed it)."""
        with self._lock:
            self._entries.pop(model_id, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
