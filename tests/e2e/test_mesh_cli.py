"""`rbee up` / `rbee down`: the local mesh as three processes, found by the CLI, stopped whole."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.processes import BIN

pytestmark = pytest.mark.e2e

RBEE = str(BIN / "rbee")


def free_base_port() -> int:
    """A port N with N, N+1 and N+2 free on loopback right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base > 65000:
            continue
        try:
            sockets = []
            for port in (base, base + 1, base + 2):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no three free consecutive ports")


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RBEE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


def test_up_in_the_background_then_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = free_base_port()
    up = run("up", "--home", str(home), "--base-port", str(base), "--background", env={})
    assert up.returncode == 0, up.stderr
    assert f"catalog      127.0.0.1:{base}" in up.stdout
    assert f"export RBEE_POOL_ADDR=127.0.0.1:{base + 2}" in up.stdout
    records = json.loads((home / "mesh.json").read_text())
    assert [r["name"] for r in records] == ["catalog", "provisioner", "pool"]
    pids = [int(r["pid"]) for r in records]
    assert all(alive(pid) for pid in pids)

    env = {
        "RBEE_CATALOG_ADDR": f"127.0.0.1:{base}",
        "RBEE_PROVISIONER_ADDR": f"127.0.0.1:{base + 1}",
        "RBEE_POOL_ADDR": f"127.0.0.1:{base + 2}",
    }
    assert run("models", "ls", env=env).returncode == 0
    assert run("pulls", "ls", env=env).returncode == 0
    assert run("devices", env=env).returncode == 0

    again = run("up", "--home", str(home), "--base-port", str(base), "--background", env={})
    assert again.returncode == 1 and "rbee down" in again.stderr

    down = run("down", "--home", str(home), env={})
    assert down.returncode == 0, down.stderr
    assert "catalog" in down.stdout and "pool" in down.stdout
    assert not any(alive(pid) for pid in pids)
    assert not (home / "mesh.json").exists()


def test_up_in_the_foreground_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = free_base_port()
    process = subprocess.Popen(
        [RBEE, "up", "--home", str(home), "--base-port", str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(6)]
        assert lines[0].startswith("catalog") and lines[2].startswith("pool"), lines
        pids = [int(r["pid"]) for r in json.loads((home / "mesh.json").read_text())]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if (home / "mesh.json").exists():  # never leave a mesh behind, whatever failed
            run("down", "--home", str(home), env={})
