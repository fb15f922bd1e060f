"""`rbee status` against `rbee-catalog`, `rbee-provisioner`, `rbee-pool` and one spawned worker,
as subprocesses: every service's health and version; exit 3 once one is unreachable."""

from __future__ import annotations

import json
import os
import subprocess
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


def test_status_lists_every_service_and_its_workers(tmp_path: Path) -> None:
    cat, prov, pool, cat_metrics = free_port(), free_port(), free_port(), free_port()
    env = {
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_CATALOG_LISTEN": f"127.0.0.1:{cat}",
        "RBEE_CATALOG_METRICS_LISTEN": f"127.0.0.1:{cat_metrics}",
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{cat}",
        "RBEE_PROVISIONER_LISTEN": f"127.0.0.1:{prov}",
        "RBEE_PROVISIONER_METRICS_LISTEN": "",
        "RBEE_PROVISIONER_CATALOG_ADDRESS": f"127.0.0.1:{cat}",
        "RBEE_PROVISIONER_REGISTER_SYSTEM_INSTALLS": "false",
        "RBEE_PROVISIONER_ADDR": f"127.0.0.1:{prov}",
        "RBEE_POOL_LISTEN": f"127.0.0.1:{pool}",
        "RBEE_POOL_METRICS_LISTEN": "",
        "RBEE_POOL_CATALOG_ADDRESS": f"127.0.0.1:{cat}",
        "RBEE_POOL_ADDR": f"127.0.0.1:{pool}",
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "NO_COLOR": "1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, port in (("rbee-catalog", cat), ("rbee-provisioner", prov), ("rbee-pool", pool)):
            procs[name] = subprocess.Popen(
                [str(BIN / name)],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"{name}.log").open("wb"),
            )
            wait_healthy(f"127.0.0.1:{port}", procs[name], name=name, timeout=60)
        model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
        assert rbee(env, "models", "add", str(model), "--id", "tiny").returncode == 0
        spawned = rbee(env, "workers", "spawn", "tiny", "--id", "w1")
        assert spawned.returncode == 0, spawned.stderr

        result = rbee(env, "status", "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        doc = json.loads(result.stdout)
        rows = {r["service"]: r for r in doc["services"]}
        assert set(rows) == {"catalog", "provisioner", "pool", "workers/w1"}
        assert all(r["health"] == "serving" for r in rows.values())
        assert rows["catalog"]["address"] == f"127.0.0.1:{cat}"
        assert rows["workers/w1"]["address"].startswith("127.0.0.1:")
        for row in rows.values():  # every rbee server serves InfoService
            assert row["version"], row
        assert rows["catalog"]["metrics_url"] == f"http://127.0.0.1:{cat_metrics}/metrics"
        assert rows["provisioner"]["metrics_url"] == ""  # metrics off
        # A worker the pool spawned serves its own /metrics on an ephemeral loopback port.
        assert rows["workers/w1"]["metrics_url"].startswith("http://127.0.0.1:")
        assert doc["exit_code"] == 0

        table = rbee(env, "status")
        assert table.returncode == 0
        assert "workers/w1" in table.stdout and "serving" in table.stdout
        assert "\x1b" not in table.stdout  # NO_COLOR

        procs["rbee-provisioner"].kill()
        procs["rbee-provisioner"].wait(timeout=10)
        down = rbee(env, "status", "--format", "json", "--timeout", "1")
        assert down.returncode == 3
        rows = {r["service"]: r for r in json.loads(down.stdout)["services"]}
        assert rows["provisioner"]["health"] == "unreachable"
        assert rows["catalog"]["health"] == "serving" and rows["workers/w1"]["health"] == "serving"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
