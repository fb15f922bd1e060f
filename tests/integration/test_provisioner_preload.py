"""Preload, GetPreload, ListPreloads and DeletePreload over gRPC: a real catalog and provisioner
on 127.0.0.1:0, models registered from generated GGUF files, the stub and the SDK client."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.errors import RbeeClientError
from rbee_client.provisioner import PreloadUpdate, ProvisionerClient
from services.provisioner.preload import mincore_available
from tests.fixtures.fake_civitai import FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.fixtures.residency import assert_resident
from tests.integration.provisioner_harness import Mesh, running_mesh
from tests.integration.server_harness import error_reason

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mincore_available(), reason="residency needs mincore"),
]


def register(mesh: Mesh, path: Path) -> str:
    """Register a local GGUF in place (PullModel with a file: source); returns models/{id}."""
    model = None
    for msg in mesh.provisioner.PullModel(pb.PullModelRequest(source=f"file:{path}"), timeout=60):
        if msg.HasField("model"):
            model = msg.model
    assert model is not None and model.state == cpb.MODEL_STATE_READY
    return str(model.name)


def gguf(tmp_path: Path, name: str, n_layer: int) -> Path:
    return write_tiny_llama_gguf(
        tmp_path / f"{name}.gguf", n_vocab=1024, n_embd=256, n_ff=512, n_layer=n_layer, name=name
    )


def preload(mesh: Mesh, model: str, **kw: Any) -> tuple[list[pb.PreloadProgress], pb.Preload]:
    """One Preload stream, checking its shape: progress events, then exactly one Preload."""
    events: list[pb.PreloadProgress] = []
    final: pb.Preload | None = None
    for msg in mesh.provisioner.Preload(pb.PreloadRequest(model=model, **kw), timeout=60):
        assert final is None, "nothing after the terminal Preload"
        if msg.HasField("preload"):
            final = msg.preload
        else:
            assert msg.HasField("progress")
            events.append(msg.progress)
    assert final is not None, "exactly one terminal Preload"
    return events, final


def scrape(mesh: Mesh) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The provisioner's /metrics samples by (name, sorted labels)."""
    assert mesh.metrics_port is not None
    url = f"http://127.0.0.1:{mesh.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_preload_stream_budget_eviction_and_listing(tmp_path: Path) -> None:
    paths = {"a": gguf(tmp_path, "a", 4), "b": gguf(tmp_path, "b", 4)}
    size = paths["a"].stat().st_size
    big = gguf(tmp_path, "big", 12)
    assert big.stat().st_size > 2 * size
    budget = size * 3 // 2  # room for one of a and b, never both
    with (
        FakeHub() as hub,
        FakeCivitai() as civitai,
        running_mesh(
            tmp_path / "home",
            hf_endpoint=hub.endpoint,
            civitai_endpoint=civitai.endpoint,
            preload_budget=str(budget),
        ) as mesh,
    ):
        names = {k: register(mesh, p) for k, p in paths.items()}
        big_name = register(mesh, big)

        events, first = preload(mesh, names["a"])
        assert first.name == names["a"].replace("models/", "preloads/")
        assert first.model == names["a"]
        assert first.total_bytes == size
        assert_resident(first.resident_bytes, size)  # measured with mincore at the end
        assert first.HasField("duration") and first.HasField("measure_time")
        assert events and events[0].model == names["a"]
        assert events[-1].bytes.completed_bytes == size == events[-1].bytes.total_bytes
        assert events[-1].file == paths["a"].name and events[-1].file_count == 1

        _, second = preload(mesh, names["b"])
        assert list(second.evicted_models) == [names["a"]]

        listing = mesh.provisioner.ListPreloads(pb.ListPreloadsRequest(), timeout=10)
        assert [p.model for p in listing.preloads] == [names["b"]]
        assert listing.budget_bytes == budget and listing.evictions == 1
        assert listing.resident_bytes == listing.preloads[0].resident_bytes
        got = mesh.provisioner.GetPreload(pb.GetPreloadRequest(name=second.name), timeout=10)
        assert got.total_bytes == size and got.measure_time.ToDatetime() >= (
            second.measure_time.ToDatetime()
        )

        with pytest.raises(grpc.RpcError) as info:
            preload(mesh, big_name)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(info.value) == "INSUFFICIENT_MEMORY"
        assert str(budget) in (info.value.details() or "")

        samples = scrape(mesh)
        assert samples[("rbee_provisioner_preload_evictions_total", (("cause", "budget"),))] == 1
        assert samples[("rbee_provisioner_preloaded_bytes_total", ())] == 2 * size
        assert_resident(samples[("rbee_provisioner_preload_resident_bytes", ())], size)

        mesh.provisioner.DeletePreload(pb.DeletePreloadRequest(name=second.name), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            mesh.provisioner.DeletePreload(pb.DeletePreloadRequest(name=second.name), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(info.value) == "PRELOAD_NOT_FOUND"
        mesh.provisioner.DeletePreload(
            pb.DeletePreloadRequest(name=second.name, allow_missing=True), timeout=10
        )
        assert mesh.provisioner.ListPreloads(pb.ListPreloadsRequest(), timeout=10).total_size == 0


def test_refusals(mesh: Mesh, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as info:
        preload(mesh, "models/not-there")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(info.value) == "MODEL_NOT_FOUND"

    path = gguf(tmp_path, "pending", 1)
    created = mesh.catalog.CreateModel(
        cpb.CreateModelRequest(
            model_id="pending",
            model=cpb.Model(
                source=cpb.ModelSource(kind=cpb.SOURCE_KIND_LOCAL, path=str(path)),
                paths=[str(path)],
                state=cpb.MODEL_STATE_DOWNLOADING,
            ),
        ),
        timeout=30,
    )
    with pytest.raises(grpc.RpcError) as info:
        preload(mesh, created.name)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "MODEL_NOT_READY"

    with pytest.raises(grpc.RpcError) as info:
        preload(mesh, "not-a-name")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        mesh.provisioner.GetPreload(pb.GetPreloadRequest(name="preloads/nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_sdk_client_preload_and_cancel(mesh: Mesh, tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    write_tiny_llama_gguf(path, n_vocab=1024, n_embd=256, n_ff=512, n_layer=4)
    name = register(mesh, path)
    size = path.stat().st_size
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    with ProvisionerClient(mesh.address, timeout=10) as client:
        # Leaving after the first event cancels the call; the provisioner stays usable.
        stream = client.preload(name, timeout=30)
        assert isinstance(next(stream), PreloadUpdate)
        stream.close()

        updates: list[PreloadUpdate] = []
        final = None
        for item in client.preload(name, pin=True, timeout=30):
            if isinstance(item, PreloadUpdate):
                updates.append(item)
            else:
                final = item
        assert final is not None and final.pinned and final.resident_bytes == size
        assert updates[-1].done_bytes == size

        assert [p.name for p in client.list_preloads().preloads] == [final.name]
        assert client.get_preload(final.name).pinned
        client.delete_preload(final.name)
        with pytest.raises(RbeeClientError) as caught:
            client.get_preload(final.name)
        assert caught.value.code == "NOT_FOUND"


def test_cli_preload_ls_rm(mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rbee_client.cli.main import main

    name = register(mesh, gguf(tmp_path, "cli", 2))
    model_id = name.removeprefix("models/")
    where = ["--provisioner", mesh.address]
    capsys.readouterr()

    assert main(["preload", model_id, *where]) == 0
    out = capsys.readouterr().out
    assert f"preloaded {name}: 100% resident" in out

    assert main(["preloads", "ls", "--format", "json", *where]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [p["model"] for p in listing["preloads"]] == [name]
    assert int(listing["budgetBytes"]) > 0  # the default: half of this machine's RAM

    assert main(["preloads", "ls", *where]) == 0
    assert f"preloads/{model_id}" in capsys.readouterr().out

    assert main(["preloads", "rm", model_id, *where]) == 0
    assert main(["preloads", "rm", model_id, *where]) != 0  # NOT_FOUND now
    assert main(["preloads", "rm", model_id, "--allow-missing", *where]) == 0
