"""The fakes follow the real protocols: checked with the real huggingface_hub and http.client.

FakeHub against huggingface_hub 2.x (downloads, snapshot, model_info, tree, list_models and the
error mapping), the FakeCdn's Range/206/416 and every fault, FakeCivitai's JSON and download
redirects with and without tokens.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.fixtures.fake_cdn import FakeCdn
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub, git_blob_sha1

pytestmark = pytest.mark.integration

TOKEN = "hf_fake_valid_token"
CIVITAI_TOKEN = "civitai_fake_token"


def _payload(size: int, seed: int) -> bytes:
    """Deterministic non-repeating bytes (so a shifted or flipped byte changes the hash)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


SMALL = b'{"architectures": ["LlamaForCausalLM"]}'
BIG = _payload(200_000, 1)
NESTED = _payload(5_000, 2)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started FakeHub with huggingface_hub isolated from the user's home and the network."""
    with FakeHub(lfs_threshold=1024) as fake:
        home = tmp_path / "hf_home"
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        # constants are read at import time: patch the module too (the env is for subprocesses).
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        # No user-agent telemetry: it would fetch an agent registry from the real Hub.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        fake.valid_tokens.add(TOKEN)
        fake.add_repo(
            "org/tiny",
            {"config.json": SMALL, "model.safetensors": BIG, "sub/dir/extra.bin": NESTED},
            pipeline_tag="text-generation",
            library_name="transformers",
            license="mit",
            downloads=10,
            likes=3,
        )
        yield fake


def _get(
    base_url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request with http.client (no redirects followed)."""
    parts = urlsplit(base_url + path if path.startswith("/") else path)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


# ------------------------------------------------------------------------ Hub + huggingface_hub


def test_hf_hub_download_small_and_lfs_token_goes_to_hub_not_cdn(
    hub: FakeHub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    small = hf_hub_download(
        "org/tiny", "config.json", endpoint=hub.endpoint, cache_dir=cache, token=TOKEN
    )
    big = hf_hub_download(
        "org/tiny", "model.safetensors", endpoint=hub.endpoint, cache_dir=cache, token=TOKEN
    )
    assert Path(small).read_bytes() == SMALL
    assert Path(big).read_bytes() == BIG
    # Blob names are the etags: git sha1 for the small file, sha256 for the LFS file.
    blobs = {p.name for p in (cache / "models--org--tiny" / "blobs").iterdir()}
    assert blobs == {git_blob_sha1(SMALL), hashlib.sha256(BIG).hexdigest()}

    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert [r.status for r in heads] == [200, 302]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in heads)
    cdn_gets = [r for r in hub.cdn.requests if r.method == "GET"]
    assert len(cdn_gets) == 1 and cdn_gets[0].status == 200
    assert "authorization" not in cdn_gets[0].headers
    assert hub.cdn.body_bytes_sent(hashlib.sha256(BIG).hexdigest()) == len(BIG)


def test_snapshot_download_gets_every_file_of_a_nested_repo(hub: FakeHub, tmp_path: Path) -> None:
    folder = Path(snapshot_download("org/tiny", endpoint=hub.endpoint, cache_dir=tmp_path))
    assert (folder / "config.json").read_bytes() == SMALL
    assert (folder / "model.safetensors").read_bytes() == BIG
    assert (folder / "sub" / "dir" / "extra.bin").read_bytes() == NESTED
    paths = [r.path for r in hub.requests]
    assert "/api/models/org/tiny/revision/main" in paths
    assert any(p.startswith("/api/models/org/tiny/tree/") for p in paths)


def test_model_info_files_metadata_shows_lfs_sha256(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.endpoint)
    info = api.model_info("org/tiny", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {"config.json", "model.safetensors", "sub/dir/extra.bin"}
    big = siblings["model.safetensors"]
    assert big.lfs is not None and big.lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert big.size == len(BIG)
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_sha1(SMALL)
    assert info.pipeline_tag == "text-generation" and info.library_name == "transformers"
    assert info.card_data is not None and info.card_data.get("license") == "mit"
    plain = api.model_info("org/tiny")  # without blobs=true: names only, as the real Hub
    assert all(s.size is None for s in plain.siblings or [])


def test_list_repo_tree_recursive_paths_and_pagination(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.endpoint)
    top = {e.path for e in api.list_repo_tree("org/tiny")}
    assert top == {"config.json", "model.safetensors", "sub"}
    hub.page_size = 2  # force Link rel="next" pages
    entries = list(api.list_repo_tree("org/tiny", recursive=True))
    assert {e.path for e in entries} == {
        "config.json",
        "model.safetensors",
        "sub",
        "sub/dir",
        "sub/dir/extra.bin",
    }
    tree_calls = [r for r in hub.requests if "/tree/" in r.path]
    assert len(tree_calls) == 1 + 3  # the first listing, then 3 pages of 2, 2, 1
    lfs = [e for e in entries if getattr(e, "lfs", None) is not None]
    assert [e.path for e in lfs] == ["model.safetensors", "sub/dir/extra.bin"]
    assert all(getattr(e, "xet_hash", None) is None for e in entries)
    sub = {e.path for e in api.list_repo_tree("org/tiny", path_in_repo="sub/dir")}
    assert sub == {"sub/dir/extra.bin"}


def test_list_models_search_filter_sort_and_pages(hub: FakeHub) -> None:
    for index, name in enumerate(["llama-a-GGUF", "llama-b-GGUF", "llama-c-GGUF"]):
        hub.add_repo(
            f"gguf-org/{name}",
            {"model.Q4_K_M.gguf": _payload(2000, index)},
            library_name="gguf",
            pipeline_tag="text-generation",
            downloads=100 * (index + 1),
        )
    hub.add_repo("gguf-org/llama-secret", {"a.gguf": b"x"}, private=True)
    hub.page_size = 2
    api = HfApi(endpoint=hub.endpoint)
    found = list(api.list_models(search="llama", sort="downloads", full=True))
    assert [m.id for m in found] == [
        "gguf-org/llama-c-GGUF",
        "gguf-org/llama-b-GGUF",
        "gguf-org/llama-a-GGUF",
    ]
    assert found[0].downloads == 300 and found[0].sha is not None
    assert [s.rfilename for s in found[0].siblings or []] == ["model.Q4_K_M.gguf"]
    search_calls = [r for r in hub.requests if r.path == "/api/models"]
    assert len(search_calls) == 2 and "cursor=2" in search_calls[1].query
    assert [m.id for m in api.list_models(filter="transformers")] == ["org/tiny"]
    assert len(list(api.list_models(author="gguf-org", limit=1))) == 1
    with_token = [m.id for m in HfApi(endpoint=hub.endpoint, token=TOKEN).list_models(search="sec")]
    assert with_token == ["gguf-org/llama-secret"]  # private repos only with a valid token


def test_error_mapping_repo_revision_entry(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/private", {"a.txt": b"a"}, private=True)
    api = HfApi(endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/private")
    assert api.model_info("org/private", token=TOKEN).id == "org/private"
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            "org/tiny", "config.json", revision="nope", endpoint=hub.endpoint, cache_dir=tmp_path
        )
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/tiny", "missing.bin", endpoint=hub.endpoint, cache_dir=tmp_path)
    statuses = [(r.path, r.status) for r in hub.requests]
    assert ("/api/models/org/missing", 401) in statuses  # unauthenticated: 401, as the real Hub
    entry = next(r for r in hub.requests if r.path.endswith("/missing.bin"))
    assert entry.status == 404


def test_gated_repo_and_invalid_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/gated", {"w.bin": BIG}, gated=True)
    hub.granted_tokens.add("hf_granted")
    kwargs: dict[str, Any] = {"endpoint": hub.endpoint, "cache_dir": tmp_path}
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "w.bin", **kwargs)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "w.bin", token=TOKEN, **kwargs)
    assert [r.status for r in hub.requests if r.method == "HEAD"] == [401, 403]
    path = hf_hub_download("org/gated", "w.bin", token="hf_granted", **kwargs)
    assert Path(path).read_bytes() == BIG
    # Gated metadata stays public, as on the real Hub.
    assert HfApi(endpoint=hub.endpoint).model_info("org/gated").gated == "auto"
    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(endpoint=hub.endpoint, token="hf_stale").model_info("org/tiny")
    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert caught.value.response is not None and caught.value.response.status_code == 401


def test_revisions_branch_and_commit_sha(hub: FakeHub, tmp_path: Path) -> None:
    dev_sha = hub.add_repo("org/tiny", {"config.json": b'{"dev": true}'}, revision="dev")
    main_sha = HfApi(endpoint=hub.endpoint).model_info("org/tiny").sha
    assert main_sha != dev_sha and len(dev_sha) == 40
    kwargs: dict[str, Any] = {"endpoint": hub.endpoint, "cache_dir": tmp_path}
    by_branch = hf_hub_download("org/tiny", "config.json", revision="dev", **kwargs)
    assert Path(by_branch).read_bytes() == b'{"dev": true}'
    by_sha = hf_hub_download("org/tiny", "config.json", revision=main_sha, **kwargs)
    assert Path(by_sha).read_bytes() == SMALL
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tiny", "config.json", revision=dev_sha[:12], **kwargs)


def test_advertised_sha256_lie_and_resolve_headers(hub: FakeHub) -> None:
    lie = "ab" * 32
    hub.set_advertised_sha256("org/tiny", "model.safetensors", lie)
    status, headers, _ = _get(
        hub.endpoint, "/org/tiny/resolve/main/model.safetensors", method="HEAD"
    )
    assert status == 302
    assert headers["x-linked-etag"] == f'"{lie}"'
    assert headers["x-linked-size"] == str(len(BIG))
    assert len(headers["x-repo-commit"]) == 40
    location = urlsplit(headers["location"])
    assert location.port != urlsplit(hub.endpoint).port  # the CDN is another origin
    info = HfApi(endpoint=hub.endpoint).model_info("org/tiny", files_metadata=True)
    big = next(s for s in info.siblings or [] if s.rfilename == "model.safetensors")
    assert big.lfs is not None and big.lfs.sha256 == lie
    # The CDN still serves the real bytes, so a verifying client sees a mismatch.
    _, _, body = _get(headers["location"], headers["location"])
    assert hashlib.sha256(body).hexdigest() != lie and body == BIG
    status, headers, _ = _get(hub.endpoint, "/org/tiny/resolve/main/config.json", method="HEAD")
    assert status == 200 and headers["etag"] == f'"{git_blob_sha1(SMALL)}"'
    assert headers["content-length"] == str(len(SMALL))


def test_hub_api_fail_status_counts_down(hub: FakeHub) -> None:
    hub.faults.fail_status = 503
    hub.faults.fail_count = 2
    codes = [_get(hub.endpoint, "/api/models/org/tiny")[0] for _ in range(3)]
    assert codes == [503, 503, 200]
    assert hub.faults.fail_status is None


# ------------------------------------------------------------------------ CDN


@pytest.fixture
def cdn() -> Iterator[FakeCdn]:
    """A started FakeCdn."""
    with FakeCdn() as fake:
        yield fake


def test_cdn_ranges_206_416_head_and_disposition(cdn: FakeCdn, tmp_path: Path) -> None:
    data = _payload(10_000, 3)
    key = cdn.add_blob(data)
    assert key == hashlib.sha256(data).hexdigest()
    url = cdn.url_for(key, "model.Q4_K_M.gguf")
    status, headers, body = _get(url, url)
    assert status == 200 and body == data
    assert headers["content-disposition"] == 'attachment; filename="model.Q4_K_M.gguf";'
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = _get(url, url, {"Range": "bytes=100-199"})
    assert (status, body) == (206, data[100:200])
    assert headers["content-range"] == "bytes 100-199/10000"
    status, headers, body = _get(url, url, {"Range": "bytes=9000-"})
    assert (status, body, headers["content-range"]) == (206, data[9000:], "bytes 9000-9999/10000")
    status, headers, body = _get(url, url, {"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, headers, _ = _get(url, url, {"Range": "bytes=10000-"})
    assert status == 416 and headers["content-range"] == "bytes */10000"
    status, headers, body = _get(url, url, method="HEAD")
    assert (status, headers["content-length"], body) == (200, "10000", b"")
    forged = url.replace("X-Signature=", "X-Signature=0")
    assert _get(forged, forged)[0] == 403
    assert [r.range for r in cdn.requests[:3]] == [None, "bytes=100-199", "bytes=9000-"]
    assert cdn.requests[1].body_bytes == 100


def test_cdn_serves_a_file_without_hashing_it_and_keeps_alive(cdn: FakeCdn, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = _payload(3 * 1024 * 1024 + 7, 4)
    path.write_bytes(data)
    key = cdn.add_blob(path, sha256="cd" * 32)
    assert key == "cd" * 32
    parts = urlsplit(cdn.url_for(key, "big.bin"))
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        for first in (0, 1_000_000):  # two requests on one keep-alive connection
            conn.request("GET", f"{parts.path}?{parts.query}", headers={"Range": f"bytes={first}-"})
            resp = conn.getresponse()
            assert resp.status == 206 and resp.read() == data[first:]
    finally:
        conn.close()
    assert cdn.body_bytes_sent(key) == 2 * len(data) - 1_000_000


def _read_all(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str | None]:
    """Read a body until EOF; returns (status, bytes received, error name or None)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers=headers or {})
        resp = conn.getresponse()
        received = bytearray()
        try:
            while chunk := resp.read1(65536):
                received += chunk
        except http.client.IncompleteRead as exc:
            received += exc.partial
            return resp.status, bytes(received), "IncompleteRead"
        if resp.length:  # http.client leaves length > 0 when the peer closed early
            return resp.status, bytes(received), "IncompleteRead"
        return resp.status, bytes(received), None
    finally:
        conn.close()


def _add(cdn: FakeCdn, data: bytes, storage: str, tmp_path: Path) -> str:
    """Register data in memory or as a file (the sendfile path)."""
    if storage == "bytes":
        return cdn.add_blob(data)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return cdn.add_blob(path)


@pytest.mark.parametrize("storage", ["bytes", "file"])
def test_cdn_fault_drop_after_bytes_counts_down(cdn: FakeCdn, storage: str, tmp_path: Path) -> None:
    data = _payload(100_000, 5)
    url = cdn.url_for(_add(cdn, data, storage, tmp_path), "f.bin")
    cdn.faults.drop_after_bytes = 1234
    cdn.faults.drop_count = 2
    for _ in range(2):
        status, body, error = _read_all(url)
        assert (status, body, error) == (200, data[:1234], "IncompleteRead")
    assert _read_all(url) == (200, data, None)
    assert cdn.faults.drop_after_bytes is None
    assert [r.body_bytes for r in cdn.requests] == [1234, 1234, 100_000]


def test_cdn_fault_stall_then_resume_and_stop_never_hangs(cdn: FakeCdn) -> None:
    data = _payload(50_000, 6)
    url = cdn.url_for(cdn.add_blob(data), "f.bin")
    cdn.faults.stall_after_bytes = 1000
    cdn.faults.stall_seconds = 0.3
    started = time.monotonic()
    assert _read_all(url) == (200, data, None)
    assert time.monotonic() - started >= 0.3
    # A long stall: the client sees the first bytes, then nothing; stop() ends it at once.
    cdn.faults.stall_after_bytes = 10
    cdn.faults.stall_seconds = 60
    result: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: result.update(r=_read_all(url)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while cdn.requests[-1].body_bytes < 10 or len(cdn.requests) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    cdn.stop()
    reader.join(timeout=5)
    assert time.monotonic() - started < 3
    assert result["r"] == (200, data[:10], "IncompleteRead")


@pytest.mark.parametrize("storage", ["bytes", "file"])
def test_cdn_fault_corrupt_flips_one_byte(cdn: FakeCdn, storage: str, tmp_path: Path) -> None:
    data = _payload(4096, 7)
    url = cdn.url_for(_add(cdn, data, storage, tmp_path), "f.bin")
    cdn.faults.corrupt = True
    _, body, _ = _read_all(url)
    assert len(body) == len(data) and hashlib.sha256(body).digest() != hashlib.sha256(data).digest()
    assert sum(a != b for a, b in zip(body, data, strict=True)) == 1
    _, tail, _ = _read_all(url, {"Range": "bytes=3000-"})  # a range without the middle byte
    assert tail == data[3000:]


def test_cdn_fault_ignore_range_and_fail_status(cdn: FakeCdn) -> None:
    data = _payload(2048, 8)
    url = cdn.url_for(cdn.add_blob(data), "f.bin")
    cdn.faults.ignore_range = True
    assert _read_all(url, {"Range": "bytes=100-"}) == (200, data, None)
    cdn.faults.ignore_range = False
    cdn.faults.fail_status = 503
    cdn.faults.fail_count = 2
    assert [_get(url, url)[0] for _ in range(3)] == [503, 503, 200]


# ------------------------------------------------------------------------ CivitAI


@pytest.fixture
def civitai() -> Iterator[FakeCivitai]:
    """A started FakeCivitai with one public and one login-only version."""
    with FakeCivitai() as fake:
        fake.valid_tokens.add(CIVITAI_TOKEN)
        fake.add_version(
            111,
            model_id=11,
            model_name="Tiny Checkpoint",
            files=[
                CivitaiFile("tinyCheckpoint_v10.safetensors", BIG),
                CivitaiFile("tinyVae.safetensors", NESTED, type="VAE", primary=False),
            ],
            base_model="SD 1.5",
            downloads=50,
            likes=5,
            tags=["anime"],
        )
        fake.add_version(
            222,
            model_id=22,
            model_name="Locked LoRA",
            files=[CivitaiFile("locked.safetensors", SMALL, sha256="00" * 32)],
            model_type="LORA",
            require_auth=True,
            downloads=500,
        )
        yield fake


def test_civitai_version_and_model_json(civitai: FakeCivitai) -> None:
    status, _, body = _get(civitai.endpoint, "/api/v1/model-versions/111")
    version = json.loads(body)
    assert status == 200
    assert (version["id"], version["modelId"], version["baseModel"]) == (111, 11, "SD 1.5")
    assert version["model"] == {
        "name": "Tiny Checkpoint",
        "type": "Checkpoint",
        "nsfw": False,
        "poi": False,
    }
    primary = version["files"][0]
    assert primary["hashes"]["SHA256"] == hashlib.sha256(BIG).hexdigest().upper()
    assert primary["hashes"]["AutoV2"] == primary["hashes"]["SHA256"][:10]
    assert primary["sizeKB"] * 1024 == len(BIG) and primary["primary"] is True
    assert primary["downloadUrl"] == f"{civitai.endpoint}/api/download/models/111"
    assert version["files"][1]["downloadUrl"].endswith("?type=VAE&format=SafeTensor")
    lie = json.loads(_get(civitai.endpoint, "/api/v1/model-versions/222")[2])
    assert lie["files"][0]["hashes"]["SHA256"] == "00" * 32
    by_hash = _get(
        civitai.endpoint, f"/api/v1/model-versions/by-hash/{hashlib.sha256(BIG).hexdigest()}"
    )
    assert json.loads(by_hash[2])["id"] == 111
    model = json.loads(_get(civitai.endpoint, "/api/v1/models/11")[2])
    assert [v["id"] for v in model["modelVersions"]] == [111] and model["tags"] == ["anime"]
    status, _, body = _get(civitai.endpoint, "/api/v1/model-versions/999")
    assert (status, json.loads(body)) == (404, {"error": "Model not found"})


def test_civitai_search_filters_and_cursor(civitai: FakeCivitai) -> None:
    status, _, body = _get(civitai.endpoint, "/api/v1/models?sort=Most%20Downloaded&limit=1")
    first = json.loads(body)
    assert status == 200 and [m["id"] for m in first["items"]] == [22]
    next_cursor = first["metadata"]["nextCursor"]
    second = json.loads(_get(first["metadata"]["nextPage"], first["metadata"]["nextPage"])[2])
    assert [m["id"] for m in second["items"]] == [11] and "nextCursor" not in second["metadata"]
    assert parse_qs(urlsplit(first["metadata"]["nextPage"]).query)["cursor"] == [next_cursor]
    lora = json.loads(_get(civitai.endpoint, "/api/v1/models?types=LORA")[2])
    assert [m["id"] for m in lora["items"]] == [22]
    sd15 = json.loads(_get(civitai.endpoint, "/api/v1/models?baseModels=SD%201.5&query=tiny")[2])
    assert [m["id"] for m in sd15["items"]] == [11]


def test_civitai_download_redirects_to_cdn_with_filename(civitai: FakeCivitai) -> None:
    status, headers, _ = _get(civitai.endpoint, "/api/download/models/111")
    assert status == 307 and headers["cache-control"] == "no-store"
    location = headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["response-content-disposition"] == [
        'attachment; filename="tinyCheckpoint_v10.safetensors"'
    ]
    status, headers, body = _get(location, location)
    assert status == 200 and body == BIG
    assert 'filename="tinyCheckpoint_v10.safetensors";' in headers["content-disposition"]
    vae = _get(civitai.endpoint, "/api/download/models/111?type=VAE&format=SafeTensor")[1]
    assert _get(vae["location"], vae["location"])[2] == NESTED
    assert _get(civitai.endpoint, "/api/download/models/111?type=Config")[0] == 404
    status, _, body = _get(civitai.endpoint, "/api/download/models/4242")
    assert status == 404 and json.loads(body)["error"] == "File not found"


def test_civitai_download_auth_bearer_and_query_token(civitai: FakeCivitai) -> None:
    path = "/api/download/models/222"
    status, _, body = _get(civitai.endpoint, path)
    assert status == 401
    assert json.loads(body) == {
        "error": "Unauthorized",
        "message": "The creator of this asset requires you to be logged in to download it",
    }
    assert _get(civitai.endpoint, path, {"Authorization": "Bearer wrong"})[0] == 401
    status, headers, _ = _get(civitai.endpoint, path, {"Authorization": f"Bearer {CIVITAI_TOKEN}"})
    assert status == 307
    assert _get(headers["location"], headers["location"])[2] == SMALL
    assert _get(civitai.endpoint, f"{path}?token={CIVITAI_TOKEN}")[0] == 307
    # The header wins over the query, as on the real site.
    bad_header = _get(
        civitai.endpoint, f"{path}?token={CIVITAI_TOKEN}", {"Authorization": "Bearer x"}
    )
    assert bad_header[0] == 401
    recorded = [r.headers.get("authorization") for r in civitai.requests]
    assert f"Bearer {CIVITAI_TOKEN}" in recorded
    assert all("authorization" not in r.headers for r in civitai.cdn.requests)
    browser = _get(civitai.endpoint, path, {"User-Agent": "Mozilla/5.0"})
    assert browser[0] == 401 and not browser[2].startswith(b"{")


def test_civitai_fail_status_on_the_api(civitai: FakeCivitai) -> None:
    civitai.faults.fail_status = 429
    status, _, body = _get(civitai.endpoint, "/api/v1/model-versions/111")
    assert status == 429 and "error" in json.loads(body)
    assert _get(civitai.endpoint, "/api/v1/model-versions/111")[0] == 200


def test_servers_bind_loopback_ephemeral_ports() -> None:
    with FakeHub() as hub, FakeCivitai() as civitai:
        ports = {urlsplit(u).port for u in (hub.endpoint, hub.cdn.base_url, civitai.endpoint)}
        assert len(ports) == 3
        assert all(urlsplit(u).hostname == "127.0.0.1" for u in (hub.endpoint, civitai.endpoint))
