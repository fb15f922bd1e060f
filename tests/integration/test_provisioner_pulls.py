"""PullModel end to end on a real catalog and provisioner, against the fake Hub and CivitAI.

Every test serves real tiny models (generated GGUF / safetensors) so the catalog's inspection of
what was pulled is real too.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.provisioner.v1 import provisioner_pb2 as pb
from tests.fixtures.fake_cdn import RequestRecord
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_split_gguf, write_tiny_llama_gguf
from tests.integration.provisioner_harness import Mesh, running_mesh
from tests.integration.server_harness import error_reason

pytestmark = pytest.mark.integration

HF_TOKEN = "hf_SECRETtokenVALUE0123456789abcdef"
CIVITAI_TOKEN = "civitaiSECRETtoken0123456789"


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_tiny_llama_gguf(path).read_bytes()


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """About 6 MB: slow enough under a bandwidth limit to cancel or attach mid-transfer."""
    path = tmp_path_factory.mktemp("gguf") / "big.gguf"
    return write_tiny_llama_gguf(path, n_vocab=2048, n_embd=256, n_ff=512, n_layer=4).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def collect(stream: Any) -> tuple[list[pb.PullProgress], cpb.Model]:
    events: list[pb.PullProgress] = []
    model: cpb.Model | None = None
    for msg in stream:
        if msg.HasField("model"):
            assert model is None, "exactly one terminal model"
            model = msg.model
        else:
            assert model is None, "no progress after the model"
            events.append(msg.progress)
    assert model is not None
    return events, model


def pull(mesh: Mesh, source: str, timeout: float = 60, **options: Any) -> Any:
    return mesh.provisioner.PullModel(
        pb.PullModelRequest(source=source, options=pb.PullOptions(**options)), timeout=timeout
    )


def cdn_get_bytes(hub: FakeHub) -> int:
    return hub.cdn.body_bytes_sent()


def test_pull_gguf_file_from_the_hub(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo("org/tiny-GGUF", {"tiny.Q8_0.gguf": small_gguf, "README.md": b"# tiny\n"})

    started = time.monotonic()
    stream = pull(mesh, "hf:org/tiny-GGUF:tiny.Q8_0.gguf")
    first = next(stream)
    assert time.monotonic() - started < 5
    assert first.HasField("progress")
    events, model = collect(stream)

    states = [pb.PullState.Name(e.state) for e in [first.progress, *events]]
    for stage in ("RESOLVING", "DOWNLOADING", "VERIFYING", "REGISTERING"):
        assert f"PULL_STATE_{stage}" in states
    assert model.state == cpb.MODEL_STATE_READY
    assert model.sha256 == sha(small_gguf)
    assert model.size_bytes == len(small_gguf)
    assert model.metadata.architecture == "llama"
    assert model.source.repo == "org/tiny-GGUF"
    assert len(model.source.commit) == 40
    assert list(model.source.files) == ["tiny.Q8_0.gguf"]

    # The file sits in the standard HF cache layout: a snapshot symlink to the blob.
    path = Path(model.paths[0])
    assert path.is_symlink()
    assert path.parent.parent.name == "snapshots"
    assert Path(path.resolve()).parent.name == "blobs"
    assert path.read_bytes() == small_gguf
    assert not list(mesh.hf_cache.rglob("*.partial"))

    stored = mesh.catalog.GetModel(cpb.GetModelRequest(name=model.name), timeout=10)
    assert stored.state == cpb.MODEL_STATE_READY

    # Pulling again downloads nothing and gives the same model.
    before = cdn_get_bytes(hub)
    _, again = collect(pull(mesh, "hf:org/tiny-GGUF:tiny.Q8_0.gguf"))
    assert again.name == model.name
    assert cdn_get_bytes(hub) == before


def test_quantization_is_chosen_and_explained(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo(
        "org/multi-GGUF",
        {
            "multi.Q8_0.gguf": small_gguf,
            "multi.Q4_K_M.gguf": small_gguf + b"",
            "mmproj-multi-f16.gguf": small_gguf,
        },
    )
    events, model = collect(pull(mesh, "hf:org/multi-GGUF"))
    assert list(model.source.files) == ["multi.Q4_K_M.gguf"]
    assert any("Q4_K_M" in e.message for e in events)
    pulls = mesh.provisioner.ListPulls(pb.ListPullsRequest(), timeout=10).pulls
    (record,) = [p for p in pulls if p.model == model.name]
    assert record.chosen_file == "multi.Q4_K_M.gguf"
    assert "Q4_K_M" in record.choice_reason
    assert record.state == pb.PULL_STATE_SUCCEEDED


def test_bad_sources_are_invalid_argument(mesh: Mesh) -> None:
    for source in ("", "hf:", "hf:../etc:passwd", "ftp://x/y", "civitai:abc", "hf:a/b:../../x"):
        with pytest.raises(grpc.RpcError) as info:
            list(pull(mesh, source, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, source
        assert error_reason(info.value) == "INVALID_SOURCE", source


def test_missing_repo_and_file(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo("org/here", {"a.gguf": small_gguf})
    with pytest.raises(grpc.RpcError) as info:
        list(pull(mesh, "hf:org/nowhere:a.gguf", timeout=20))
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as info:
        list(pull(mesh, "hf:org/here:b.gguf", timeout=20))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(info.value) == "REMOTE_FILE_NOT_FOUND"


def test_gated_repo_without_access_is_permission_denied(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, small_gguf: bytes
) -> None:
    hub.add_repo("org/gated", {"g.Q4_K_M.gguf": small_gguf}, gated=True)
    hub.valid_tokens.add(HF_TOKEN)
    with running_mesh(
        tmp_path, hf_endpoint=hub.endpoint, civitai_endpoint=civitai.endpoint, hf_token=HF_TOKEN
    ) as mesh:
        with pytest.raises(grpc.RpcError) as info:
            list(pull(mesh, "hf:org/gated:g.Q4_K_M.gguf", timeout=20))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(info.value) == "GATED_REPO"
        assert HF_TOKEN not in (info.value.details() or "")

        hub.granted_tokens.add(HF_TOKEN)
        _, model = collect(pull(mesh, "hf:org/gated:g.Q4_K_M.gguf"))
        assert model.state == cpb.MODEL_STATE_READY
    # The token went to the Hub, never to the CDN.
    assert any(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in hub.requests)
    assert not any("authorization" in r.headers for r in hub.cdn.requests)


def test_hash_mismatch_fails_and_keeps_nothing(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo("org/liar", {"liar.Q4_K_M.gguf": small_gguf})
    hub.set_advertised_sha256("org/liar", "liar.Q4_K_M.gguf", "0" * 64)
    with pytest.raises(grpc.RpcError) as info:
        list(pull(mesh, "hf:org/liar:liar.Q4_K_M.gguf", timeout=30))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_reason(info.value) == "HASH_MISMATCH"
    models = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
    assert [m.state for m in models] == [cpb.MODEL_STATE_FAILED]
    assert not [p for p in mesh.hf_cache.rglob("*") if p.is_file() and p.stat().st_size > 1000]


def test_dropped_connection_is_retried(mesh: Mesh, hub: FakeHub, big_gguf: bytes) -> None:
    hub.add_repo("org/flaky", {"flaky.Q4_K_M.gguf": big_gguf})
    hub.cdn.faults.drop_after_bytes = 1_000_000
    hub.cdn.faults.drop_count = 2
    events, model = collect(pull(mesh, "hf:org/flaky:flaky.Q4_K_M.gguf"))
    assert model.sha256 == sha(big_gguf)
    assert any("retry" in e.message for e in events)
    ranges = [r.range for r in hub.cdn.requests if r.range]
    assert ranges, "the retry resumed with a Range request"
    # Resumed, not restarted: the CDN sent about the file once, not three times.
    assert cdn_get_bytes(hub) < len(big_gguf) * 1.5


def test_concurrent_pulls_of_one_source_are_one_download(
    mesh: Mesh, hub: FakeHub, big_gguf: bytes
) -> None:
    hub.add_repo("org/shared", {"shared.Q4_K_M.gguf": big_gguf})
    source = "hf:org/shared:shared.Q4_K_M.gguf"
    results: list[cpb.Model] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(
                collect(pull(mesh, source, bandwidth_limit_bytes_per_second=4_000_000))[1]
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    watchers = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and watchers < 2:
        pulls = mesh.provisioner.ListPulls(pb.ListPullsRequest(), timeout=10).pulls
        watchers = max((p.watcher_count for p in pulls), default=0)
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert not errors
    assert watchers == 2
    assert len(results) == 2 and results[0].name == results[1].name
    assert cdn_get_bytes(hub) == len(big_gguf)


def test_cancel_keeps_the_partial_and_a_new_pull_resumes(
    mesh: Mesh, hub: FakeHub, big_gguf: bytes
) -> None:
    hub.add_repo("org/slow", {"slow.Q4_K_M.gguf": big_gguf})
    source = "hf:org/slow:slow.Q4_K_M.gguf"
    stream = pull(mesh, source, bandwidth_limit_bytes_per_second=2_000_000)
    name = ""
    for msg in stream:
        progress = msg.progress
        name = progress.pull
        if progress.total_bytes.completed_bytes > 500_000:
            break
    started = time.monotonic()
    cancelled = mesh.provisioner.CancelPull(pb.CancelPullRequest(name=name), timeout=10)
    assert time.monotonic() - started < 2
    assert cancelled.state == pb.PULL_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    partials = list(mesh.hf_cache.rglob("*.partial"))
    assert len(partials) == 1 and partials[0].stat().st_size > 500_000
    kept = partials[0].stat().st_size
    model = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models[0]
    assert model.state != cpb.MODEL_STATE_READY

    sent_before = cdn_get_bytes(hub)
    events, model = collect(pull(mesh, source))
    assert model.sha256 == sha(big_gguf)
    assert cdn_get_bytes(hub) - sent_before == len(big_gguf) - kept
    assert any(e.total_bytes.reused_bytes >= kept for e in events)


def test_leaving_caller_cancels_only_when_last(mesh: Mesh, hub: FakeHub, big_gguf: bytes) -> None:
    hub.add_repo("org/leave", {"leave.Q4_K_M.gguf": big_gguf})
    stream = pull(
        mesh, "hf:org/leave:leave.Q4_K_M.gguf", bandwidth_limit_bytes_per_second=1_000_000
    )
    name = next(stream).progress.pull
    stream.cancel()
    deadline = time.monotonic() + 5
    state = None
    while time.monotonic() < deadline:
        state = mesh.provisioner.GetPull(pb.GetPullRequest(name=name), timeout=10).state
        if state == pb.PULL_STATE_CANCELLED:
            break
        time.sleep(0.05)
    assert state == pb.PULL_STATE_CANCELLED


def test_watch_get_list_delete(mesh: Mesh, hub: FakeHub, big_gguf: bytes) -> None:
    hub.add_repo("org/watch", {"watch.Q4_K_M.gguf": big_gguf})
    stream = pull(
        mesh, "hf:org/watch:watch.Q4_K_M.gguf", bandwidth_limit_bytes_per_second=8_000_000
    )
    name = next(stream).progress.pull
    watched = mesh.provisioner.WatchPull(pb.WatchPullRequest(name=name), timeout=60)
    _, model_a = collect(stream)
    _, model_b = collect(watched)
    assert model_a.name == model_b.name

    record = mesh.provisioner.GetPull(pb.GetPullRequest(name=name), timeout=10)
    assert record.state == pb.PULL_STATE_SUCCEEDED
    assert record.files[0].sha256 == sha(big_gguf)
    assert record.files[0].state == pb.PULL_FILE_STATE_DONE
    assert record.HasField("end_time")
    # Watching a finished pull gives its model at once.
    _, again = collect(mesh.provisioner.WatchPull(pb.WatchPullRequest(name=name), timeout=10))
    assert again.name == model_a.name

    listed = mesh.provisioner.ListPulls(
        pb.ListPullsRequest(filter="state=succeeded AND source=huggingface"), timeout=10
    )
    assert [p.name for p in listed.pulls] == [name]
    assert (
        mesh.provisioner.ListPulls(pb.ListPullsRequest(filter="state=failed"), timeout=10).pulls
        == []
    )
    with pytest.raises(grpc.RpcError) as info:
        mesh.provisioner.ListPulls(pb.ListPullsRequest(filter="colour=blue"), timeout=10)
    assert error_reason(info.value) == "INVALID_FILTER"

    mesh.provisioner.DeletePull(pb.DeletePullRequest(name=name), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        mesh.provisioner.GetPull(pb.GetPullRequest(name=name), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(info.value) == "PULL_NOT_FOUND"


def test_civitai_pull_with_token_and_without(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, small_gguf: bytes
) -> None:
    from tests.fixtures.safetensors_models import sdxl_tensors, write_header_only_safetensors

    st_path = write_header_only_safetensors(tmp_path / "model.safetensors", sdxl_tensors())
    civitai.add_version(
        4242,
        model_id=77,
        model_name="Tiny XL",
        files=[CivitaiFile(name="tinyXL_v10.safetensors", data=st_path)],
        base_model="SDXL 1.0",
        require_auth=True,
    )
    civitai.valid_tokens.add(CIVITAI_TOKEN)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    with running_mesh(home_a, hf_endpoint=hub.endpoint, civitai_endpoint=civitai.endpoint) as mesh:
        with pytest.raises(grpc.RpcError) as info:
            list(pull(mesh, "civitai:4242", timeout=20))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(info.value) == "TOKEN_MISSING"
        assert "CIVITAI_API_TOKEN" in (info.value.details() or "")
    with running_mesh(
        home_b,
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        civitai_token=CIVITAI_TOKEN,
    ) as mesh:
        _, model = collect(pull(mesh, "civitai:4242"))
        assert model.state == cpb.MODEL_STATE_READY
        assert model.source.base_model == "SDXL 1.0"
        assert model.source.civitai_version_id == 4242
        assert model.metadata.family == "sdxl"
        assert model.sha256 == sha(st_path.read_bytes())
        assert Path(model.paths[0]).name == "tinyXL_v10.safetensors"
    assert not any("authorization" in r.headers for r in civitai.cdn.requests)


def test_url_and_local_sources(mesh: Mesh, hub: FakeHub, tmp_path: Path, small_gguf: bytes) -> None:
    key = hub.cdn.add_blob(small_gguf)
    url = hub.cdn.url_for(key, "plain.gguf")
    _, model = collect(pull(mesh, url))
    assert model.state == cpb.MODEL_STATE_READY
    assert model.sha256 == sha(small_gguf)
    assert model.source.kind == cpb.SOURCE_KIND_URL
    assert "X-Signature" not in model.source.url  # no signed query stored

    local = tmp_path / "mine.gguf"
    local.write_bytes(small_gguf)
    _, model = collect(pull(mesh, f"file:{local}"))
    assert model.paths == [str(local)]  # registered in place
    assert model.state == cpb.MODEL_STATE_READY
    with pytest.raises(grpc.RpcError) as info:
        list(pull(mesh, str(tmp_path / "absent.gguf"), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_validate_only_registers_nothing(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo("org/dry", {"dry.Q4_K_M.gguf": small_gguf})
    _, model = collect(pull(mesh, "hf:org/dry", validate_only=True))
    assert model.source.files == ["dry.Q4_K_M.gguf"]
    assert mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models == []
    assert cdn_get_bytes(hub) == 0


def test_metrics_count_bytes_and_failures(mesh: Mesh, hub: FakeHub, small_gguf: bytes) -> None:
    hub.add_repo("org/metrics", {"m.Q4_K_M.gguf": small_gguf})
    collect(pull(mesh, "hf:org/metrics:m.Q4_K_M.gguf"))
    with pytest.raises(grpc.RpcError):
        list(pull(mesh, "hf:org/metrics:absent.gguf", timeout=20))
    assert mesh.metrics_port is not None
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert (
        f'rbee_provisioner_downloaded_bytes_total{{source="huggingface"}} {float(len(small_gguf))}'
        in text
    )
    assert 'rbee_provisioner_pull_failures_total{reason="REMOTE_FILE_NOT_FOUND"} 1.0' in text
    assert "rbee_provisioner_active_pulls 0.0" in text


def test_tokens_never_leak(
    tmp_path: Path,
    hub: FakeHub,
    civitai: FakeCivitai,
    small_gguf: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    hub.add_repo("org/private", {"p.Q4_K_M.gguf": small_gguf}, private=True)
    hub.valid_tokens.add(HF_TOKEN)
    civitai.add_version(
        9,
        model_id=9,
        model_name="x",
        files=[CivitaiFile(name="x.safetensors", data=b"junk")],
        require_auth=True,
    )
    seen: list[str] = []
    with running_mesh(
        tmp_path,
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        hf_token=HF_TOKEN,
        civitai_token=CIVITAI_TOKEN,  # not accepted by the fake: the download is refused
    ) as mesh:
        events, model = collect(pull(mesh, "hf:org/private:p.Q4_K_M.gguf"))
        seen += [str(e) for e in events] + [str(model)]
        for source in ("civitai:9", "hf:org/private:absent.gguf", "hf:org/nothere:x.gguf"):
            try:
                for msg in pull(mesh, source, timeout=20):
                    seen.append(str(msg))
            except grpc.RpcError as exc:
                seen.append(str(exc.details()))
                seen.append(str(exc.trailing_metadata()))
        for p in mesh.provisioner.ListPulls(pb.ListPullsRequest(), timeout=10).pulls:
            seen.append(str(p))
        for m in mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models:
            seen.append(str(m))
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{mesh.metrics_port}/metrics", timeout=10
        )
        seen.append(metrics.read().decode())
    stored = b"".join(
        p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < 10_000_000
    )
    everything = "\n".join(seen) + caplog.text
    for token in (HF_TOKEN, CIVITAI_TOKEN):
        assert token not in everything
        assert token.encode() not in stored


# --- the files of one pull, at once ------------------------------------------------------------


@pytest.fixture(scope="module")
def split_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A split GGUF in three parts of about 0.5 MB, by file name."""
    paths = write_split_gguf(tmp_path_factory.mktemp("split"), "big-Q4_K_M", 3)
    return {path.name: path.read_bytes() for path in paths}


def blob_requests(hub: FakeHub) -> list[RequestRecord]:
    return [r for r in hub.cdn.requests if r.blob is not None and r.method == "GET"]


def test_the_files_of_a_pull_transfer_at_once(
    mesh: Mesh, hub: FakeHub, split_parts: dict[str, bytes]
) -> None:
    hub.add_repo("org/split-GGUF", split_parts)
    resolved = mesh.provisioner.ResolveSource(
        pb.ResolveSourceRequest(source="hf:org/split-GGUF"), timeout=20
    )
    # Every part pauses 0.3 s after its first 100 kB: one at a time, no two transfers could
    # overlap; at once, all three are in flight before any ends.
    hub.cdn.faults.stall_after_bytes = 100_000
    hub.cdn.faults.stall_seconds = 0.3
    hub.cdn.faults.stall_count = 3
    events, model = collect(pull(mesh, "hf:org/split-GGUF"))
    assert model.state == cpb.MODEL_STATE_READY
    snapshot = Path(model.paths[0]).parent  # the first part names the model
    assert {name: (snapshot / name).read_bytes() for name in split_parts} == split_parts
    requests = blob_requests(hub)
    assert len(requests) == 3
    ends = [r.ended for r in requests]
    assert all(end is not None for end in ends)
    assert max(r.started for r in requests) < min(end for end in ends if end is not None)
    downloading = [e for e in events if e.state == pb.PULL_STATE_DOWNLOADING and e.file_index]
    assert {e.file_count for e in downloading} == {3}
    assert len({e.file_index for e in downloading}) >= 2  # events name the file that moved
    pulled = mesh.provisioner.ListPulls(pb.ListPullsRequest(), timeout=10).pulls[0]
    assert [f.sha256 for f in pulled.files] == [sha(data) for data in split_parts.values()]
    # Named after the repo and its quantization, as ResolveSource said beforehand.
    assert model.name == f"models/{resolved.model_id}"
    assert resolved.model_id.startswith("split-q4-k-m-"), resolved.model_id


def test_parallel_files_one_transfers_one_file_after_the_other(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai, split_parts: dict[str, bytes]
) -> None:
    hub.add_repo("org/split-GGUF", split_parts)
    with running_mesh(
        tmp_path / "home",
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        parallel_files=1,
    ) as serial:
        _, model = collect(pull(serial, "hf:org/split-GGUF"))
    assert model.state == cpb.MODEL_STATE_READY
    requests = blob_requests(hub)
    assert len(requests) == 3
    for before, after in itertools.pairwise(requests):
        assert before.ended is not None and before.ended <= after.started


def test_a_failed_file_stops_the_others_and_keeps_their_bytes(
    mesh: Mesh, hub: FakeHub, split_parts: dict[str, bytes]
) -> None:
    hub.add_repo("org/split-GGUF", split_parts)
    names = list(split_parts)
    hub.cdn.remove_blob(sha(split_parts[names[1]]))  # the CDN lost the second part
    hub.cdn.faults.stall_after_bytes = 100_000  # the others hang after 100 kB ...
    hub.cdn.faults.stall_seconds = 30.0  # ... longer than this test may take
    hub.cdn.faults.stall_count = 2
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        collect(pull(mesh, "hf:org/split-GGUF"))
    assert time.monotonic() - started < 15, "the stalled parts were not stopped"
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert names[1] in (info.value.details() or "")
    pulled = mesh.provisioner.ListPulls(pb.ListPullsRequest(), timeout=10).pulls[0]
    assert pulled.state == pb.PULL_STATE_FAILED
    # The stalled parts keep what they received, for a later resume.
    partials = sorted(mesh.hf_cache.rglob("*.partial"))
    assert [p.stat().st_size for p in partials] == [100_000, 100_000]
    models = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
    assert [m.state for m in models] == [cpb.MODEL_STATE_FAILED]
