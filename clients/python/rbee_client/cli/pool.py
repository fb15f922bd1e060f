"""`rbee workers spawn|ls|stop|rm|logs` and `rbee devices`: the pool from the command line,
through the SDK's PoolClient (typed errors, deadlines, retries on UNAVAILABLE)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from google.protobuf import json_format

from rbee.worker.v1 import load_pb2
from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import worker_pb2 as wpb
from rbee_client.cli.main import client_security
from rbee_client.cli.output import human_bytes, print_json, print_table
from rbee_client.pool import PoolClient, worker_name

DEFAULT_POOL = "127.0.0.1:50091"


_STATES: dict[int, str] = {
    int(v): n.removeprefix("WORKER_STATE_").lower() for n, v in wpb.WorkerState.items()
}
_STAGES: dict[int, str] = {
    int(v): n.removeprefix("SPAWN_STAGE_").lower() for n, v in pb.SpawnStage.items()
}


def _state(value: int) -> str:
    return _STATES.get(value, "unknown")


def _stage(value: int) -> str:
    return _STAGES.get(value, "unknown")


def _pool(args: argparse.Namespace, *, timeout: float | None = None) -> PoolClient:
    return PoolClient(
        args.pool,
        timeout=timeout if timeout is not None else args.timeout,
        security=client_security(),
    )


def cmd_spawn(args: argparse.Namespace) -> int:
    request = pb.SpawnWorkerRequest(
        model=args.model if args.model.startswith("models/") else f"models/{args.model}",
        worker_id=args.id or "",
        worker_type=args.type or "",
        device=(
            args.device
            if not args.device or args.device.startswith("devices/") or args.device == "auto"
            else f"devices/{args.device}"
        ),
        force=args.force,
        validate_only=args.dry_run,
        reuse=args.reuse,
        preload=args.preload,
        queue_capacity=args.queue or 0,
    )
    if args.ctx or args.gpu_layers is not None or args.threads:
        llm = load_pb2.LlmLoadOptions(context_length=args.ctx or 0)
        if args.gpu_layers is not None:
            llm.gpu_layers = args.gpu_layers
        if args.threads:
            llm.threads = args.threads
        request.llm.CopyFrom(llm)
    if args.restart == "on-failure":
        request.restart_policy.mode = wpb.RESTART_MODE_ON_FAILURE
        request.restart_policy.max_restarts = args.max_restarts
    worker = None
    with _pool(args) as pool:
        for event in pool.spawn_worker(request, timeout=args.spawn_timeout):
            if isinstance(event, wpb.Worker):
                worker = event
                if args.format == "json":  # one JSON object per line, as the progress lines
                    msg = pb.SpawnWorkerResponse(worker=event)
                    print(json_format.MessageToJson(msg, indent=None), flush=True)
            elif args.format == "json":
                msg = pb.SpawnWorkerResponse(progress=event)
                print(json_format.MessageToJson(msg, indent=None), flush=True)
            else:
                print(f"{_stage(event.stage)}: {event.message}", file=sys.stderr, flush=True)
    if worker is not None and args.format != "json":
        print(f"{worker.name} {_state(worker.state)} on {worker.endpoint} ({worker.device.name})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _pool(args) as pool:
        workers = pool.list_workers(filter=args.filter)
    if args.format == "json":
        print_json({"workers": [json_format.MessageToDict(w) for w in workers]})
        return 0
    print_table(
        ("WORKER", "STATE", "MODEL", "TYPE", "DEVICE", "ENDPOINT", "PID", "RESTARTS"),
        [
            (
                w.name,
                _state(w.state),
                w.model,
                w.worker_type.removeprefix("worker-types/"),
                w.device.name,
                w.endpoint,
                w.pid or "-",
                w.restart_count,
            )
            for w in workers
        ],
    )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _pool(args) as pool:
        worker = pool.stop_worker(
            args.worker,
            grace=args.grace,
            force=args.force,
            timeout=(args.grace or 10) + args.timeout,
        )
    if args.format == "json":
        print_json(json_format.MessageToDict(worker))
    else:
        print(f"{worker.name} {_state(worker.state)}: {worker.state_message}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _pool(args, timeout=args.timeout + 10) as pool:  # force stops the worker first
        pool.delete_worker(worker_name(args.worker), force=args.force)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _pool(args) as pool:
        lines = pool.worker_log_lines(
            args.worker,
            follow=args.follow,
            tail=args.tail,
            timeout=None if args.follow else args.timeout,
        )
        for line in lines:
            print(line.text, flush=args.follow)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with _pool(args) as pool:
        devices = pool.list_devices()
    if args.format == "json":
        print_json({"devices": [json_format.MessageToDict(d) for d in devices]})
        return 0
    rows = []
    for d in devices:
        total = d.total_vram_bytes if d.HasField("total_vram_bytes") else d.total_ram_bytes
        free = d.free_vram_bytes if d.HasField("free_vram_bytes") else d.free_ram_bytes
        claimed = d.claimed_vram_bytes if d.HasField("total_vram_bytes") else d.claimed_ram_bytes
        rows.append(
            (
                d.name,
                d.display_name,
                human_bytes(total),
                human_bytes(free),
                human_bytes(claimed),
                ", ".join(d.workers) or "-",
            )
        )
    print_table(("DEVICE", "NAME", "MEMORY", "FREE", "CLAIMED", "WORKERS"), rows)
    return 0


def add_commands(workers: Any, sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `workers spawn|ls|stop|rm|logs` and `devices`."""

    def pool_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pool",
            default=os.environ.get("RBEE_POOL_ADDR", DEFAULT_POOL),
            help="pool address host:port (env RBEE_POOL_ADDR)",
        )

    p = workers.add_parser("spawn", parents=[common], help="spawn a worker for a model")
    pool_arg(p)
    p.add_argument("model", help="models/ID or ID (READY in the catalog)")
    p.add_argument(
        "--device", help="devices/cpu, devices/cuda-0, ... (default: the best that fits)"
    )
    p.add_argument("--type", help="worker type, e.g. cpu-llm (default: from the model)")
    p.add_argument("--id", help="the worker id")
    p.add_argument("--ctx", type=int, help="context length (LLM)")
    p.add_argument("--gpu-layers", type=int, help="GPU layers (LLM; -1: all)")
    p.add_argument("--threads", type=int, help="threads (LLM)")
    p.add_argument("--queue", type=int, help="queue capacity")
    p.add_argument("--restart", choices=("never", "on-failure"), default="never")
    p.add_argument("--max-restarts", type=int, default=5)
    p.add_argument("--force", action="store_true", help="spawn even when it does not fit")
    p.add_argument("--reuse", action="store_true", help="reuse a READY worker of the model")
    p.add_argument(
        "--preload", action="store_true", help="warm the model into the page cache first"
    )
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.add_argument("--spawn-timeout", type=float, default=600.0, help="seconds for the spawn")
    p.set_defaults(func=cmd_spawn)
    p = workers.add_parser("ls", parents=[common], help="the pool's workers")
    pool_arg(p)
    p.add_argument("--filter", default="", help="e.g. 'state=ready AND device=devices/cpu'")
    p.set_defaults(func=cmd_ls)
    p = workers.add_parser("stop", parents=[common], help="stop a worker (drain, then SIGTERM)")
    pool_arg(p)
    p.add_argument("worker")
    p.add_argument("--grace", type=float, help="seconds to drain before SIGKILL")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.set_defaults(func=cmd_stop)
    p = workers.add_parser("rm", parents=[common], help="delete a stopped worker's record")
    pool_arg(p)
    p.add_argument("worker")
    p.add_argument("--force", action="store_true", help="stop it first")
    p.set_defaults(func=cmd_rm)
    p = workers.add_parser("logs", parents=[common], help="a worker's output")
    pool_arg(p)
    p.add_argument("worker")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines first")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("devices", parents=[common], help="this hive's devices (from the pool)")
    pool_arg(p)
    p.set_defaults(func=cmd_devices)
