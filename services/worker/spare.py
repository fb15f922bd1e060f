"""A warm spare: a worker process that has done its slow start-up before it is needed.

    rbee-worker --spare --engine llama_cpp|diffusers|fake --device cpu|cuda:N|mps

About a second of a worker's spawn is the interpreter and its imports (grpc, pydantic,
prometheus_client, then llama_cpp, or torch and diffusers), the same for every model. A spare
does exactly that much ahead of time: it binds its device (CUDA_VISIBLE_DEVICES, before any
backend is imported, as a worker does), imports the engine's modules, prints SPARE_READY on
stdout (services.worker.stdout_lines), and then blocks on one line of stdin. The pool writes the
worker's real command line there as JSON, `{"argv": [...]}` (the arguments after the command),
and the spare becomes that worker: `main(argv)` in the same process, so its pid, pipes and
parent-death signal are the ones the pool already supervises.

The argv must name the spare's own engine and device (a spare bound to cuda:0 must not become
a worker of cuda:1): anything else exits with EXIT_MISMATCH before it runs. End of input
(the pool stopped the spare or died) exits 0 without starting anything. Nothing of a model is
touched until the argv arrives.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence

from services.worker.devices import bind_device, parse_device
from services.worker.stdout_lines import SPARE_READY

SPARE_FLAG = "--spare"
EXIT_MISMATCH = 3
# A worker's command line is a few hundred bytes; anything near this is not one.
MAX_LAUNCH_LINE = 1 << 20

# What each engine imports on its first load, so a spare has paid for it already. Optional
# ones are skipped when absent (an install with no transformers fails at load, as before).
ENGINE_MODULES: dict[str, tuple[str, ...]] = {
    "llama_cpp": ("services.worker.engines.llama_cpp", "llama_cpp"),
    "diffusers": (
        "services.worker.engines.diffusers_engine",
        "torch",
        "diffusers",
        "transformers",
        "PIL.Image",
        "safetensors",
    ),
    "fake": ("services.worker.engines.fake",),
}


class LaunchError(Exception):
    """The launch line is not a worker command line for this spare."""


def prepare_engine_environment(engine: str) -> None:
    """What must be in the environment before the engine's backend is imported (shared with
    the worker's own start, which calls it again: it only sets defaults)."""
    if engine == "diffusers":
        # torch's OpenMP threads spin while they wait for work by default; sharing the cores
        # with this process's asyncio and gRPC threads (or anything else on the host) that made
        # a 64x64, 20-step image 40x slower on two cores (bench/image.py notes). Set before
        # torch loads, and only when the operator has not chosen a policy.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def import_engine_modules(engine: str) -> list[str]:
    """Import what `engine` needs; the modules that could not be imported (absent extras)."""
    missing = []
    for module in ENGINE_MODULES[engine]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def parse_launch(line: bytes, *, engine: str, device: str) -> list[str]:
    """The worker argv in a launch line; LaunchError unless it is a JSON object with an `argv`
    list of strings that names this spare's engine and device."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LaunchError(f"the launch line is not JSON: {exc}") from None
    argv = message.get("argv") if isinstance(message, dict) else None
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        raise LaunchError("the launch line has no argv list of strings")
    named = _flag_values(argv)
    wanted_engine, wanted_device = named.get("--engine"), named.get("--device")
    if wanted_engine != engine:
        raise LaunchError(f"this spare runs engine {engine}, the argv names {wanted_engine}")
    try:
        same_device = wanted_device is not None and parse_device(wanted_device) == parse_device(
            device
        )
    except ValueError:
        same_device = False
    if not same_device:
        raise LaunchError(f"this spare is bound to {device}, the argv names {wanted_device}")
    return argv


def _flag_values(argv: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            flag, _, value = arg.partition("=")
            values[flag] = value
        elif arg in ("--engine", "--device") and index + 1 < len(argv):
            values[arg] = argv[index + 1]
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbee-worker --spare",
        description="Start a worker's interpreter and backend now; read its argv on stdin later.",
    )
    parser.add_argument("--engine", required=True, choices=sorted(ENGINE_MODULES))
    parser.add_argument("--device", required=True)
    return parser


def run_spare(argv: Sequence[str], worker_main: Callable[[Sequence[str]], int]) -> int:
    """The spare's life: prepare, wait for the launch line, then be `worker_main(argv)`."""
    args = build_parser().parse_args(argv)
    try:
        device = parse_device(args.device)
    except ValueError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    bind_device(device, os.environ)
    prepare_engine_environment(args.engine)
    missing = import_engine_modules(args.engine)
    if missing:
        # Not fatal: the worker it becomes reports the missing backend the usual way.
        print(f"spare: could not import {', '.join(missing)}", file=sys.stderr, flush=True)
    print(SPARE_READY, flush=True)
    line = sys.stdin.buffer.readline(MAX_LAUNCH_LINE)
    if not line.strip():
        return 0
    try:
        worker_argv = parse_launch(line, engine=args.engine, device=args.device)
    except LaunchError as exc:
        print(f"error: spare: {exc}", file=sys.stderr)
        return EXIT_MISMATCH
    # The worker reads nothing from stdin; the pool's pipe closes after the launch line.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return worker_main(worker_argv)
