"""`rbee workers spawn|ls|stop|rm|logs` and `rbee devices`: the pool from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from rbee.worker.v1 import load_pb2, pool_pb2_grpc
from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import worker_pb2 as wpb
from rbee_client.cli.output import human_bytes, print_json, print_table
from rbee_client.errors import error_from_rpc

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


class _Pool:
    def __init__(self, args: argparse.Namespace) -> None:
        self._channel = grpc.insecure_channel(args.pool)
        self.stub = pool_pb2_grpc.PoolServiceStub(self._channel)
        self.timeout = args.timeout

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()


def _call(fn: Any, request: Any, timeout: float | None) -> Any:
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def _stream(call: Any) -> Iterator[Any]:
    try:
        yield from call
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def _name(text: str) -> str:
    return text if text.startswith("workers/") else f"workers/{text}"


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
    with _Pool(args) as pool:
        for msg in _stream(pool.stub.SpawnWorker(request, timeout=args.spawn_timeout)):
            if msg.HasField("worker"):
                worker = msg.worker
                if args.format == "json":  # one JSON object per line, as the progress lines
                    print(json_format.MessageToJson(msg, indent=None), flush=True)
            elif args.format == "json":
                print(json_format.MessageToJson(msg, indent=None), flush=True)
            else:
                p = msg.progress
                print(f"{_stage(p.stage)}: {p.message}", file=sys.stderr, flush=True)
    if worker is not None and args.format != "json":
        print(f"{worker.name} {_state(worker.state)} on {worker.endpoint} ({worker.device.name})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _Pool(args) as pool:
        response = _call(
            pool.stub.ListWorkers, pb.ListWorkersRequest(filter=args.filter), pool.timeout
        )
    if args.format == "json":
        print_json({"workers": [json_format.MessageToDict(w) for w in response.workers]})
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
            for w in response.workers
        ],
    )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    request = pb.StopWorkerRequest(name=_name(args.worker), force=args.force)
    if args.grace is not None:
        request.grace.CopyFrom(Duration(seconds=int(args.grace), nanos=int(args.grace % 1 * 1e9)))
    with _Pool(args) as pool:
        worker = _call(pool.stub.StopWorker, request, (args.grace or 10) + args.timeout)
    if args.format == "json":
        print_json(json_format.MessageToDict(worker))
    else:
        print(f"{worker.name} {_state(worker.state)}: {worker.state_message}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _Pool(args) as pool:
        _call(
            pool.stub.DeleteWorker,
            pb.DeleteWorkerRequest(name=_name(args.worker), force=args.force),
            args.timeout + 10,
        )
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    request = pb.GetWorkerLogsRequest(
        name=_name(args.worker), follow=args.follow, tail_lines=args.tail
    )
    with _Pool(args) as pool:
        for msg in _stream(
            pool.stub.GetWorkerLogs(request, timeout=None if args.follow else args.timeout)
        ):
            for line in msg.lines:
                print(line.text, flush=args.follow)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with _Pool(args) as pool:
        response = _call(pool.stub.ListDevices, pb.ListDevicesRequest(), pool.timeout)
    if args.format == "json":
        print_json({"devices": [json_format.MessageToDict(d) for d in response.devices]})
        return 0
    rows = []
    for d in response.devices:
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
