"""Names that try to leave RBEE_HOME: refused, and nothing is written outside the homes.

Issue 7, "Bad input": model ids, pull ids, source strings and their FILE parts, pull options
(files, model_id), recipe names, preload names and worker ids that try path traversal, absolute
paths, NUL bytes and overlong names are refused with INVALID_ARGUMENT (or NOT_FOUND for a
well-formed name that names nothing). Upstreams that lie are covered too: a CivitAI file name
and a Hub file path with `../` in them. Every payload carries a canary name; afterwards no file
with that name exists anywhere under the test's temp tree, /tmp or the working directory, and
the temp tree outside RBEE_HOME (which holds the HF cache) is byte-for-byte what it was.

Run issue 7's tests alone with `-k security`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from rbee.worker.v1 import pool_pb2, pool_pb2_grpc
from services.common.server import RunningServer
from services.worker.pool.__main__ import start_pool
from services.worker.pool.service import PoolService
from services.worker.pool.settings import PoolSettings
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.provisioner_harness import running_mesh
from tests.integration.server_harness import serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.security]

CANARY = f"rbee-canary-{uuid.uuid4().hex[:12]}"
RPC_TIMEOUT = 20
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def traversal_names(prefix: str = "") -> list[str]:
    """Ids that must never become paths: traversal, absolute, NUL, separators, overlong."""
    return [
        f"{prefix}../{CANARY}",
        f"{prefix}../../../../../../tmp/{CANARY}",
        f"{prefix}/tmp/{CANARY}",
        f"{prefix}{CANARY}/../../x",
        f"{prefix}{CANARY}\x00.gguf",
        f"{prefix}..",
        f"{prefix}.",
        f"{prefix}{CANARY}\\..\\..\\x",
        f"{prefix}{CANARY}%2f..%2f..",
        f"{prefix}" + "a" * 300 + CANARY,
        f"{prefix}{CANARY}" + "é" * 200,
    ]


@dataclass
class Hive:
    root: Path
    home: Path
    catalog: catalog_pb2_grpc.CatalogServiceStub
    provisioner: provisioner_pb2_grpc.ProvisionerServiceStub
    pool: pool_pb2_grpc.PoolServiceStub
    hub: FakeHub
    civitai: FakeCivitai


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[Hive]:
    """Catalog, provisioner (fake Hub and CivitAI, empty recipe dir) and a pool whose workers
    exit at once, all with RBEE_HOME = tmp_path/home (the HF cache is inside it)."""
    home = tmp_path / "home"
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    with ExitStack() as stack:
        hub = stack.enter_context(FakeHub())
        civitai = stack.enter_context(FakeCivitai())
        mesh = stack.enter_context(
            running_mesh(
                home,
                hf_endpoint=hub.endpoint,
                civitai_endpoint=civitai.endpoint,
                recipe_dirs=[recipes],
                max_retries=0,
            )
        )
        settings = PoolSettings(
            home=home,
            listen="127.0.0.1:0",
            metrics_listen=None,
            catalog_address=mesh.catalog_address,
            provisioner_address=mesh.address,
            worker_command=[sys.executable, "-c", "raise SystemExit(3)"],
            stop_grace=0.5,
            start_timeout=5.0,
        )

        async def build() -> tuple[RunningServer, PoolService]:
            running, service = await start_pool(settings, CollectorRegistry())
            await running.set_serving()
            return running, service

        pool_running, _ = stack.enter_context(serve_in_thread(build, name="path-safety-pool"))
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{pool_running.port}"))
        yield Hive(
            root=tmp_path,
            home=home,
            catalog=mesh.catalog,
            provisioner=mesh.provisioner,
            pool=pool_pb2_grpc.PoolServiceStub(channel),
            hub=hub,
            civitai=civitai,
        )


def snapshot(root: Path, exclude: Path) -> dict[str, str]:
    """Relative path -> sha256 (or "dir") of everything under `root` outside `exclude`."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == exclude or exclude in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames:
            found[str((here / name).relative_to(root))] = "dir"
        for name in filenames:
            path = here / name
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def canaries_under(*roots: Path) -> list[Path]:
    """Every path whose name contains CANARY under `roots` (the top of /tmp only: it is shared)."""
    hits: list[Path] = []
    for root in roots:
        if root == Path("/tmp"):
            hits += [p for p in root.iterdir() if CANARY in p.name]
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            hits += [Path(dirpath) / n for n in (*dirnames, *filenames) if CANARY in n]
    return hits


def escaped_canaries(hive: Hive) -> list[Path]:
    """Canary names outside RBEE_HOME. Inside it they are fine (a failed pull's record is named
    after its source), as long as they are plain names: no path separator got through."""
    hits = canaries_under(hive.root, Path("/tmp"), Path.cwd())
    return [p for p in hits if hive.home not in p.parents or "\x00" in str(p) or ".." in p.name]


def refused(method: Callable[..., Any], request: Message, timeout: float = RPC_TIMEOUT) -> Any:
    """Call `method` with `request` (a stream is read to its end); return the final code."""
    try:
        result = method(request, timeout=timeout)
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_security_traversal_names_are_refused_and_nothing_leaves_the_homes(hive: Hive) -> None:
    before = snapshot(hive.root, hive.home)
    model_file = write_tiny_llama_gguf(hive.home / "in-home.gguf", n_layer=1, n_vocab=260)
    model = cpb.Model(
        source=cpb.ModelSource(kind=cpb.SOURCE_KIND_LOCAL, path=str(model_file)),
        paths=[str(model_file)],
        state=cpb.MODEL_STATE_READY,
    )
    cat, prov, pool = hive.catalog, hive.provisioner, hive.pool
    checks: list[tuple[Callable[..., Any], Message]] = []
    for name in traversal_names():
        checks += [
            (cat.CreateModel, cpb.CreateModelRequest(model_id=name, model=model)),
            (prov.PullModel, pb.PullModelRequest(source="hf:org/repo", pull_id=name)),
            (
                prov.PullModel,
                pb.PullModelRequest(source="hf:org/repo", options=pb.PullOptions(model_id=name)),
            ),
            (pool.SpawnWorker, pool_pb2.SpawnWorkerRequest(worker_id=name, model="models/x")),
        ]
    for name in traversal_names("models/"):
        checks += [
            (cat.GetModel, cpb.GetModelRequest(name=name)),
            (prov.Preload, pb.PreloadRequest(model=name)),
        ]
    checks += [
        (prov.InstallWorker, pb.InstallWorkerRequest(worker_type=name))
        for name in traversal_names("worker-types/")
    ]
    checks += [(prov.GetRecipe, pb.GetRecipeRequest(name=n)) for n in traversal_names("recipes/")]
    checks += [
        (prov.GetPreload, pb.GetPreloadRequest(name=n)) for n in traversal_names("preloads/")
    ]
    checks += [(prov.GetPull, pb.GetPullRequest(name=n)) for n in traversal_names("pulls/")]
    checks += [
        (pool.GetWorkerLogs, pool_pb2.GetWorkerLogsRequest(name=n))
        for n in traversal_names("workers/")
    ]
    sources = [
        f"hf:org/repo:../../{CANARY}.gguf",
        f"hf:org/repo:/tmp/{CANARY}.gguf",
        f"hf:org/repo:{CANARY}\x00.gguf",
        f"hf:org/repo:x.gguf@../../{CANARY}",
        f"hf:../{CANARY}",
        f"org/repo:..\\..\\{CANARY}.gguf",
        f"civitai:1:../../{CANARY}.safetensors",
        f"civitai:1:/tmp/{CANARY}",
        f"file:/nonexistent/{CANARY}",
        f"/nonexistent/../nonexistent/{CANARY}",
        "hf:org/" + "r" * 200,
        "x" * 5000,
    ]
    for source in sources:
        checks += [
            (prov.PullModel, pb.PullModelRequest(source=source)),
            (prov.ResolveSource, pb.ResolveSourceRequest(source=source)),
        ]
    for pattern in (f"../../{CANARY}.gguf", f"/tmp/{CANARY}.gguf", f"{CANARY}\x00", "../*"):
        options = pb.PullOptions(files=[pattern])
        checks.append((prov.PullModel, pb.PullModelRequest(source="hf:org/repo", options=options)))

    not_refused = []
    for method, request in checks:
        code = refused(method, request)
        if code not in REFUSED:
            not_refused.append(f"{type(request).__name__} {str(request)[:200]!r}: {code.name}")
    assert not not_refused, "not refused:\n" + "\n".join(not_refused)

    model_file.unlink()
    assert not escaped_canaries(hive)
    assert snapshot(hive.root, hive.home) == before


def test_security_upstream_file_names_cannot_escape(hive: Hive, tmp_path: Path) -> None:
    """A CivitAI file name and a Hub path with `../` land inside RBEE_HOME or are refused."""
    data = write_tiny_llama_gguf(tmp_path / "seed.gguf", n_layer=1, n_vocab=260).read_bytes()
    (tmp_path / "seed.gguf").unlink()
    before = snapshot(hive.root, hive.home)
    hive.civitai.add_version(
        31337,
        model_id=31337,
        model_name="evil",
        files=[CivitaiFile(name=f"../../../../{CANARY}.gguf", data=data, format="GGUF")],
        model_type="Checkpoint",
    )
    hive.hub.add_repo("evil/repo", {f"sub/../../{CANARY}.Q4_K_M.gguf": data})
    outcomes = {}
    for source in ("civitai:31337", "hf:evil/repo"):
        outcomes[source] = refused(
            hive.provisioner.PullModel, pb.PullModelRequest(source=source), timeout=60
        )
    # CivitAI's name is reduced to its last component, inside RBEE_HOME; a Hub path that climbs
    # out of the repo is refused before anything is fetched.
    assert outcomes == {
        "civitai:31337": grpc.StatusCode.OK,
        "hf:evil/repo": grpc.StatusCode.INVALID_ARGUMENT,
    }
    landed = canaries_under(hive.home / "models")
    assert [p.name for p in landed] == [f"{CANARY}.gguf"]
    assert not escaped_canaries(hive)
    assert snapshot(hive.root, hive.home) == before
