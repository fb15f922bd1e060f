"""The catalog benchmark's pieces: the seed-style baseline answers like the real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.catalog import (
    LIST_FILTER,
    PageWalker,
    SeedStyleCatalog,
    build_models,
    percentile,
    populate_baseline,
    populate_rbee,
)
from services.catalog.filtering import parse_model_filter
from services.catalog.store import CatalogStore

pytestmark = pytest.mark.unit

MODELS = 200


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    database = root / "catalog.db"
    baseline = root / "seed-style"
    assert populate_rbee(database, build_models(MODELS, seed=3)) == MODELS
    assert populate_baseline(baseline, build_models(MODELS, seed=3)) == MODELS
    return database, baseline


def _walk(list_page: object) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page, token = list_page(token)  # type: ignore[operator]
        ids += [model.id for model in page]
        if not token:
            return ids


def test_models_are_varied_and_reproducible() -> None:
    first = list(build_models(MODELS, seed=1))
    again = list(build_models(MODELS, seed=1))
    assert [m.id for m in first] == [m.id for m in again]
    assert len({m.id for m in first}) == MODELS
    formats = {m.metadata.format for m in first if m.metadata}
    assert len(formats) == 3
    assert len({m.state for m in first}) == 3
    llm = next(m for m in first if m.metadata and m.metadata.weights and m.metadata.block_count)
    assert llm.metadata is not None and llm.metadata.weights is not None
    assert len(llm.metadata.weights.layer_bytes) == 32


def test_baseline_and_store_list_the_same_pages(stores: tuple[Path, Path]) -> None:
    database, baseline_root = stores
    flt = parse_model_filter(LIST_FILTER)
    baseline = SeedStyleCatalog.open(baseline_root)
    with CatalogStore.open(database) as store:
        from_store = _walk(lambda t: store.list_models(flt, page_size=30, page_token=t))
        expected = store.count_models(flt)
    from_baseline = _walk(lambda t: baseline.list(flt, page_size=30, page_token=t))
    assert from_baseline == from_store
    assert len(from_store) == expected
    assert 0 < expected < MODELS  # the filter selects a real fraction
    assert len(baseline) == MODELS


def test_baseline_get_rewrites_last_accessed(stores: tuple[Path, Path]) -> None:
    database, baseline_root = stores
    baseline = SeedStyleCatalog.open(baseline_root)
    with CatalogStore.open(database) as store:
        model_id = store.list_models(page_size=1)[0][0].id
        stored = store.get_model(model_id)
    file = baseline_root / model_id / "metadata.json"
    before = json.loads(file.read_text())
    got = baseline.get(model_id)
    after = json.loads(file.read_text())
    # The store stamps its own etag and updated_at on create; everything else is the same.
    stamped = {"etag", "updated_at"}
    assert got.model_dump(exclude=stamped) == stored.model_dump(exclude=stamped)
    assert after["last_accessed"] > before["last_accessed"]
    assert after["added_at"] == before["added_at"]
    with pytest.raises(FileNotFoundError):
        baseline.get("no-such-model")


def test_page_walker_restarts_after_the_last_page() -> None:
    tokens: list[str] = []

    def list_page(token: str) -> str:
        tokens.append(token)
        return "" if token == "b" else {"": "a", "a": "b"}[token]

    walker = PageWalker(list_page)
    for _ in range(5):
        walker()
    assert tokens == ["", "a", "b", "", "a"]


def test_percentile_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([3.0, 1.0], 0.99) == 3.0
