"""`rbee preload MODEL` and `rbee preloads ls|rm`: page-cache preloading from the command line.

`rbee preload MODEL` warms the model's files into the page cache: a bar on a terminal, a
progress line every few seconds elsewhere (cli/progress.py), then a summary on stdout (residency
measured with mincore, time, rate, and the models evicted to stay within the provisioner's RAM
budget). `--format json` prints every event as one JSON line (`{"progress": {...}}` then
`{"preload": {...}}`). Ctrl-C stops the read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf import json_format

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.cli.output import human_bytes, print_json, print_table
from rbee_client.cli.progress import ByteCount, ProgressDisplay, progress_display
from rbee_client.cli.pull import add_provisioner_argument


def _client(args: argparse.Namespace) -> Any:
    from rbee_client.cli.main import client_security
    from rbee_client.provisioner import ProvisionerClient

    return ProvisionerClient(args.provisioner, security=client_security(), timeout=args.timeout)


def _model_name(text: str) -> str:
    return text if text.startswith("models/") else f"models/{text}"


def _preload_name(text: str) -> str:
    if text.startswith("models/"):
        text = text.removeprefix("models/")
    return text if text.startswith("preloads/") else f"preloads/{text}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _show(display: ProgressDisplay, update: Any) -> None:
    """One preload event: the bytes count over all the model's files, so one bar for the
    model, labelled with the file being read."""
    label = f"warming {update.file} ({update.file_index}/{update.file_count})"
    counts = ByteCount(
        update.done_bytes,
        update.total_bytes or None,
        update.bytes_per_second,
        update.eta_seconds,
        update.resident_before_bytes,
    )
    display.transfer(update.model or "preload", label, counts)


def _summary(preload: pb.Preload) -> str:
    seconds = preload.duration.ToTimedelta().total_seconds()
    rate = f", {human_bytes(int(preload.total_bytes / seconds))}/s" if seconds > 0 else ""
    text = (
        f"preloaded {preload.model}: {_percent(preload.resident_bytes, preload.total_bytes)} "
        f"resident ({human_bytes(preload.resident_bytes)} of {human_bytes(preload.total_bytes)}) "
        f"in {seconds:.2f}s{rate}"
    )
    if preload.pinned:
        text += ", pinned"
    if preload.evicted_models:
        text += f"; evicted {', '.join(preload.evicted_models)}"
    return text


def cmd_preload(args: argparse.Namespace) -> int:
    from rbee_client.cli.main import EXIT_INTERRUPTED
    from rbee_client.provisioner import PreloadUpdate

    as_json = args.format == "json"
    final: pb.Preload | None = None
    with _client(args) as client, progress_display(args.format) as display:
        stream = client.preload(_model_name(args.model), pin=args.pin)
        try:
            for item in stream:
                if isinstance(item, PreloadUpdate):
                    if as_json:
                        progress = json_format.MessageToDict(item.raw)
                        print(json.dumps({"progress": progress}), flush=True)
                    else:
                        _show(display, item)
                else:
                    final = item
        except KeyboardInterrupt:
            display.close()
            stream.close()
            print("interrupted: the preload stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
    if final is not None:
        if as_json:
            print(json.dumps({"preload": json_format.MessageToDict(final)}), flush=True)
        else:
            print(_summary(final))
    return 0


def cmd_preloads_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list_preloads()
    if args.format == "json":
        print_json(json_format.MessageToDict(listing, always_print_fields_with_no_presence=True))
        return 0
    rows = [
        (
            p.name,
            p.model,
            human_bytes(p.total_bytes),
            f"{human_bytes(p.resident_bytes)} ({_percent(p.resident_bytes, p.total_bytes)})",
            "yes" if p.pinned else "no",
            p.last_used_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
        for p in listing.preloads
    ]
    print_table(("PRELOAD", "MODEL", "SIZE", "RESIDENT", "PINNED", "LAST USED (UTC)"), rows)
    budget = human_bytes(listing.budget_bytes) if listing.budget_bytes else "none"
    print(
        f"budget {budget}, resident {human_bytes(listing.resident_bytes)}, "
        f"evictions {listing.evictions}"
    )
    return 0


def cmd_preloads_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_preload(_preload_name(args.preload), allow_missing=args.allow_missing)
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register preload and preloads on the top-level subparsers."""
    p = sub.add_parser("preload", parents=[common], help="warm a model's files into the page cache")
    add_provisioner_argument(p)
    p.add_argument("model", help="models/ID or ID (a READY model)")
    p.add_argument(
        "--pin", action="store_true", help="never evict it for the budget (until preloads rm)"
    )
    p.set_defaults(func=cmd_preload)

    preloads = sub.add_parser("preloads", help="preloaded models").add_subparsers(
        dest="preloads_cmd", required=True
    )
    p = preloads.add_parser(
        "ls", parents=[common], help="preloads, most recently used first, with the budget"
    )
    add_provisioner_argument(p)
    p.set_defaults(func=cmd_preloads_ls)
    p = preloads.add_parser("rm", parents=[common], help="evict a preload from the page cache")
    add_provisioner_argument(p)
    p.add_argument("preload", help="preloads/ID, models/ID or ID")
    p.add_argument("--allow-missing", action="store_true", help="succeed when not preloaded")
    p.set_defaults(func=cmd_preloads_rm)
