"""The warm spare's launch line: only a worker argv for its own engine and device is taken."""

from __future__ import annotations

import json

import pytest

from services.worker.pool.spares import SpareKey
from services.worker.spare import ENGINE_MODULES, LaunchError, parse_launch

pytestmark = pytest.mark.unit


def line(argv: object) -> bytes:
    return json.dumps({"argv": argv}).encode() + b"\n"


def test_the_argv_of_its_own_engine_and_device_is_taken() -> None:
    argv = ["--engine", "llama_cpp", "--device", "cpu", "--listen", "127.0.0.1:1"]
    assert parse_launch(line(argv), engine="llama_cpp", device="cpu") == argv
    # The = form and another spelling of the same device.
    argv = ["--engine=diffusers", "--device=cuda:0", "--listen", "127.0.0.1:1"]
    assert parse_launch(line(argv), engine="diffusers", device="cuda") == argv


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "no argv list"),
        (line("--engine llama_cpp"), "no argv list"),
        (line(["--engine", 3]), "no argv list"),
        (line(["--engine", "diffusers", "--device", "cpu"]), "runs engine llama_cpp"),
        (line(["--device", "cpu"]), "runs engine llama_cpp"),
        (line(["--engine", "llama_cpp", "--device", "cuda:1"]), "bound to cpu"),
        (line(["--engine", "llama_cpp", "--device", "tpu"]), "bound to cpu"),
        (line(["--engine", "llama_cpp"]), "bound to cpu"),
    ],
)
def test_anything_else_is_refused(payload: bytes, problem: str) -> None:
    with pytest.raises(LaunchError, match=problem):
        parse_launch(payload, engine="llama_cpp", device="cpu")


def test_a_spare_key_changes_with_every_part() -> None:
    env = {"RBEE_HOME": "/h", "PATH": "/bin"}
    key = SpareKey.of(["rbee-worker"], "llama_cpp", "cpu", env)
    assert key == SpareKey.of(["rbee-worker"], "llama_cpp", "cpu", dict(reversed(env.items())))
    assert key != SpareKey.of(
        ["/venv/bin/python", "-m", "services.worker"], "llama_cpp", "cpu", env
    )
    assert key != SpareKey.of(["rbee-worker"], "diffusers", "cpu", env)
    assert key != SpareKey.of(["rbee-worker"], "llama_cpp", "cuda:0", env)
    assert key != SpareKey.of(["rbee-worker"], "llama_cpp", "cpu", {**env, "RBEE_HOME": "/g"})
    # The token is part of the environment, but never of the key's text.
    secret = SpareKey.of(["rbee-worker"], "llama_cpp", "cpu", {"RBEE_WORKER_AUTH_TOKEN": "s3cr3t"})
    assert "s3cr3t" not in repr(secret)


def test_every_engine_imports_its_engine_module_first() -> None:
    for engine, modules in ENGINE_MODULES.items():
        assert modules[0].startswith("services.worker.engines."), engine
