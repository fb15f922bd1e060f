"""HF and CivitAI tokens never leave the provisioner's memory except towards their upstream.

Issue 7, "Secrets": `rbee-catalog` and `rbee-provisioner` run as subprocesses (DEBUG logging,
metrics on) with recognisable tokens in HF_TOKEN and CIVITAI_API_TOKEN, against the fake Hub and
the fake CivitAI. Pulls succeed (a private repo, an auth-only CivitAI version), fail (gated repo,
404 repo, 404 file, 404 version, a hash mismatch, wrong tokens after a restart with other
tokens) and are cancelled mid-transfer (partial and its state kept on disk). Then everything the
services wrote or said is searched for the tokens (and for a long prefix of each, in case one is
cut): their stdout/stderr logs, every stream event, error message and trailing metadata the
client saw, Get/ListPulls and ListModels, both /metrics pages, the catalog database and every
file under RBEE_HOME and the HF cache (pull records, partial files and their metadata).

Run issue 7's tests alone with `-k security`.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.security]

HF_TOKEN = "hf_SECRETCANARYhub0123456789abcdefXYZ"
CIVITAI_TOKEN = "civitaiSECRETCANARY0123456789abcdef"
WRONG_HF_TOKEN = "hf_SECRETCANARYwrong9876543210fedcbaQ"
WRONG_CIVITAI_TOKEN = "civitaiSECRETCANARYwrong98765432100"
TOKENS = (HF_TOKEN, CIVITAI_TOKEN, WRONG_HF_TOKEN, WRONG_CIVITAI_TOKEN)
PREFIX_CHARS = 20  # a token cut short would still show this much


@dataclass
class Mesh:
    """The two services as subprocesses, and everything a client saw from them."""

    root: Path
    env: dict[str, str]
    catalog_port: int
    provisioner_port: int
    catalog_metrics: int
    provisioner_metrics: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    provisioner: subprocess.Popen[bytes] | None = None
    seen: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def start(self, name: str, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}-{time.monotonic_ns()}.out").open("wb")
        err = (self.logs / f"{name}-{time.monotonic_ns()}.err").open("wb")
        process = subprocess.Popen(
            [str(BIN / name)], env={**os.environ, **self.env, **extra_env}, stdout=out, stderr=err
        )
        self.processes.append(process)
        return process

    def start_provisioner(self, hf_token: str, civitai_token: str) -> None:
        self.provisioner = self.start(
            "rbee-provisioner", {"HF_TOKEN": hf_token, "CIVITAI_API_TOKEN": civitai_token}
        )
        wait_healthy(f"127.0.0.1:{self.provisioner_port}", self.provisioner,
                     name="rbee-provisioner", timeout=60)  # fmt: skip

    def stop_provisioner(self) -> None:
        assert self.provisioner is not None
        self.provisioner.terminate()
        self.provisioner.wait(timeout=30)

    def stub(self) -> provisioner_pb2_grpc.ProvisionerServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.provisioner_port}")
        return provisioner_pb2_grpc.ProvisionerServiceStub(channel)

    def pull(self, source: str, *, timeout: float = 60, **options: object) -> grpc.StatusCode:
        """Run a pull to its end, keeping every event and error the client sees."""
        request = pb.PullModelRequest(source=source, options=pb.PullOptions(**options))  # type: ignore[arg-type]
        try:
            for message in self.stub().PullModel(request, timeout=timeout):
                self.seen.append(str(message))
        except grpc.RpcError as err:
            self.record_error(err)
            return err.code()
        return grpc.StatusCode.OK

    def record_error(self, err: grpc.RpcError) -> None:
        self.seen += [
            str(err.details()),
            str(err.trailing_metadata()),
            str(err.debug_error_string()),
        ]

    def record_state(self) -> None:
        """The pulls, the models and both /metrics pages, as a client would read them."""
        stub = self.stub()
        for item in stub.ListPulls(pb.ListPullsRequest(), timeout=10).pulls:
            self.seen.append(str(item))
            self.seen.append(str(stub.GetPull(pb.GetPullRequest(name=item.name), timeout=10)))
        with grpc.insecure_channel(f"127.0.0.1:{self.catalog_port}") as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            self.seen += map(str, catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models)
        for port in (self.catalog_metrics, self.provisioner_metrics):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                self.seen.append(page.read().decode())


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def civitai() -> Iterator[FakeCivitai]:
    with FakeCivitai() as fake:
        yield fake


@pytest.fixture
def mesh(tmp_path: Path, hub: FakeHub, civitai: FakeCivitai) -> Iterator[Mesh]:
    ports = [free_port() for _ in range(4)]
    env = {
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_LOG_LEVEL": "DEBUG",
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{ports[0]}",
        "RBEE_CATALOG_METRICS_LISTEN": f"127.0.0.1:{ports[2]}",
        "RBEE_PROVISIONER_LISTEN": f"127.0.0.1:{ports[1]}",
        "RBEE_PROVISIONER_METRICS_LISTEN": f"127.0.0.1:{ports[3]}",
        "RBEE_PROVISIONER_CATALOG_ADDRESS": f"127.0.0.1:{ports[0]}",
        "RBEE_PROVISIONER_BACKOFF_INITIAL": "0.05",
        "RBEE_PROVISIONER_BACKOFF_MAX": "0.2",
        "RBEE_PROVISIONER_MAX_RETRIES": "1",
        "RBEE_PROVISIONER_RESUME_ON_START": "false",
        "RBEE_PROVISIONER_REGISTER_SYSTEM_INSTALLS": "false",
        "RBEE_PROVISIONER_CIVITAI_ENDPOINT": civitai.endpoint,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
    }
    running = Mesh(tmp_path, env, ports[0], ports[1], ports[2], ports[3])
    running.logs.mkdir()
    try:
        catalog = running.start("rbee-catalog", {})
        wait_healthy(f"127.0.0.1:{ports[0]}", catalog, name="rbee-catalog", timeout=30)
        yield running
    finally:
        for process in running.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def leaks(text: str | bytes) -> list[str]:
    """The tokens (or their prefixes) found in `text`."""
    data = text.encode() if isinstance(text, str) else text
    return [
        token for token in TOKENS if token.encode() in data or token[:PREFIX_CHARS].encode() in data
    ]


def test_security_tokens_never_appear_in_anything_the_services_write_or_say(
    mesh: Mesh, hub: FakeHub, civitai: FakeCivitai, tmp_path: Path
) -> None:
    small = write_tiny_llama_gguf(tmp_path / "small.gguf", n_layer=1, n_vocab=260).read_bytes()
    big = write_tiny_llama_gguf(
        tmp_path / "big.gguf", n_vocab=2048, n_embd=256, n_ff=512, n_layer=4
    ).read_bytes()
    hub.valid_tokens.add(HF_TOKEN)
    hub.add_repo("org/private", {"p.Q4_K_M.gguf": small}, private=True)
    hub.add_repo("org/private2", {"q.Q4_K_M.gguf": small}, private=True)
    hub.add_repo("org/gated", {"g.Q4_K_M.gguf": small}, gated=True)
    hub.add_repo("org/liar", {"l.Q4_K_M.gguf": big})
    hub.set_advertised_sha256("org/liar", "l.Q4_K_M.gguf", "0" * 64)
    hub.add_repo("org/big", {"b.Q4_K_M.gguf": big})
    civitai.valid_tokens.add(CIVITAI_TOKEN)
    for version, name, data, locked in ((501, "locked", small, True),
                                        (503, "locked2", small, True),
                                        (502, "open", big, False)):  # fmt: skip
        civitai.add_version(
            version,
            model_id=version,
            model_name=name,
            require_auth=locked,
            files=[CivitaiFile(name=f"{name}.gguf", data=data, format="GGUF")],
        )

    mesh.start_provisioner(HF_TOKEN, CIVITAI_TOKEN)
    outcomes = {
        "private": mesh.pull("hf:org/private:p.Q4_K_M.gguf"),
        "civitai auth": mesh.pull("civitai:501"),
        "gated": mesh.pull("hf:org/gated:g.Q4_K_M.gguf", timeout=30),
        "no repo": mesh.pull("hf:org/absent:x.gguf", timeout=30),
        "no file": mesh.pull("hf:org/private:absent.gguf", timeout=30),
        "no version": mesh.pull("civitai:999999", timeout=30),
        "hash mismatch": mesh.pull("hf:org/liar:l.Q4_K_M.gguf", timeout=30),
    }
    # Cancelled mid-transfer: the partial file and its state stay on disk for resume.
    stub = mesh.stub()
    stream = stub.PullModel(
        pb.PullModelRequest(
            source="hf:org/big:b.Q4_K_M.gguf",
            options=pb.PullOptions(bandwidth_limit_bytes_per_second=500_000),
        ),
        timeout=60,
    )
    for message in stream:
        mesh.seen.append(str(message))
        progress = message.progress
        if progress.file_bytes.completed_bytes > 0:
            mesh.seen.append(str(stub.CancelPull(pb.CancelPullRequest(name=progress.pull),
                                                 timeout=10)))  # fmt: skip
            break
    try:
        for message in stream:
            mesh.seen.append(str(message))
    except grpc.RpcError as err:
        mesh.record_error(err)
    outcomes["cancelled"] = grpc.StatusCode.CANCELLED
    mesh.record_state()

    # Wrong tokens: both upstreams refuse them.
    mesh.stop_provisioner()
    mesh.start_provisioner(WRONG_HF_TOKEN, WRONG_CIVITAI_TOKEN)
    outcomes["wrong hf token"] = mesh.pull("hf:org/private2:q.Q4_K_M.gguf", timeout=30)
    outcomes["wrong civitai token"] = mesh.pull("civitai:503", timeout=30)
    outcomes["civitai anonymous-ok"] = mesh.pull("civitai:502", timeout=60)
    mesh.record_state()
    mesh.stop_provisioner()

    # The scenarios happened as intended (else the search below proves little).
    assert outcomes["private"] == grpc.StatusCode.OK
    assert outcomes["civitai auth"] == grpc.StatusCode.OK
    assert outcomes["civitai anonymous-ok"] == grpc.StatusCode.OK
    for failing in ("gated", "no repo", "no file", "no version", "hash mismatch",
                    "wrong hf token", "wrong civitai token"):  # fmt: skip
        assert outcomes[failing] != grpc.StatusCode.OK, failing
    # The cancelled pull kept its partial bytes (with their hash state): searched below too.
    partials = [p for p in mesh.root.rglob("*.partial") if p.is_file()]
    assert partials, "the cancelled pull left no partial file"

    problems = [f"client-visible text: {needle}" for needle in leaks("\n".join(mesh.seen))]
    written = [p for p in (*mesh.home.rglob("*"), *(mesh.root / "hf-cache").rglob("*"),
                           *mesh.logs.rglob("*")) if p.is_file()]  # fmt: skip
    assert any(p.suffix == ".db" or "catalog" in p.name for p in written), "no catalog db found"
    assert any(p.stat().st_size > 0 for p in mesh.logs.iterdir()), "the services logged nothing"
    for path in written:
        problems += [f"{path}: {needle}" for needle in leaks(path.read_bytes())]
        problems += [f"file name {path}: {needle}" for needle in leaks(str(path))]
    assert not problems, "tokens leaked:\n" + "\n".join(problems)
