"""The catalog's cached answers on a real server: EvaluateCompatibility kept per model version
and request, and ListModels pages sent as joined cached bytes.

The servicer answers GetModel, ListModels and EvaluateCompatibility of a stored model from
serialized messages it keeps per (model id, etag); these tests check that what a client
decodes is what the uncached path would say, that a write (even one the servicer never saw,
made on the store directly) is seen at once, and that errors come in the same order as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from services.catalog import convert
from services.catalog.domain import ModelState
from services.catalog.message_cache import CompatibilityResponseCache
from services.catalog.settings import DEFAULT_HANDLER_THREADS
from services.catalog.store import CatalogStore
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.server_harness import error_reason
from tests.integration.test_catalog_server import catalog_server_with

pytestmark = pytest.mark.integration

TIMEOUT_S = 5.0
# The threaded server (the default; the cached answers come from handler threads) and the
# event loop (RBEE_CATALOG_HANDLER_THREADS=0).
BOTH_SERVERS = pytest.mark.parametrize(
    "threads", [DEFAULT_HANDLER_THREADS, 0], ids=["threaded", "event-loop"]
)


@contextmanager
def catalog_with(
    home: Path, compat: CompatibilityResponseCache, threads: int
) -> Iterator[tuple[catalog_pb2_grpc.CatalogServiceStub, CatalogStore]]:
    """A catalog server whose servicer uses `compat`; yields a stub and the server's store."""
    with (
        catalog_server_with(home, handler_threads=threads, compat=compat) as (address, store),
        grpc.insecure_channel(address) as channel,
    ):
        yield catalog_pb2_grpc.CatalogServiceStub(channel), store


def register(stub: catalog_pb2_grpc.CatalogServiceStub, path: Path, model_id: str) -> None:
    stub.CreateModel(
        pb.CreateModelRequest(
            model_id=model_id,
            model=pb.Model(source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL), paths=[str(path)]),
        ),
        timeout=TIMEOUT_S,
    )


@BOTH_SERVERS
def test_compatibility_is_cached_per_version_and_request(tmp_path: Path, threads: int) -> None:
    compat = CompatibilityResponseCache()
    with catalog_with(tmp_path / "home", compat, threads) as (stub, store):
        register(stub, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "tiny")
        default = pb.EvaluateCompatibilityRequest(model="models/tiny")
        short = pb.EvaluateCompatibilityRequest(model="models/tiny", context_length=128)

        first = stub.EvaluateCompatibility(default, timeout=TIMEOUT_S)
        assert first.context_length_used == 256 and len(first.results) == 6
        assert stub.EvaluateCompatibility(default, timeout=TIMEOUT_S) == first
        assert compat.versions.hits >= 1  # the second answer came from the cache
        assert stub.EvaluateCompatibility(short, timeout=TIMEOUT_S).context_length_used == 128
        assert stub.EvaluateCompatibility(default, timeout=TIMEOUT_S) == first

        # A write the servicer never saw (straight to the store): the new etag misses.
        stored = store.get_model("tiny")
        store.update_model(stored.model_copy(update={"state": ModelState.DOWNLOADING}))
        with pytest.raises(grpc.RpcError) as not_ready:
            stub.EvaluateCompatibility(default, timeout=TIMEOUT_S)
        assert not_ready.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(not_ready.value) == "MODEL_NOT_READY"

        store.update_model(store.get_model("tiny").model_copy(update={"state": ModelState.READY}))
        assert stub.EvaluateCompatibility(default, timeout=TIMEOUT_S) == first

        stub.DeleteModel(pb.DeleteModelRequest(name="models/tiny"), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as gone:
            stub.EvaluateCompatibility(default, timeout=TIMEOUT_S)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


@BOTH_SERVERS
def test_compatibility_errors_come_in_the_same_order(tmp_path: Path, threads: int) -> None:
    with catalog_with(tmp_path / "home", CompatibilityResponseCache(), threads) as (stub, _store):
        register(stub, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "tiny")
        cases = [
            # The options are checked before the model is read, missing or not.
            (pb.EvaluateCompatibilityRequest(model="models/missing", context_length=1 << 25),
             grpc.StatusCode.INVALID_ARGUMENT),
            (pb.EvaluateCompatibilityRequest(model="models/tiny", context_length=1 << 25),
             grpc.StatusCode.INVALID_ARGUMENT),
            (pb.EvaluateCompatibilityRequest(model="models/missing"), grpc.StatusCode.NOT_FOUND),
            (pb.EvaluateCompatibilityRequest(model="models/tiny", worker_types=["worker-types/x"]),
             grpc.StatusCode.NOT_FOUND),
            (pb.EvaluateCompatibilityRequest(model="not a name"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.EvaluateCompatibilityRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ]  # fmt: skip
        for request, code in cases:
            for _ in range(2):  # nothing about a failed call is kept
                with pytest.raises(grpc.RpcError) as caught:
                    stub.EvaluateCompatibility(request, timeout=TIMEOUT_S)
                assert caught.value.code() == code, request


@BOTH_SERVERS
def test_list_pages_from_cached_bytes_decode_exactly(tmp_path: Path, threads: int) -> None:
    with catalog_with(tmp_path / "home", CompatibilityResponseCache(), threads) as (stub, store):
        for index in range(3):
            register(
                stub, write_tiny_llama_gguf(tmp_path / f"m{index}.gguf", seed=index), f"m{index}"
            )
        expected = [convert.model_to_pb(m) for m in store.list_models(page_size=10)[0]]

        for _ in range(2):  # built, then served from the cache
            first = stub.ListModels(pb.ListModelsRequest(page_size=2), timeout=TIMEOUT_S)
            assert list(first.models) == expected[:2]
            assert first.total_size == 3 and first.next_page_token
            last = stub.ListModels(
                pb.ListModelsRequest(page_size=2, page_token=first.next_page_token),
                timeout=TIMEOUT_S,
            )
            assert list(last.models) == expected[2:]
            assert last.total_size == 3 and last.next_page_token == ""
            assert (
                stub.GetModel(pb.GetModelRequest(name="models/m1"), timeout=TIMEOUT_S)
                == (expected[1])
            )
        empty = stub.ListModels(pb.ListModelsRequest(filter="state=failed"), timeout=TIMEOUT_S)
        assert list(empty.models) == [] and empty.total_size == 0
