"""`rbee-catalog` + `rbee-pool` as subprocesses, driven by `rbee workers` and `rbee devices`;
kill -9 of the pool takes its workers with it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.gguf_models import write_tiny_llama_gguf

pytestmark = pytest.mark.e2e

RBEE = str(BIN / "rbee")


def rbee(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RBEE, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
        check=False,
    )


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_spawn_through_the_cli_and_workers_die_with_the_pool(tmp_path: Path) -> None:
    cat_port, pool_port = free_port(), free_port()
    env = {
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{cat_port}",
        "RBEE_CATALOG_METRICS_LISTEN": "",
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{cat_port}",
        "RBEE_POOL_LISTEN": f"127.0.0.1:{pool_port}",
        "RBEE_POOL_METRICS_LISTEN": "",
        "RBEE_POOL_CATALOG_ADDRESS": f"127.0.0.1:{cat_port}",
        "RBEE_POOL_ADDR": f"127.0.0.1:{pool_port}",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in (("rbee-catalog", cat_port), ("rbee-pool", pool_port)):
            proc = subprocess.Popen(
                [str(BIN / name)],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"{name}.log").open("wb"),
            )
            procs.append(proc)
            wait_healthy(f"127.0.0.1:{port}", proc, name=name, timeout=60)
        model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
        added = rbee(env, "models", "add", str(model), "--id", "tiny")
        assert added.returncode == 0, added.stderr

        devices = rbee(env, "devices", "--format", "json")
        assert devices.returncode == 0, devices.stderr
        assert json.loads(devices.stdout)["devices"][0]["name"] == "devices/cpu"

        spawned = rbee(env, "workers", "spawn", "tiny", "--id", "w1")
        assert spawned.returncode == 0, spawned.stderr
        assert "validating: worker-types/cpu-llm on devices/cpu" in spawned.stderr
        assert spawned.stdout.startswith("workers/w1 ready on 127.0.0.1:")

        listed = json.loads(rbee(env, "workers", "ls", "--format", "json").stdout)["workers"]
        (worker,) = listed
        assert worker["state"] == "WORKER_STATE_READY"
        pid = int(worker["pid"])
        assert not gone(pid)

        logs_out = rbee(env, "workers", "logs", "w1")
        assert "worker serving" in logs_out.stdout

        again = rbee(env, "workers", "spawn", "tiny", "--reuse", "--format", "json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout.splitlines()[-1])["worker"]["name"] == "workers/w1"

        procs[1].kill()  # kill -9 of the pool: its worker must not outlive it
        procs[1].wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not gone(pid):
            time.sleep(0.05)
        assert gone(pid), "the worker outlived its pool"

        unreachable = rbee(env, "workers", "ls")
        assert unreachable.returncode == 3
        assert "rbee serve pool" in unreachable.stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
