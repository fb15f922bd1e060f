"""The Node SDK (clients/node) against a mesh this test starts.

A fake Hub serves a tiny real GGUF; `rbee-catalog`, `rbee-provisioner` and `rbee-pool` run as
subprocesses with a bearer token on; then `node --test` runs clients/node's tests with the
addresses in RBEE_TEST_* variables. The node side lists models, pulls the model from the fake Hub
(checking its progress events and the final model), spawns a llama worker through the pool and
streams tokens from it. This test passes when node exits 0, and shows node's output when not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.llm]

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
TOKEN = "node-sdk-e2e-token"
NODE_TIMEOUT = 100  # the node test's own timeout is 100 s too; the pytest global is 120 s


def _ensure_node_modules(node_env: dict[str, str]) -> None:
    """Install the locked dependencies when they are missing (offline-friendly: the cache first)."""
    if (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    assert npm is not None, "clients/node/node_modules is missing and npm is not on PATH"
    installed = subprocess.run(
        [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
        cwd=NODE_CLIENT,
        env=node_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"


def _log_reader(log: Path) -> Callable[[], str]:
    return lambda: log.read_text(errors="replace")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Catalog, provisioner and pool on free ports, the fake Hub behind them; yields the
    RBEE_TEST_* variables for the node test."""
    data = write_tiny_llama_gguf(tmp_path / "tiny.gguf", chat_template=CHAT_TEMPLATE).read_bytes()
    cat_port, prov_port, pool_port = free_port(), free_port(), free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    with FakeHub() as hub:
        hub.add_repo("org/tiny-GGUF", {"tiny.Q8_0.gguf": data})
        env = {
            **os.environ,
            "RBEE_HOME": str(tmp_path / "home"),
            "RBEE_AUTH_TOKEN": TOKEN,
            "RBEE_CATALOG_LISTEN": f"127.0.0.1:{cat_port}",
            "RBEE_CATALOG_METRICS_LISTEN": "",
            "RBEE_PROVISIONER_LISTEN": f"127.0.0.1:{prov_port}",
            "RBEE_PROVISIONER_METRICS_LISTEN": "",
            "RBEE_PROVISIONER_CATALOG_ADDRESS": f"127.0.0.1:{cat_port}",
            "RBEE_POOL_LISTEN": f"127.0.0.1:{pool_port}",
            "RBEE_POOL_METRICS_LISTEN": "",
            "RBEE_POOL_CATALOG_ADDRESS": f"127.0.0.1:{cat_port}",
            "RBEE_POOL_PROVISIONER_ADDRESS": f"127.0.0.1:{prov_port}",
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "HF_TOKEN": "",
        }
        try:
            for name, port in (
                ("rbee-catalog", cat_port),
                ("rbee-provisioner", prov_port),
                ("rbee-pool", pool_port),
            ):
                log = logs / f"{name}.log"
                proc = subprocess.Popen(
                    [str(BIN / name)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log.open("wb"),
                )
                procs.append((name, proc))
                wait_healthy(
                    f"127.0.0.1:{port}", proc, name=name, timeout=60, stderr=_log_reader(log)
                )
            yield {
                "RBEE_TEST_CATALOG_ADDR": f"127.0.0.1:{cat_port}",
                "RBEE_TEST_PROVISIONER_ADDR": f"127.0.0.1:{prov_port}",
                "RBEE_TEST_POOL_ADDR": f"127.0.0.1:{pool_port}",
                "RBEE_TEST_PULL_SOURCE": "hf:org/tiny-GGUF:tiny.Q8_0.gguf",
                "RBEE_TEST_PULL_SHA256": hashlib.sha256(data).hexdigest(),
                "RBEE_TEST_TOKEN": TOKEN,
                "RBEE_TEST_LOGS": str(logs),
            }
        finally:
            # The pool first: its workers go with it.
            for _, proc in reversed(procs):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)


def test_node_sdk_against_the_mesh(mesh: dict[str, str]) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH (clients/node needs Node 20)")
    # The node side gets no mesh settings of its own: only what the test passes.
    node_env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    _ensure_node_modules(node_env)
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", "test/"],
        cwd=NODE_CLIENT,
        env={**node_env, **mesh, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        service_logs = "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}"
            for log in sorted(Path(mesh["RBEE_TEST_LOGS"]).glob("*.log"))
        )
        pytest.fail(f"node --test exited {result.returncode}:\n{output}\n{service_logs}")
    # The mesh test ran in full (it skips itself, or a part, when variables are missing).
    assert "streams tokens from the worker" in output, output
    assert "skipped 0" in output, output
