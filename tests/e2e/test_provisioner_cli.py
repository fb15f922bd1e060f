"""`rbee-catalog` + `rbee-provisioner` as subprocesses against the fake Hub, driven by `rbee pull`.

The kill -9 test is the one the issue asks for: the provisioner killed at random points of a
large pull and restarted each time; the pull completes with the right sha256, reusing the bytes
on disk, and the catalog never shows the model READY before that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from tests.e2e.processes import BIN, free_port, run_rbee, wait_healthy
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import (
    LLAMA3_8B,
    write_header_only_gguf,
    write_split_gguf,
    write_tiny_llama_gguf,
)

pytestmark = pytest.mark.e2e

RBEE = str(BIN / "rbee")


@dataclass
class Services:
    home: Path
    env: dict[str, str]
    catalog: subprocess.Popen[bytes]
    provisioner: subprocess.Popen[bytes] | None
    provisioner_address: str
    catalog_address: str
    logs: Path

    def start_provisioner(self) -> None:
        log = (self.logs / f"provisioner-{time.monotonic_ns()}.log").open("wb")
        self.provisioner = subprocess.Popen(
            [str(BIN / "rbee-provisioner")],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        wait_healthy(
            self.provisioner_address, self.provisioner, name="rbee-provisioner", timeout=60
        )

    def kill_provisioner(self) -> None:
        assert self.provisioner is not None
        self.provisioner.kill()
        self.provisioner.wait(timeout=10)

    def rbee(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_rbee(self.env, *args, timeout=timeout)

    def models(self) -> list[cpb.Model]:
        with grpc.insecure_channel(self.catalog_address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            return list(stub.ListModels(cpb.ListModelsRequest(), timeout=10).models)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def services(tmp_path: Path, hub: FakeHub) -> Iterator[Services]:
    cat_port, prov_port = free_port(), free_port()
    env = {
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{cat_port}",
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{cat_port}",
        "RBEE_PROVISIONER_LISTEN": f"127.0.0.1:{prov_port}",
        "RBEE_PROVISIONER_METRICS_LISTEN": "",
        "RBEE_PROVISIONER_CATALOG_ADDRESS": f"127.0.0.1:{cat_port}",
        "RBEE_PROVISIONER_ADDR": f"127.0.0.1:{prov_port}",
        "RBEE_PROVISIONER_BACKOFF_INITIAL": "0.05",
        "RBEE_PROVISIONER_BACKOFF_MAX": "0.2",
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_TOKEN": "",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    catalog = subprocess.Popen(
        [str(BIN / "rbee-catalog")],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=(logs / "catalog.log").open("wb"),
    )
    running = Services(
        tmp_path / "home",
        env,
        catalog,
        None,
        f"127.0.0.1:{prov_port}",
        f"127.0.0.1:{cat_port}",
        logs,
    )
    try:
        wait_healthy(running.catalog_address, catalog, name="rbee-catalog", timeout=30)
        running.start_provisioner()
        yield running
    finally:
        for process in (running.provisioner, catalog):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def test_rbee_pull_human_and_json(services: Services, hub: FakeHub, tmp_path: Path) -> None:
    data = write_tiny_llama_gguf(tmp_path / "t.gguf").read_bytes()
    hub.add_repo("org/cli-GGUF", {"cli.Q8_0.gguf": data, "cli.Q4_K_M.gguf": data})

    result = services.rbee("pull", "hf:org/cli-GGUF")
    assert result.returncode == 0, result.stderr
    assert "chose cli.Q4_K_M.gguf" in result.stderr
    assert "downloading" in result.stderr
    assert result.stdout.startswith("pulled models/")

    result = services.rbee("pull", "hf:org/cli-GGUF:cli.Q8_0.gguf", "--format", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(set(doc) <= {"progress", "model"} for doc in lines)
    assert "progress" in lines[0] and "model" in lines[-1]
    assert lines[-1]["model"]["sha256"] == hashlib.sha256(data).hexdigest()

    listed = services.rbee("pulls", "ls", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["pulls"]) == 2

    recipes = services.rbee("recipes", "ls", "--format", "json")
    assert recipes.returncode == 0, recipes.stderr
    found = {r["name"]: r for r in json.loads(recipes.stdout)["recipes"]}
    assert {"recipes/cpu-llm", "recipes/cuda-sd", "recipes/metal-llm"} <= set(found)

    # This environment runs llama_cpp: registered as the "system" install of cpu-llm.
    deadline = time.monotonic() + 60
    installs: list[str] = []
    while time.monotonic() < deadline and "installs/system-cpu-llm" not in installs:
        with grpc.insecure_channel(services.catalog_address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            listed = stub.ListInstalls(cpb.ListInstallsRequest(), timeout=10)
        installs = [i.name for i in listed.installs]
        time.sleep(0.5)
    assert "installs/system-cpu-llm" in installs

    bad = services.rbee("pull", "hf:../../etc", "--format", "json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["reason"] == "INVALID_SOURCE"
    assert len(bad.stderr.strip().splitlines()) == 1


def kill_9_during_pull(
    services: Services, source: str, limit: str, moments: Sequence[Callable[[], None]]
) -> dict[str, Any]:
    """`rbee pull SOURCE --limit LIMIT`; after each of `moments` returns, kill -9 the
    provisioner and start it again (it resumes the pull at start-up, from the bytes on disk);
    then the same pull again, to its end. Returns the READY model (its JSON)."""
    cli = subprocess.Popen(
        [RBEE, "pull", source, "--limit", limit, "--format", "json"],
        env={**os.environ, **services.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for moment in moments:
            moment()
            services.kill_provisioner()
            assert all(m.state != cpb.MODEL_STATE_READY for m in services.models())
            services.start_provisioner()
        cli.wait(timeout=30)  # its stream died with the first kill
    finally:
        if cli.poll() is None:
            cli.kill()
    result = services.rbee("pull", source, "--format", "json", timeout=120)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])["model"]
    assert model["state"] == "MODEL_STATE_READY"
    return model


def test_kill_9_at_random_points_then_resume(
    services: Services, hub: FakeHub, tmp_path: Path
) -> None:
    # An 8B-wide header with sparse weights: ~57 MB of real bytes to move, inspected for real.
    path = write_header_only_gguf(
        tmp_path / "big.Q4_K_M.gguf", **{**LLAMA3_8B, "n_layer": 1, "n_vocab": 4096, "n_ff": 2048}
    )
    data_size = path.stat().st_size
    assert data_size > 20_000_000
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    hub.add_repo("org/big-GGUF", {"big.Q4_K_M.gguf": path})
    source = "hf:org/big-GGUF:big.Q4_K_M.gguf"
    limit = str(max(data_size // 8, 1_000_000))  # about 8 s for the whole file

    rng = random.Random(1234)
    # Five random points of the transfer, in order (bytes persist across the kills).
    points = sorted(rng.uniform(0.05, 0.75) * data_size for _ in range(5))
    cache = tmp_path / "hf-cache"

    def wait_for_partial(at_least: float) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in cache.rglob("*.partial")]
            if sizes and max(sizes) >= at_least:
                return
            time.sleep(0.01)
        raise AssertionError(f"the partial never reached {at_least:.0f} bytes")

    model = kill_9_during_pull(
        services, source, limit, [functools.partial(wait_for_partial, point) for point in points]
    )
    assert model["sha256"] == digest
    (stored,) = services.models()
    assert stored.state == cpb.MODEL_STATE_READY and stored.sha256 == digest
    # Bytes on disk were reused: ranged requests, and far less than six full transfers.
    assert any(r.range for r in hub.cdn.requests)
    assert hub.cdn.body_bytes_sent() < 2.5 * data_size
    assert not list(cache.rglob("*.partial"))


def test_kill_9_during_a_many_file_pull_then_every_file_resumes(
    services: Services, hub: FakeHub, tmp_path: Path
) -> None:
    # A split GGUF of three ~30 MB parts, transferred at once under one bandwidth limit.
    parts = write_split_gguf(
        tmp_path, "big-Q4_K_M", 3, **{**LLAMA3_8B, "n_layer": 2, "n_vocab": 4096, "n_ff": 2048}
    )
    total = sum(p.stat().st_size for p in parts)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts]
    hub.add_repo("org/split-GGUF", {p.name: p for p in parts})
    source = "hf:org/split-GGUF"
    limit = str(total // 8)  # about 8 s for the three files together
    cache = tmp_path / "hf-cache"

    def partial_bytes() -> tuple[int, int]:
        """(bytes in partials, how many partials hold some)."""
        sizes = [p.stat().st_size for p in cache.rglob("*.partial")]
        return sum(sizes), sum(1 for size in sizes if size)

    def wait_for_partials(at_least: float) -> None:
        deadline = time.monotonic() + 60
        while partial_bytes()[0] < at_least:
            assert time.monotonic() < deadline, f"the partials never reached {at_least:.0f} B"
            time.sleep(0.01)
        assert partial_bytes()[1] >= 2, "the parts were not transferring at once"

    model = kill_9_during_pull(
        services,
        source,
        limit,
        [functools.partial(wait_for_partials, at) for at in (0.2 * total, 0.5 * total)],
    )
    snapshot = Path(model["paths"][0]).parent
    for part, digest in zip(parts, digests, strict=True):
        assert hashlib.sha256((snapshot / part.name).read_bytes()).hexdigest() == digest
    # Each part went on from its own bytes on disk: far less than the three moved again.
    assert hub.cdn.body_bytes_sent() < 1.5 * total
    assert not list(cache.rglob("*.partial"))


def test_ctrl_c_cancels_the_pull_it_started_and_the_same_command_resumes_it(
    services: Services, hub: FakeHub, tmp_path: Path
) -> None:
    path = write_header_only_gguf(
        tmp_path / "slow.Q4_K_M.gguf", **{**LLAMA3_8B, "n_layer": 1, "n_vocab": 4096, "n_ff": 2048}
    )
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    hub.add_repo("org/slow-GGUF", {"slow.Q4_K_M.gguf": path})
    source = "hf:org/slow-GGUF:slow.Q4_K_M.gguf"
    stall_at = size // 3
    hub.cdn.faults.stall_after_bytes = stall_at  # the transfer hangs there (30 s) until cancelled
    hub.cdn.faults.stall_seconds = 30.0
    cache = tmp_path / "hf-cache"

    cli = subprocess.Popen(
        [RBEE, "pull", source],
        env={**os.environ, **services.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in cache.rglob("*.partial")]
            if sizes and max(sizes) >= stall_at:
                break
            assert cli.poll() is None, cli.communicate()
            time.sleep(0.02)
        else:
            raise AssertionError("the download never reached the stall")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
    assert cli.returncode == 130, err
    (pull,) = json.loads(services.rbee("pulls", "ls", "--format", "json").stdout)["pulls"]
    pull_id = pull["name"].removeprefix("pulls/")
    assert pull["state"] == "PULL_STATE_CANCELLED"
    assert f"cancelled pulls/{pull_id}" in err
    assert f"`rbee pulls resume {pull_id}`" in err and f"`rbee pull {source}`" in err
    assert "Traceback" not in err and out == ""

    again = services.rbee("pull", source)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"pulled {pull['model']}: 1 file, ")
    assert " reused) in " in again.stdout  # the bytes kept on disk were not fetched again
    (stored,) = services.models()
    assert stored.state == cpb.MODEL_STATE_READY and stored.sha256 == digest
    listed = json.loads(services.rbee("pulls", "ls", "--format", "json").stdout)["pulls"]
    assert [p["state"] for p in listed] == ["PULL_STATE_SUCCEEDED"]
