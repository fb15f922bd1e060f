"""`rbee pull`, `rbee pulls ...` and `rbee search`: the provisioner from the command line.

`rbee pull SOURCE` prints one line per stage and file (and a progress line every few seconds
while bytes flow), then a summary line. `--format json` prints every event as one JSON line
(`{"progress": {...}}` then `{"model": {...}}`). Ctrl-C leaves the stream: the provisioner
cancels the pull when no other caller is watching, keeps the bytes on disk, and the same
command resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from rbee.catalog.v1 import catalog_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.cli.output import human_bytes, human_count, print_json, print_table
from services.catalog import convert as catalog_convert
from services.catalog.domain import Model

DEFAULT_PROVISIONER = "127.0.0.1:50081"
PROGRESS_LINE_SECONDS = 2.0


def add_provisioner_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provisioner",
        default=os.environ.get("RBEE_PROVISIONER_ADDR", DEFAULT_PROVISIONER),
        help="provisioner address host:port (env RBEE_PROVISIONER_ADDR)",
    )


def _client(args: argparse.Namespace) -> Any:
    from rbee_client.provisioner import ProvisionerClient

    return ProvisionerClient(args.provisioner, timeout=args.timeout)


def _options(args: argparse.Namespace) -> pb.PullOptions:
    return pb.PullOptions(
        revision=args.revision or "",
        files=args.file or [],
        quantization_preference=args.quant or [],
        copy=args.copy,
        bandwidth_limit_bytes_per_second=args.limit or 0,
        force=args.force,
        validate_only=args.dry_run,
        model_id=args.id or "",
        display_name=args.name or "",
    )


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _progress_text(update: Any) -> str:
    text = f"{update.state}"
    if update.file:
        text += f" {update.file} ({update.file_index}/{update.file_count})"
    if update.state == "downloading" and (update.done_bytes or update.total_bytes):
        total = human_bytes(update.total_bytes) if update.total_bytes else "?"
        text += f" {human_bytes(update.done_bytes)}/{total}"
        if update.bytes_per_second:
            text += f" {human_bytes(int(update.bytes_per_second))}/s eta {_eta(update.eta_seconds)}"
        if update.reused_bytes:
            text += f" ({human_bytes(update.reused_bytes)} reused)"
    if update.message:
        text += f": {update.message}"
    return text


def _print_stream(args: argparse.Namespace, stream: Any) -> Model | None:
    """Print a pull stream; returns the final model."""
    from rbee_client.provisioner import PullUpdate

    as_json = args.format == "json"
    last_key: tuple[str, str, str] | None = None
    last_line = 0.0
    model: Model | None = None
    for item in stream:
        if isinstance(item, PullUpdate):
            if as_json:
                print(json.dumps({"progress": json_format.MessageToDict(item.raw)}), flush=True)
                continue
            key = (item.state, item.file, item.message)
            now = time.monotonic()
            if key != last_key or now - last_line >= PROGRESS_LINE_SECONDS:
                print(_progress_text(item), file=sys.stderr, flush=True)
                last_key, last_line = key, now
        else:
            model = item
            if as_json:
                msg = catalog_convert.model_to_pb(item)
                print(json.dumps({"model": json_format.MessageToDict(msg)}), flush=True)
    return model


def local_source(source: str) -> str:
    """The provisioner does not share our working directory: relative local paths (`file:x`,
    `./x`, `../x`, `~/x`) become absolute `file:` sources here; everything else is sent as is."""
    if source.startswith("file:"):
        path = source.removeprefix("file:")
        return f"file:{Path(path).expanduser().absolute()}" if path else source
    if source.startswith(("./", "../", "~")):
        return f"file:{Path(source).expanduser().absolute()}"
    return source


def cmd_pull(args: argparse.Namespace) -> int:
    from rbee_client.cli.main import EXIT_INTERRUPTED

    with _client(args) as client:
        stream = client.pull(local_source(args.source), options=_options(args))
        try:
            model = _print_stream(args, stream)
        except KeyboardInterrupt:
            stream.close()
            print(
                "interrupted: the pull stops unless another caller watches it; the bytes on "
                "disk are kept, and running the same command resumes it",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    if model is not None and args.format != "json":
        state = catalog_pb2.ModelState.Name(catalog_convert.STATE_TO_PB[model.state])
        verb = "would create" if args.dry_run else "pulled"
        print(
            f"{verb} {model.name} ({state.removeprefix('MODEL_STATE_').lower()}, "
            f"{human_bytes(model.size_bytes)}"
            + (f", sha256 {model.sha256[:16]}…" if model.sha256 else "")
            + ")"
        )
    return 0


def _pull_row(p: pb.Pull) -> tuple[Any, ...]:
    state = pb.PullState.Name(p.state).removeprefix("PULL_STATE_").lower()
    total = p.total_bytes.total_bytes
    return (
        p.name,
        state,
        p.source,
        (
            f"{human_bytes(p.total_bytes.completed_bytes)}/{human_bytes(total) if total else '?'}"
            if p.files
            else "-"  # nothing to transfer (a local file registered in place)
        ),
        p.model or "-",
        p.error.message[:60] if p.HasField("error") else p.state_message[:60],
    )


def cmd_pulls_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pulls = client.list_pulls(filter=args.filter)
    if args.format == "json":
        print_json({"pulls": [json_format.MessageToDict(p) for p in pulls]})
        return 0
    print_table(
        ("PULL", "STATE", "SOURCE", "BYTES", "MODEL", "NOTE"), [_pull_row(p) for p in pulls]
    )
    return 0


def _pull_name(text: str) -> str:
    return text if text.startswith("pulls/") else f"pulls/{text}"


def cmd_pulls_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pull = client.get_pull(_pull_name(args.pull))
    print_json(json_format.MessageToDict(pull))
    return 0


def cmd_pulls_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pull = client.cancel_pull(_pull_name(args.pull), discard_partial=args.discard)
    if args.format == "json":
        print_json(json_format.MessageToDict(pull))
    else:
        print(f"{pull.name}: {pb.PullState.Name(pull.state).removeprefix('PULL_STATE_').lower()}")
    return 0


def cmd_pulls_resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = _print_stream(args, client.resume(_pull_name(args.pull)))
    if model is not None and args.format != "json":
        print(f"pulled {model.name} ({human_bytes(model.size_bytes)})")
    return 0


def cmd_pulls_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_pull(_pull_name(args.pull), force=args.force)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    kind = {
        "hf": catalog_pb2.SOURCE_KIND_HUGGINGFACE,
        "civitai": catalog_pb2.SOURCE_KIND_CIVITAI,
    }[args.source]
    fmt = {
        None: catalog_pb2.MODEL_FORMAT_UNSPECIFIED,
        "gguf": catalog_pb2.MODEL_FORMAT_GGUF,
        "safetensors": catalog_pb2.MODEL_FORMAT_SAFETENSORS,
        "diffusers": catalog_pb2.MODEL_FORMAT_DIFFUSERS,
    }[args.model_format]
    sort = {
        None: pb.SEARCH_SORT_UNSPECIFIED,
        "downloads": pb.SEARCH_SORT_DOWNLOADS,
        "likes": pb.SEARCH_SORT_LIKES,
        "updated": pb.SEARCH_SORT_UPDATED,
    }[args.sort]
    request = pb.SearchModelsRequest(
        query=args.query,
        source=kind,
        format=fmt,
        task=args.task or "",
        family=args.family or "",
        sort=sort,
        page_size=args.limit,
    )
    with _client(args) as client:
        response = client.search(request)
    if args.format == "json":
        print_json(json_format.MessageToDict(response))
        return 0
    rows = [
        (
            r.source,
            r.task or r.civitai_type or "-",
            r.base_model or "-",
            human_count(r.downloads),
            human_count(r.likes),
            len(r.files),
        )
        for r in response.results
    ]
    print_table(("SOURCE", "TASK/TYPE", "BASE", "DOWNLOADS", "LIKES", "FILES"), rows)
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register pull, pulls and search on the top-level subparsers."""
    p = sub.add_parser(
        "pull",
        parents=[common],
        help="pull a model: hf:ORG/REPO[:FILE][@REV], civitai:VERSION, https://..., file:PATH",
    )
    add_provisioner_argument(p)
    p.add_argument("source")
    p.add_argument("--file", action="append", help="files to pull (globs allowed); repeatable")
    p.add_argument("--revision", help="branch, tag or commit (HF)")
    p.add_argument("--quant", action="append", help="quantization preference, best first")
    p.add_argument("--copy", action="store_true", help="local sources: copy into RBEE_HOME")
    p.add_argument("--limit", type=int, default=0, help="bandwidth limit, bytes per second")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--dry-run", action="store_true", help="resolve and check only")
    p.add_argument("--id", help="the catalog model id to create")
    p.add_argument("--name", help="display name")
    p.set_defaults(func=cmd_pull)

    pulls = sub.add_parser("pulls", help="pull jobs").add_subparsers(
        dest="pulls_cmd", required=True
    )
    p = pulls.add_parser("ls", parents=[common], help="list pulls, newest first")
    add_provisioner_argument(p)
    p.add_argument("--filter", default="", help="e.g. 'state=paused AND source=huggingface'")
    p.set_defaults(func=cmd_pulls_ls)
    for name, func, text in (
        ("show", cmd_pulls_show, "one pull in full (JSON)"),
        ("cancel", cmd_pulls_cancel, "cancel a pull (bytes kept for resume)"),
        ("resume", cmd_pulls_resume, "resume a paused, cancelled or failed pull"),
        ("rm", cmd_pulls_rm, "delete a finished pull and its partial files"),
    ):
        p = pulls.add_parser(name, parents=[common], help=text)
        add_provisioner_argument(p)
        p.add_argument("pull", help="pulls/ID or ID")
        if name == "cancel":
            p.add_argument("--discard", action="store_true", help="delete the partial files")
        if name == "rm":
            p.add_argument("--force", action="store_true", help="cancel it first when running")
        p.set_defaults(func=func)

    p = sub.add_parser("search", parents=[common], help="search the HF Hub or CivitAI")
    add_provisioner_argument(p)
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--source", choices=("hf", "civitai"), default="hf")
    p.add_argument(
        "--model-format", choices=("gguf", "safetensors", "diffusers"), help="file format"
    )
    p.add_argument("--task", help="text-generation, text-to-image, ...")
    p.add_argument("--family", help="HF tag or CivitAI baseModel (e.g. 'SDXL 1.0')")
    p.add_argument("--sort", choices=("downloads", "likes", "updated"))
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_search)

    from rbee_client.cli.preload import add_commands as add_preload_commands

    add_preload_commands(sub, common)  # rbee preload, rbee preloads ls|rm
    from rbee_client.cli.install import add_commands as add_install_commands

    add_install_commands(sub, common, add_provisioner_argument)
