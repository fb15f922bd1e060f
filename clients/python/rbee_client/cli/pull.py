"""`rbee pull`, `rbee pulls ...` and `rbee search`: the provisioner from the command line.

`rbee pull SOURCE` shows one bar per file on a terminal (bytes, rate, ETA; a spinner while the
total is unknown) and plain lines elsewhere (cli/progress.py), then one summary line on stdout:
model, files, bytes, reused bytes, time, average rate and whether the sha256 was verified.
`--format json` prints every event as one JSON line (`{"progress": {...}}` then
`{"model": {...}}`).

Ctrl-C: when this command started the pull (it was the pull's only caller when the pull's first
event came), the CLI cancels it explicitly with CancelPull; the bytes on disk are kept and the
message names the commands that resume it (`rbee pulls resume ID`, or the same `rbee pull`).
When it attached to a pull someone else started, it only leaves: the pull goes on for them (and
the provisioner cancels it once no caller watches). Either way the exit code is 130.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from rbee.catalog.v1 import catalog_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.cli.output import human_bytes, human_count, print_json, print_table
from rbee_client.cli.progress import ByteCount, ProgressDisplay, progress_display
from rbee_client.errors import RbeeClientError
from services.catalog import convert as catalog_convert
from services.catalog.domain import CompatibilityResult, Device, Model, ModelMetadata, Verdict

DEFAULT_PROVISIONER = "127.0.0.1:50081"


def add_provisioner_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provisioner",
        default=os.environ.get("RBEE_PROVISIONER_ADDR", DEFAULT_PROVISIONER),
        help="provisioner address host:port (env RBEE_PROVISIONER_ADDR)",
    )


def _client(args: argparse.Namespace) -> Any:
    from rbee_client.cli.main import client_security
    from rbee_client.provisioner import ProvisionerClient

    return ProvisionerClient(args.provisioner, security=client_security(), timeout=args.timeout)


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


def _pull_id(name: str) -> str:
    return name.removeprefix("pulls/")


@dataclass
class PullFollower:
    """Draws one pull stream and remembers what the summary and Ctrl-C need."""

    display: ProgressDisplay
    as_json: bool
    pull: str = ""  # pulls/ID, from the first event
    file_count: int = 0
    done_bytes: int = 0
    total_bytes: int | None = None
    reused_bytes: int = 0
    model: Model | None = None
    _last_note: tuple[str, str] = ("", "")
    _files_seen: list[str] = field(default_factory=list)
    # Per file, (seconds, bytes) when first seen: its own rate when files transfer at once.
    _file_start: dict[str, tuple[float, int]] = field(default_factory=dict)

    def show(self, item: Any) -> None:
        """One stream item: a PullUpdate (progress) or the final Model."""
        from rbee_client.provisioner import PullUpdate

        if not isinstance(item, PullUpdate):
            self.model = item
            if self.as_json:
                msg = catalog_convert.model_to_pb(item)
                print(json.dumps({"model": json_format.MessageToDict(msg)}), flush=True)
            return
        self.pull = self.pull or item.pull
        self.file_count = item.file_count or self.file_count
        self.done_bytes, self.total_bytes = item.done_bytes, item.total_bytes
        self.reused_bytes = item.reused_bytes
        if self.as_json:
            print(json.dumps({"progress": json_format.MessageToDict(item.raw)}), flush=True)
            return
        # A new stage or message is a note; bytes of a file are a transfer (bar or line).
        covered = item.state == "downloading" and item.file and not item.message
        if (item.state, item.message) != self._last_note and not covered:
            self.display.note(f"{item.state}: {item.message}" if item.message else item.state)
        self._last_note = (item.state, item.message)
        if item.state == "downloading" and item.file:
            # Several files of a pull may transfer at once, their events interleaved: a file
            # is complete when its bytes are, not when another file shows up.
            if item.file not in self._files_seen:
                self._files_seen.append(item.file)
            self.display.transfer(item.file, _file_label(item), self._file_counts(item))
            if item.file_total is not None and item.file_done >= item.file_total:
                self.display.complete(item.file)
        elif item.state in {"verifying", "registering"}:
            for seen in self._files_seen:
                self.display.complete(seen)

    def _file_counts(self, update: Any) -> ByteCount:
        """The file's bytes, rate and ETA: the pull's rate for a one-file pull; with several,
        the file's own average since this command first saw it (once it has moved)."""
        if update.file_count <= 1:
            return _file_counts(update)
        now = time.monotonic()
        started, done_then = self._file_start.setdefault(update.file, (now, update.file_done))
        elapsed, moved = now - started, update.file_done - done_then
        return _file_counts(update, moved / elapsed if elapsed >= 0.5 and moved > 0 else 0.0)

    def follow(self, stream: Any) -> Model | None:
        for item in stream:
            self.show(item)
        return self.model


def _file_label(update: Any) -> str:
    label = f"downloading {update.file}"
    return f"{label} ({update.file_index}/{update.file_count})" if update.file_count else label


def _file_counts(update: Any, rate: float | None = None) -> ByteCount:
    """The file's bytes, with `rate` (default: the pull's) and the ETA at that rate."""
    rate = float(update.bytes_per_second) if rate is None else rate
    eta = None
    if update.file_total is not None and rate > 0:
        eta = max(0.0, (update.file_total - update.file_done) / rate)
    reused = update.reused_bytes if update.file_count <= 1 else 0
    return ByteCount(update.file_done, update.file_total, rate, eta, reused)


def local_source(source: str) -> str:
    """The provisioner does not share our working directory: relative local paths (`file:x`,
    `./x`, `../x`, `~/x`) become absolute `file:` sources here; everything else is sent as is."""
    if source.startswith("file:"):
        path = source.removeprefix("file:")
        return f"file:{Path(path).expanduser().absolute()}" if path else source
    if source.startswith(("./", "../", "~")):
        return f"file:{Path(source).expanduser().absolute()}"
    return source


def _alone_on(client: Any, pull: str) -> bool:
    """Whether this caller is the pull's only watcher (then it counts as the one that started
    it). When the provisioner cannot say, assume so: cancelling is what Ctrl-C asks for."""
    try:
        return bool(client.get_pull(pull).watcher_count <= 1)
    except RbeeClientError:
        return True


def verification_text(pull: pb.Pull | None, model: Model) -> str:
    """ "sha256 verified" when every file matched the hash the source published; "sha256 ...
    computed" when the source published none (the hash is recorded, nothing to compare)."""
    files = list(pull.files) if pull is not None else []
    if files and all(f.expected_sha256 and f.sha256 == f.expected_sha256 for f in files):
        return "sha256 verified"
    if files and all(f.sha256 for f in files):
        return "sha256 computed (the source publishes no hash for some files)"
    return f"sha256 {model.sha256[:16]}…" if model.sha256 else "no sha256"


def pull_summary(model: Model, pull: pb.Pull | None, follower: PullFollower, elapsed: float) -> str:
    """The one line `rbee pull` ends with."""
    total = follower.total_bytes or model.size_bytes
    reused = follower.reused_bytes
    files = len(pull.files) if pull is not None and pull.files else follower.file_count
    if pull is not None and pull.total_bytes.total_bytes:
        total = pull.total_bytes.total_bytes
        reused = pull.total_bytes.reused_bytes
    moved = max(0, (total or 0) - reused)
    rate = f" at {human_bytes(int(moved / elapsed))}/s" if elapsed > 0 and moved else ""
    text = f"pulled {model.name}: {files} file{'s' if files != 1 else ''}, {human_bytes(total)}"
    if reused:
        text += f" ({human_bytes(reused)} reused)"
    text += f" in {elapsed:.1f}s{rate}, {verification_text(pull, model)}"
    return text


def _get_pull(client: Any, name: str) -> pb.Pull | None:
    if not name:
        return None
    try:
        pull: pb.Pull = client.get_pull(name)
        return pull
    except RbeeClientError:
        return None


def _interrupted(
    args: argparse.Namespace, client: Any, follower: PullFollower, started_it: bool | None
) -> int:
    """Ctrl-C: cancel the pull this command started (bytes kept), or leave one it attached to."""
    from rbee_client.cli.main import EXIT_INTERRUPTED

    err = sys.stderr
    again = shlex.join(["rbee", "pull", args.source])
    if not follower.pull:
        print(f"interrupted before the pull started; run `{again}` to start it", file=err)
        return EXIT_INTERRUPTED
    pull_id = _pull_id(follower.pull)
    resume = f"rbee pulls resume {pull_id}"
    state = ""
    if started_it is not False:
        try:
            cancelled = client.cancel_pull(follower.pull)
            state = pb.PullState.Name(cancelled.state).removeprefix("PULL_STATE_").lower()
        except RbeeClientError as exc:
            if exc.reason == "JOB_FINISHED":  # it succeeded as the key was pressed
                print(f"interrupted: {follower.pull} had already finished", file=err)
                return EXIT_INTERRUPTED
            raise
        kept = human_bytes(follower.done_bytes)
        of = f" of {human_bytes(follower.total_bytes)}" if follower.total_bytes else ""
        print(
            f"cancelled {follower.pull} ({kept}{of} kept on disk); resume it with "
            f"`{resume}` or `{again}`",
            file=err,
        )
    else:
        print(
            f"left {follower.pull}: another caller started it and it goes on while anyone "
            f"watches; follow it with `{again}`, stop it with `rbee pulls cancel {pull_id}`",
            file=err,
        )
    if follower.as_json:
        print(
            json.dumps(
                {
                    "interrupted": {
                        "pull": follower.pull,
                        "state": state or "running",
                        "cancelled": bool(state),
                        "resume": [resume, again],
                    }
                }
            ),
            flush=True,
        )
    return EXIT_INTERRUPTED


def cmd_pull(args: argparse.Namespace) -> int:
    began = time.monotonic()
    with _client(args) as client:
        stream = client.pull(local_source(args.source), options=_options(args))
        with progress_display(args.format) as display:
            follower = PullFollower(display, as_json=args.format == "json")
            started_it: bool | None = None
            try:
                for item in stream:
                    follower.show(item)
                    if started_it is None and follower.pull and not args.dry_run:
                        started_it = _alone_on(client, follower.pull)
            except KeyboardInterrupt:
                display.close()  # stop the live bars before the message
                stream.close()
                return _interrupted(args, client, follower, started_it)
        model = follower.model
        if model is None or args.format == "json":
            return 0
        if args.dry_run:
            state = catalog_pb2.ModelState.Name(catalog_convert.STATE_TO_PB[model.state])
            print(
                f"would create {model.name} ({state.removeprefix('MODEL_STATE_').lower()}, "
                f"{human_bytes(model.size_bytes)})"
            )
            return 0
        pull = _get_pull(client, follower.pull)
    print(pull_summary(model, pull, follower, time.monotonic() - began))
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
    began = time.monotonic()
    name = _pull_name(args.pull)
    with _client(args) as client:
        stream = client.resume(name)
        with progress_display(args.format) as display:
            follower = PullFollower(display, as_json=args.format == "json", pull=name)
            try:
                model = follower.follow(stream)
            except KeyboardInterrupt:
                display.close()
                stream.close()
                return _interrupted_resume(client, follower)
        pull = _get_pull(client, name) if model is not None else None
    if model is not None and args.format != "json":
        print(pull_summary(model, pull, follower, time.monotonic() - began))
    return 0


def _interrupted_resume(client: Any, follower: PullFollower) -> int:
    """Ctrl-C during `rbee pulls resume`: the user asked for this pull, so stop it again."""
    from rbee_client.cli.main import EXIT_INTERRUPTED

    pull_id = _pull_id(follower.pull)
    try:
        client.cancel_pull(follower.pull)
    except RbeeClientError as exc:
        if exc.reason != "JOB_FINISHED":
            raise
        print(f"interrupted: {follower.pull} had already finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"cancelled {follower.pull} (bytes kept on disk); resume it with "
        f"`rbee pulls resume {pull_id}`",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def cmd_pulls_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_pull(_pull_name(args.pull), force=args.force)
    return 0


# ---- remote inspection: `rbee search --inspect` and `rbee compat SOURCE` ---------------------

# Best first: what a user most wants to hear about a model on this hive.
_VERDICT_RANK = {
    Verdict.FITS_GPU: 0,
    Verdict.COMPATIBLE: 1,
    Verdict.CPU_ONLY: 1,
    Verdict.PARTIAL_OFFLOAD: 2,
    Verdict.TOO_LARGE: 3,
    Verdict.NEEDS_COMPONENTS: 4,
    Verdict.UNSUPPORTED_DEVICE: 5,
    Verdict.UNSUPPORTED_MODEL_TYPE: 6,
    Verdict.UNSUPPORTED_ARCH: 6,
    Verdict.UNSUPPORTED_FORMAT: 7,
}


@dataclass(frozen=True)
class RemoteCompatibility:
    """What InspectRemote says about a source: its header's metadata and, per device of the
    hive (or the devices asked for), the catalog's verdict per worker type."""

    source: str
    metadata: ModelMetadata
    devices: list[tuple[Device, list[CompatibilityResult]]]
    bytes_read: int
    files: list[str]


def is_remote_source(text: str) -> bool:
    """hf:..., civitai:..., http(s)://... or ORG/REPO[:FILE]; a catalog id (`ID`,
    `models/ID`) is not."""
    lowered = text.lower()
    if lowered.startswith(("hf:", "civitai:", "http://", "https://")):
        return True
    return not lowered.startswith("models/") and "/" in text.split(":", 1)[0]


def inspect_remote_source(
    client: Any, source: str, *, devices: Sequence[Device] = (), context_length: int = 0
) -> RemoteCompatibility:
    """InspectRemote: the header only (HTTP Range), never the weights. The verdicts are the
    catalog's EvaluateCompatibility on the inspected metadata (the provisioner asks it)."""
    response = client.inspect_remote(
        source,
        context_length=context_length,
        devices=[catalog_convert.device_to_pb(d) for d in devices],
    )
    return RemoteCompatibility(
        source=source,
        metadata=catalog_convert.metadata_from_pb(response.metadata),
        devices=[
            (
                catalog_convert.device_from_pb(dc.device),
                [catalog_convert.compat_result_from_pb(r) for r in dc.results],
            )
            for dc in response.compatibility
        ],
        bytes_read=int(response.bytes_read),
        files=[f.path for f in response.resolution.files],
    )


def best_verdict(report: RemoteCompatibility) -> tuple[str, CompatibilityResult | None, str]:
    """(badge, best result, device name): e.g. ("runs: cpu-llm on cpu (cpu_only)", ...), or
    "no worker type (unsupported_arch)" when nothing here can run it."""
    ranked = sorted(
        (
            (r, device.name or device.kind.value)
            for device, results in report.devices
            for r in results
        ),
        key=lambda pair: _VERDICT_RANK.get(pair[0].verdict, 9),
    )
    if not ranked:
        return "no worker type", None, ""
    best, device = ranked[0]
    if best.runnable:
        return f"runs: {best.worker_type} on {device} ({best.verdict.value})", best, device
    if best.verdict is Verdict.TOO_LARGE:
        return f"too large: {best.worker_type} on {device}", best, device
    return f"no worker type ({best.verdict.value})", best, device


def _badge(client: Any, source: str, context_length: int) -> dict[str, Any]:
    try:
        report = inspect_remote_source(client, source, context_length=context_length)
    except RbeeClientError as exc:
        return {"badge": f"not inspected: {exc.reason or exc.code}", "error": exc.message}
    badge, best, device = best_verdict(report)
    return {
        "badge": badge,
        "worker_type": best.worker_type if best else "",
        "verdict": best.verdict.value if best else "",
        "device": device,
        "bytes_read": report.bytes_read,
    }


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
        hits = list(response.results)[: max(0, args.inspect)]
        # Headers only, a few Range requests each: the top hits side by side.
        with ThreadPoolExecutor(max_workers=4) as pool:
            badges = list(pool.map(lambda r: _badge(client, r.source, args.ctx or 0), hits))
    if args.format == "json":
        doc = json_format.MessageToDict(response)
        for result, badge in zip(doc.get("results", []), badges, strict=False):
            result["hive"] = badge
        print_json(doc)
        return 0
    rows = [
        (
            r.source,
            r.task or r.civitai_type or "-",
            r.base_model or "-",
            human_count(r.downloads),
            human_count(r.likes),
            len(r.files),
            *((badges[i]["badge"] if i < len(badges) else "-",) if args.inspect else ()),
        )
        for i, r in enumerate(response.results)
    ]
    columns = ("SOURCE", "TASK/TYPE", "BASE", "DOWNLOADS", "LIKES", "FILES")
    print_table((*columns, "THIS HIVE") if args.inspect else columns, rows)
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
    p.add_argument(
        "--inspect",
        type=int,
        default=0,
        metavar="N",
        help="read the top N hits' headers (no download) and show whether this hive runs them",
    )
    p.add_argument("--ctx", type=int, default=None, help="context length for --inspect's fit")
    p.set_defaults(func=cmd_search)

    from rbee_client.cli.preload import add_commands as add_preload_commands

    add_preload_commands(sub, common)  # rbee preload, rbee preloads ls|rm
    from rbee_client.cli.install import add_commands as add_install_commands

    add_install_commands(sub, common, add_provisioner_argument)
