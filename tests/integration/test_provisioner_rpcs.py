"""The provisioner's other RPCs over gRPC: resolve, remote inspection with compatibility,
search, restarts (PAUSED, ResumePull), and the RPCs this version does not implement."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.common.v1 import device_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from tests.fixtures.fake_civitai import CivitaiFile, FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import LLAMA3_8B, write_header_only_gguf, write_tiny_llama_gguf
from tests.integration.provisioner_harness import Mesh, running_mesh
from tests.integration.server_harness import error_reason

pytestmark = pytest.mark.integration


def test_resolve_source_lists_files_and_the_choice(
    mesh: Mesh, hub: FakeHub, tmp_path: Path
) -> None:
    data = write_tiny_llama_gguf(tmp_path / "t.gguf").read_bytes()
    hub.add_repo("org/r-GGUF", {"r.Q8_0.gguf": data, "r.Q4_K_M.gguf": data, "README.md": b"x"})
    resolved = mesh.provisioner.ResolveSource(
        pb.ResolveSourceRequest(source="hf:org/r-GGUF"), timeout=20
    )
    assert resolved.chosen_file == "r.Q4_K_M.gguf"
    assert "Q4_K_M" in resolved.choice_reason
    selected = [f.path for f in resolved.files if f.selected]
    assert selected == ["r.Q4_K_M.gguf"]
    by_path = {f.path: f for f in resolved.files}
    assert by_path["r.Q8_0.gguf"].quantization == "Q8_0"
    assert by_path["r.Q4_K_M.gguf"].sha256 == hashlib.sha256(data).hexdigest()
    assert resolved.total_bytes == len(data)
    assert resolved.model_id and not resolved.existing_model
    assert hub.cdn.body_bytes_sent() == 0  # nothing downloaded


def test_inspect_remote_reads_only_the_header_and_answers_compatibility(
    mesh: Mesh, hub: FakeHub, tmp_path: Path
) -> None:
    path = write_header_only_gguf(tmp_path / "llama3-8b.Q4_K_M.gguf", **LLAMA3_8B)
    size = path.stat().st_size
    hub.add_repo("meta/llama3-GGUF", {"llama3-8b.Q4_K_M.gguf": path})
    cuda = device_pb2.Device(
        kind=device_pb2.DEVICE_KIND_CUDA,
        total_vram_bytes=24 * 2**30,
        free_vram_bytes=24 * 2**30,
        total_ram_bytes=64 * 2**30,
        free_ram_bytes=64 * 2**30,
    )
    report = mesh.provisioner.InspectRemote(
        pb.InspectRemoteRequest(source="hf:meta/llama3-GGUF", devices=[cuda], context_length=4096),
        timeout=60,
    )
    assert report.metadata.architecture == "llama"
    assert report.metadata.quantization == "Q4_K_M"
    assert 8.0e9 < report.metadata.parameter_count < 8.1e9
    assert report.bytes_read < size / 100
    assert hub.cdn.body_bytes_sent() == report.bytes_read
    (device,) = report.compatibility
    verdicts = {r.worker_type: r.verdict for r in device.results}
    assert verdicts["worker-types/cuda-llm"] == cpb.VERDICT_FITS_GPU
    assert verdicts["worker-types/cpu-sd"] != cpb.VERDICT_COMPATIBLE
    # Without devices: this hive's CPU.
    report = mesh.provisioner.InspectRemote(
        pb.InspectRemoteRequest(source="hf:meta/llama3-GGUF"), timeout=60
    )
    assert [d.device.kind for d in report.compatibility] == [device_pb2.DEVICE_KIND_CPU]
    assert mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models == []


def test_search_both_sources(mesh: Mesh, hub: FakeHub, civitai: FakeCivitai) -> None:
    hub.add_repo(
        "org/a-GGUF",
        {"a.Q4_K_M.gguf": b"GGUF" + b"\0" * 2000},
        tags=["gguf"],
        pipeline_tag="text-generation",
        downloads=10,
    )
    hub.add_repo(
        "org/b-GGUF",
        {"b.Q4_K_M.gguf": b"GGUF" + b"\0" * 2000},
        tags=["gguf"],
        pipeline_tag="text-generation",
        downloads=99,
    )
    found = mesh.provisioner.SearchModels(
        pb.SearchModelsRequest(
            query="GGUF",
            source=cpb.SOURCE_KIND_HUGGINGFACE,
            sort=pb.SEARCH_SORT_DOWNLOADS,
            page_size=1,
        ),
        timeout=20,
    )
    assert [r.source for r in found.results] == ["hf:org/b-GGUF"]
    assert found.next_page_token
    more = mesh.provisioner.SearchModels(
        pb.SearchModelsRequest(
            query="GGUF",
            source=cpb.SOURCE_KIND_HUGGINGFACE,
            sort=pb.SEARCH_SORT_DOWNLOADS,
            page_size=1,
            page_token=found.next_page_token,
        ),
        timeout=20,
    )
    assert [r.source for r in more.results] == ["hf:org/a-GGUF"]

    civitai.add_version(
        11,
        model_id=5,
        model_name="Pretty XL",
        files=[CivitaiFile(name="pretty.safetensors", data=b"x" * 100)],
        base_model="Pony",
    )
    found = mesh.provisioner.SearchModels(
        pb.SearchModelsRequest(query="Pretty", source=cpb.SOURCE_KIND_CIVITAI), timeout=20
    )
    (hit,) = found.results
    assert hit.source == "civitai:11" and hit.base_model == "Pony"
    assert hit.civitai_type == "Checkpoint" and hit.civitai_version_id == 11

    with pytest.raises(grpc.RpcError) as info:
        mesh.provisioner.SearchModels(pb.SearchModelsRequest(query="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        mesh.provisioner.SearchModels(
            pb.SearchModelsRequest(source=cpb.SOURCE_KIND_HUGGINGFACE, page_token="garbage"),
            timeout=10,
        )
    assert error_reason(info.value) == "INVALID_PAGE_TOKEN"


def test_restart_leaves_the_pull_paused_and_resume_finishes_it(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    data = write_tiny_llama_gguf(
        tmp_path / "b.gguf", n_vocab=2048, n_embd=256, n_ff=512, n_layer=4
    ).read_bytes()
    hub.add_repo("org/pause", {"pause.Q4_K_M.gguf": data})
    home = tmp_path / "home"
    endpoints = {"hf_endpoint": hub.endpoint, "civitai_endpoint": civitai.endpoint}
    # The caller's channel outlives the first provisioner: the stop, not the caller leaving,
    # is what ends the pull here.
    caller = grpc.insecure_channel("127.0.0.1:1")
    with running_mesh(home, **endpoints) as mesh:
        caller = grpc.insecure_channel(mesh.address)
        stub = provisioner_pb2_grpc.ProvisionerServiceStub(caller)
        stream = stub.PullModel(
            pb.PullModelRequest(
                source="hf:org/pause:pause.Q4_K_M.gguf",
                options=pb.PullOptions(bandwidth_limit_bytes_per_second=1_000_000),
            ),
            timeout=60,
        )
        name = ""
        for msg in stream:
            name = msg.progress.pull
            if msg.progress.total_bytes.completed_bytes > 300_000:
                break
        # Stopping the provisioner pauses the pull (not cancelled, not failed).
    with running_mesh(home, **endpoints) as mesh:  # resume_on_start is off in the harness
        record = mesh.provisioner.GetPull(pb.GetPullRequest(name=name), timeout=10)
        assert record.state == pb.PULL_STATE_PAUSED
        (model,) = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
        assert model.state == cpb.MODEL_STATE_DOWNLOADING
        with pytest.raises(grpc.RpcError) as info:
            list(mesh.provisioner.WatchPull(pb.WatchPullRequest(name=name), timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        started = time.monotonic()
        final = None
        reused = 0
        for msg in mesh.provisioner.ResumePull(pb.ResumePullRequest(name=name), timeout=60):
            if msg.HasField("model"):
                final = msg.model
            else:
                reused = max(reused, msg.progress.total_bytes.reused_bytes)
        assert final is not None and final.sha256 == hashlib.sha256(data).hexdigest()
        assert reused > 300_000
        assert time.monotonic() - started < 30


def test_recipes_and_an_install_over_grpc(
    tmp_path: Path, hub: FakeHub, civitai: FakeCivitai
) -> None:
    from tests.fixtures.recipe_repos import make_git_repo, write_hello_recipe

    recipes = tmp_path / "recipes"
    write_hello_recipe(recipes, make_git_repo(tmp_path / "hello-repo"), name="cpu-llm")
    project_recipes = Path(__file__).resolve().parents[2] / "recipes"
    with running_mesh(
        tmp_path / "home",
        hf_endpoint=hub.endpoint,
        civitai_endpoint=civitai.endpoint,
        recipe_dirs=[recipes, project_recipes],
    ) as mesh:
        listed = mesh.provisioner.ListRecipes(pb.ListRecipesRequest(), timeout=30)
        names = [r.name for r in listed.recipes]
        assert names == sorted(names) and "recipes/metal-sd" in names
        by_name = {r.name: r for r in listed.recipes}
        assert by_name["recipes/metal-llm"].supported_on_host is False
        assert by_name["recipes/cpu-llm"].pkgname == "rbee-hello"  # the first directory wins
        only = mesh.provisioner.ListRecipes(
            pb.ListRecipesRequest(filter="supported_on_host=false"), timeout=30
        )
        assert all(not r.supported_on_host for r in only.recipes)
        recipe = mesh.provisioner.GetRecipe(pb.GetRecipeRequest(name="recipes/cpu-llm"), timeout=30)
        assert any("git+file://" in s.url and s.sha256 == "SKIP" for s in recipe.sources)
        with pytest.raises(grpc.RpcError) as info:
            mesh.provisioner.GetRecipe(pb.GetRecipeRequest(name="recipes/../../etc"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        states: list[int] = []
        install = None
        for msg in mesh.provisioner.InstallWorker(
            pb.InstallWorkerRequest(worker_type="worker-types/cpu-llm"), timeout=120
        ):
            if msg.HasField("install"):
                install = msg.install
            else:
                states.append(msg.progress.state)
        assert install is not None and install.worker_type == "worker-types/cpu-llm"
        assert (
            pb.INSTALL_JOB_STATE_BUILDING in states and pb.INSTALL_JOB_STATE_REGISTERING in states
        )
        assert Path(install.path).is_dir()
        installs = mesh.catalog.ListInstalls(cpb.ListInstallsRequest(), timeout=10).installs
        assert [i.name for i in installs] == [install.name]
        (job,) = mesh.provisioner.ListInstallJobs(
            pb.ListInstallJobsRequest(), timeout=10
        ).install_jobs
        assert job.state == pb.INSTALL_JOB_STATE_SUCCEEDED and job.install == install.name
        assert mesh.provisioner.GetInstallJob(
            pb.GetInstallJobRequest(name=job.name), timeout=10
        ).log_tail
