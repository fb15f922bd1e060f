"""`rbee chat`, `rbee generate` and `rbee imagine` as a user runs them: `rbee-catalog` and
`rbee-pool` as subprocesses (one mesh for the module), real llama.cpp and diffusers workers
spawned by the pool on the tiny generated models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbee.worker.v1 import worker_pb2
from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.gguf_models import write_tiny_llama_gguf

pytestmark = pytest.mark.e2e

RBEE = str(BIN / "rbee")
# A chat template for the tiny model (it has none of its own): roles in brackets.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Mesh:
    env: dict[str, str]
    home: Path
    pool_port: int

    def rbee(
        self, *args: str, stdin: str | None = None, timeout: float = 110
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RBEE, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
            check=False,
        )

    def workers(self) -> list[dict[str, Any]]:
        listed = self.rbee("workers", "ls", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        workers: list[dict[str, Any]] = json.loads(listed.stdout)["workers"]
        return workers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("chat-mesh")
    cat_port, pool_port = free_port(), free_port()
    env = {
        "RBEE_HOME": str(base / "home"),
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{cat_port}",
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{cat_port}",
        "RBEE_POOL_LISTEN": f"127.0.0.1:{pool_port}",
        "RBEE_POOL_METRICS_LISTEN": "",
        "RBEE_POOL_CATALOG_ADDRESS": f"127.0.0.1:{cat_port}",
        "RBEE_POOL_ADDR": f"127.0.0.1:{pool_port}",
        "NO_COLOR": "1",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in (("rbee-catalog", cat_port), ("rbee-pool", pool_port)):
            log = base / f"{name}.log"
            proc = subprocess.Popen(
                [str(BIN / name)],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
            )
            procs.append(proc)
            wait_healthy(
                f"127.0.0.1:{port}",
                proc,
                name=name,
                timeout=60,
                stderr=lambda log=log: log.read_text(errors="replace"),  # type: ignore[misc]
            )
        model = write_tiny_llama_gguf(base / "tiny.gguf", chat_template=TEMPLATE)
        mesh = Mesh(env=env, home=base, pool_port=pool_port)
        added = mesh.rbee("models", "add", str(model), "--id", "tiny", "--name", "Tiny Chat")
        assert added.returncode == 0, added.stderr
        yield mesh
    finally:
        for proc in reversed(procs):  # the pool first: its workers die with it
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.llm
@pytest.mark.slow
def test_chat_spawns_a_worker_then_reuses_it(mesh: Mesh) -> None:
    first = mesh.rbee("chat", "tiny", "-p", "hi", "--max-tokens", "8", "--seed", "1", "-v")
    assert first.returncode == 0, first.stderr
    assert "spawning" in first.stderr and "  ready:" in first.stderr  # the spawn stages
    assert "spawned workers/" in first.stderr
    assert "prompt tokens" in first.stderr and "finish " in first.stderr  # --verbose stats
    assert first.stdout.strip(), "no text printed"

    # By name (display name), same seed: the same worker, the same text.
    second = mesh.rbee("chat", "Tiny Chat", "-p", "hi", "--max-tokens", "8", "--seed", "1")
    assert second.returncode == 0, second.stderr
    assert "spawning" not in second.stderr and "using workers/" in second.stderr
    assert second.stdout == first.stdout
    (worker,) = mesh.workers()
    assert worker["state"] == "WORKER_STATE_READY" and worker["model"] == "models/tiny"


@pytest.mark.llm
@pytest.mark.slow
def test_generate_against_the_worker_endpoint_and_name(mesh: Mesh) -> None:
    ensure = mesh.rbee("chat", "models/tiny", "-p", "x", "--max-tokens", "1")
    assert ensure.returncode == 0, ensure.stderr
    (worker,) = mesh.workers()
    endpoint = worker["endpoint"]

    out = mesh.rbee(
        "generate", endpoint, "once upon", "--max-tokens", "6", "--seed", "3", "--format", "json"
    )
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    assert events[0]["target"]["endpoint"] == endpoint
    assert all("delta" in e for e in events[1:-1])
    final = events[-1]
    assert 0 < final["result"]["usage"]["completionTokens"] <= 6
    assert final["text"] == "".join(e["delta"].get("text", "") for e in events[1:-1])

    # The same request through the pool's name of the worker: the same text (same seed).
    by_name = mesh.rbee("generate", worker["name"], "once upon", "--max-tokens", "6", "--seed", "3")
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout.rstrip("\n") == final["text"]

    # A prompt from stdin.
    piped = mesh.rbee("generate", endpoint, "-", "--max-tokens", "2", stdin="once upon")
    assert piped.returncode == 0, piped.stderr


@pytest.mark.llm
@pytest.mark.slow
def test_repl_sends_the_history_and_reset_forgets_it(mesh: Mesh) -> None:
    session = mesh.rbee(
        "chat",
        "tiny",
        "--system",
        "be brief",
        "--max-tokens",
        "4",
        "--seed",
        "1",
        "--format",
        "json",
        stdin="hello\nhello\n/reset\nhello\n",
    )
    assert session.returncode == 0, session.stderr
    results = [e for e in json_lines(session.stdout) if "result" in e]
    assert len(results) == 3
    prompts = [r["result"]["usage"]["promptTokens"] for r in results]
    first_reply = results[0]["result"]["usage"]["completionTokens"]
    # Turn 2 carries turn 1 (user + assistant) before the same user message; after /reset the
    # prompt is turn 1's again.
    assert prompts[1] > prompts[0] + first_reply // 2, prompts
    assert prompts[2] == prompts[0], prompts


@pytest.mark.llm
@pytest.mark.slow
def test_ctrl_c_cancels_the_reply_and_keeps_the_session(mesh: Mesh) -> None:
    from rbee_client.worker import WorkerClient

    # A model of its own, served with a long context, so that a reply runs long enough to be
    # interrupted (the tiny model's own context of 256 tokens fills in a fraction of a second).
    path = write_tiny_llama_gguf(mesh.home / "long.gguf", chat_template=TEMPLATE, name="long")
    added = mesh.rbee("models", "add", str(path), "--id", "long")
    assert added.returncode == 0, added.stderr
    proc = subprocess.Popen(
        [
            RBEE,
            "chat",
            "long",
            "--ctx",
            "65536",
            "--ignore-eos",
            "--max-tokens",
            "60000",
            "--format",
            "json",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **mesh.env},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("tell me everything\n")
        proc.stdin.flush()
        target = json.loads(proc.stdout.readline())["target"]
        first_delta = json.loads(proc.stdout.readline())
        assert "delta" in first_delta
        proc.send_signal(signal.SIGINT)
        # The session reads on after the cancelled reply: /exit ends it with 0.
        out, err = proc.communicate("/exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert "(reply cancelled)" in err
    assert not any("result" in e for e in json_lines(out))  # the reply never finished
    with WorkerClient(target["endpoint"]) as worker:
        # The worker counts the cancel once its token loop stops, then ends the turn: READY
        # follows the counter (a moment apart on a loaded host).
        deadline = time.monotonic() + 30
        while True:
            info = worker.get_worker()
            ready = info.state == worker_pb2.WORKER_STATE_READY
            if info.counters.requests_cancelled >= 1 and ready:
                break
            assert time.monotonic() < deadline, f"not cancelled and READY: {info}"
            time.sleep(0.1)


def test_chat_errors_are_one_line_with_a_hint(mesh: Mesh, tmp_path: Path) -> None:
    unknown = mesh.rbee("chat", "no-such-thing", "-p", "hi")
    assert unknown.returncode == 1
    assert "unknown target 'no-such-thing'" in unknown.stderr
    assert "rbee models ls" in unknown.stderr and "rbee workers ls" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    wrong_kind = mesh.rbee("imagine", "a cat", "--model", "tiny", "-o", str(tmp_path / "a.png"))
    assert wrong_kind.returncode == 1
    assert "models/tiny is an LLM" in wrong_kind.stderr and "rbee chat tiny" in wrong_kind.stderr
    assert not (tmp_path / "a.png").exists()

    as_json = mesh.rbee("chat", "models/missing", "-p", "hi", "--format", "json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"]["reason"] == "NOT_FOUND"

    unreachable = mesh.rbee("chat", "tiny", "-p", "hi", "--pool", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3
    assert "rbee serve pool" in unreachable.stderr

    no_worker = mesh.rbee("generate", f"127.0.0.1:{free_port()}", "hi")
    assert no_worker.returncode == 3
    assert "cannot reach a worker" in no_worker.stderr


@pytest.fixture(scope="module")
def sd_worker(mesh: Mesh) -> Iterator[str]:
    """A diffusers worker serving the tiny SD pipeline, started as a user would (rbee-worker on
    a free port): the catalog cannot identify the tiny pipeline's family (its UNet's
    cross-attention width is neither SD1's nor SD2's), so the pool refuses to spawn one for it.
    Yields its endpoint."""
    from tests.fixtures.sd_models import tiny_sd_pipeline_under

    pipeline = tiny_sd_pipeline_under(mesh.home)
    added = mesh.rbee("models", "add", str(pipeline), "--id", "tiny-sd")
    assert added.returncode == 0, added.stderr
    port = free_port()
    log = mesh.home / "sd-worker.log"
    proc = subprocess.Popen(
        [
            str(BIN / "rbee-worker"),
            "--engine",
            "diffusers",
            "--device",
            "cpu",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--model",
            str(pipeline),
            "--model-name",
            "models/tiny-sd",
        ],
        env={**os.environ, **mesh.env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        wait_healthy(
            f"127.0.0.1:{port}",
            proc,
            name="rbee-worker",
            timeout=90,
            stderr=lambda: log.read_text(errors="replace"),
        )
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.sd
@pytest.mark.slow
def test_imagine_writes_pngs_of_the_asked_size(mesh: Mesh, sd_worker: str, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "cat.png"
    made = mesh.rbee(
        "imagine", "a cat", "--worker", sd_worker, "-o", str(out),
        "-W", "64", "-H", "96", "--steps", "2", "--seed", "5", "-n", "dull",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(out)
    assert "step 2/2" in made.stderr  # plain step lines off a terminal
    assert "using the worker (models/tiny-sd" in made.stderr
    assert "1 image, 64x96, seed 5, 2 steps" in made.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    with Image.open(out) as image:
        assert image.size == (64, 96)

    again = mesh.rbee("imagine", "a cat", "--worker", sd_worker, "-o", str(out))
    assert again.returncode == 1 and "--force" in again.stderr

    many = mesh.rbee(
        "imagine", "a dog", "--worker", sd_worker, "-o", str(tmp_path / "dog.png"),
        "--count", "2", "-W", "64", "-H", "64", "--steps", "1", "--format", "json",
    )  # fmt: skip
    assert many.returncode == 0, many.stderr
    events = json_lines(many.stdout)
    assert events[0]["target"]["endpoint"] == sd_worker
    assert any("progress" in e for e in events)
    files = events[-1]["files"]
    assert files == [str(tmp_path / "dog-1.png"), str(tmp_path / "dog-2.png")]
    seeds = [int(i["seed"]) for i in events[-1]["result"]["images"]]
    assert len(set(seeds)) == 2
    for name in files:
        with Image.open(name) as image:
            assert image.size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png", "dog-1.png", "dog-2.png"]


@pytest.mark.sd
def test_an_image_model_or_worker_refuses_chat(mesh: Mesh, sd_worker: str) -> None:
    model = mesh.rbee("chat", "tiny-sd", "-p", "hi")
    assert model.returncode == 1
    assert "models/tiny-sd is an image model" in model.stderr and "rbee imagine" in model.stderr
    worker = mesh.rbee("generate", sd_worker, "hi")
    assert worker.returncode == 1
    assert "is an image (sd) worker" in worker.stderr
