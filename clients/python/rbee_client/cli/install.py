"""`rbee install TYPE` and `rbee recipes ls`: worker backends built from recipes.

`rbee install` shows each phase as a line, the source fetch as a bar on a terminal (a line
elsewhere: cli/progress.py), the build output with `-v`, then `installed ...` on stdout.
`--format json` prints every event as one JSON line.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from google.protobuf import json_format

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.cli.output import print_json, print_table
from rbee_client.cli.progress import ByteCount, ProgressDisplay, progress_display
from rbee_client.errors import error_from_rpc

_STATES: dict[int, str] = {
    int(v): n.removeprefix("INSTALL_JOB_STATE_").lower() for n, v in pb.InstallJobState.items()
}


def _client(args: argparse.Namespace) -> Any:
    from rbee_client.cli.main import client_security
    from rbee_client.provisioner import ProvisionerClient

    return ProvisionerClient(args.provisioner, security=client_security(), timeout=args.timeout)


def parse_build_env(items: list[str]) -> dict[str, str]:
    """`--build-env NAME=VALUE` options as a mapping (the provisioner refuses reserved and
    secret-looking names); CliError for an item without `=`."""
    from rbee_client.cli.main import EXIT_USAGE, CliError

    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(
                f"--build-env {item!r}: expected NAME=VALUE",
                hint="for example --build-env TORCH_INDEX_URL=https://mirror.example/whl/cpu",
                code=EXIT_USAGE,
            )
        env[name] = value
    return env


def cmd_install(args: argparse.Namespace) -> int:
    worker_type = args.worker_type
    if not worker_type.startswith("worker-types/"):
        worker_type = f"worker-types/{worker_type}"
    request = pb.InstallWorkerRequest(
        worker_type=worker_type,
        options=pb.InstallOptions(
            force=args.force,
            validate_only=args.dry_run,
            recipe=args.recipe or "",
            build_env=parse_build_env(args.build_env or []),
        ),
    )
    with _client(args) as client, progress_display(args.format) as display:
        last_note = ""
        try:
            for msg in client.stub.InstallWorker(request, timeout=args.build_timeout):
                if args.format == "json":
                    print(json_format.MessageToJson(msg, indent=None), flush=True)
                elif msg.HasField("install"):
                    display.close()
                    if args.dry_run:
                        print(
                            f"dry run: the recipe and its sources check out; nothing was built "
                            f"(it would install {msg.install.name} at {msg.install.path})"
                        )
                    else:
                        print(f"installed {msg.install.name} at {msg.install.path}")
                else:
                    last_note = _show_install_progress(display, msg.progress, last_note, args)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
    return 0


def _show_install_progress(
    display: ProgressDisplay, p: pb.InstallProgress, last_note: str, args: argparse.Namespace
) -> str:
    """A phase message as a line (once), the fetch bytes as a bar, the build log with -v."""
    state = _STATES.get(p.state, "?")
    note = f"{state}: {p.message}" if p.message else ""
    if note and note != last_note:
        display.note(note)
    fetch = p.fetch_bytes
    if state == "fetching" and (fetch.completed_bytes or fetch.total_bytes):
        eta = fetch.eta.ToTimedelta().total_seconds() if fetch.HasField("eta") else None
        counts = ByteCount(
            fetch.completed_bytes,
            fetch.total_bytes or None,
            fetch.bytes_per_second,
            eta,
            fetch.reused_bytes,
        )
        display.transfer("fetch", "fetching sources", counts)
    elif state != "fetching":
        display.complete("fetch")
    if args.verbose:
        for line in p.log_lines:
            display.note(f"  {line.text}")
    return note or last_note


def cmd_recipes_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            response = client.stub.ListRecipes(
                pb.ListRecipesRequest(filter=args.filter, page_size=1000), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
    if args.format == "json":
        print_json({"recipes": [json_format.MessageToDict(r) for r in response.recipes]})
        return 0
    print_table(
        ("RECIPE", "WORKER TYPE", "PACKAGE", "VERSION", "ARCH", "THIS HOST"),
        [
            (
                r.name.removeprefix("recipes/"),
                r.worker_type.removeprefix("worker-types/"),
                r.pkgname,
                f"{r.pkgver}-{r.pkgrel}",
                ",".join(r.arch),
                "yes" if r.supported_on_host else "no",
            )
            for r in response.recipes
        ],
    )
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser, provisioner_arg: Any) -> None:
    p = sub.add_parser("install", parents=[common], help="build a worker backend from its recipe")
    provisioner_arg(p)
    p.add_argument("worker_type", help="cpu-llm, cuda-llm, metal-llm, cpu-sd, cuda-sd, metal-sd")
    p.add_argument("--recipe", help="recipes/ID (default: the worker type's recipe)")
    p.add_argument("--force", action="store_true", help="build again even when installed")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and sources only")
    p.add_argument("-v", "--verbose", action="store_true", help="print the build output")
    p.add_argument("--build-timeout", type=float, default=3600.0)
    p.add_argument(
        "--build-env",
        action="append",
        metavar="NAME=VALUE",
        help="a variable for the build's clean environment (repeatable), e.g. a package "
        "mirror: TORCH_INDEX_URL=URL, PIP_INDEX_URL=URL, PIP_FIND_LINKS=DIR; never a token",
    )
    p.set_defaults(func=cmd_install)
    recipes = sub.add_parser("recipes", help="worker backend recipes").add_subparsers(
        dest="recipes_cmd", required=True
    )
    p = recipes.add_parser("ls", parents=[common], help="the recipes and whether they build here")
    provisioner_arg(p)
    p.add_argument("--filter", default="", help="e.g. 'supported_on_host=true'")
    p.set_defaults(func=cmd_recipes_ls)
