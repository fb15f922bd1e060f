"""The `rbee` command line (the tour: docs/CLI.md).

Output: data on stdout, messages and progress on stderr; `--format json` on every command that
prints data; NO_COLOR (any non-empty value) turns off every colour and style (cli/output.py).
Errors are one line on stderr with a hint (the traceback only with RBEE_DEBUG=1); with
`--format json` an `{"error": {...}}` object is also printed on stdout.

Exit codes (this is the one list: `rbee --help` prints EXIT_CODES_HELP, docs/CLI.md repeats it):
  0    success (`rbee status`: every service serving)
  1    the operation failed: bad file, not found, refused, failed pull (`rbee status`: a service
       answered but is not serving)
  2    usage error: unknown command or option, missing argument
  3    a service could not be reached (`rbee status`: any service or worker unreachable)
  130  interrupted (Ctrl-C); `rbee pull` cancels the pull it started and says how to resume
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rbee_client.cli.chart import CHART_FORMATS, add_chart_arguments, cmd_compat_chart
from rbee_client.cli.output import (
    human_bytes,
    human_count,
    print_fields,
    print_json,
    print_reasons,
    print_table,
    stderr_console,
)
from rbee_client.errors import RbeeClientError, ServiceUnavailableError
from services.common.channels import ChannelSecurity

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success (rbee status: every service serving)
  1    the operation failed (rbee status: a service answered but is not serving)
  2    usage error
  3    a service could not be reached (rbee status: any service or worker unreachable)
  130  interrupted (Ctrl-C; rbee pull cancels the pull it started and says how to resume)

NO_COLOR=1 turns colours off; RBEE_DEBUG=1 prints tracebacks. The tour: docs/CLI.md."""

DEFAULT_CATALOG = "127.0.0.1:50061"

INSPECT_KEYS = (
    "format",
    "model_type",
    "name",
    "architecture",
    "family",
    "variant",
    "quantization",
    "parameter_count",
    "context_length",
    "block_count",
    "embedding_length",
    "head_count",
    "head_count_kv",
    "key_length",
    "value_length",
    "expert_count",
    "expert_used_count",
    "vocab_size",
    "tokenizer_model",
    "has_chat_template",
    "kv_cache_bytes_per_token",
    "needs_components",
    "dtypes",
    "tensor_count",
    "split",
    "size_bytes",
    "hints",
    "warnings",
)


class CliError(Exception):
    """A failure to report as one line (with an optional hint) and an exit code."""

    def __init__(
        self, message: str, *, hint: str = "", code: int = EXIT_FAILED, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.reason = reason


def client_security() -> ChannelSecurity:
    """Token and TLS for every client the CLI opens: RBEE_TOKEN and RBEE_TLS_* (see
    services.common.channels). A half-configured mutual TLS is a usage error."""
    try:
        return ChannelSecurity.from_env()
    except ValueError as exc:
        raise CliError(
            str(exc), hint="set both RBEE_TLS_CERT and RBEE_TLS_KEY", code=EXIT_USAGE
        ) from None


# ---- models inspect (local, no service) ------------------------------------------------------


def inspect_report(path: Path, *, context_length: int | None = None) -> dict[str, Any]:
    """The `rbee models inspect` document: parsed metadata plus a verdict per worker type."""
    from services.catalog import compat
    from services.catalog.inspect import inspect_path
    from services.catalog.worker_types import WorkerTypeRegistry

    metadata = inspect_path(path)
    dumped = metadata.model_dump(mode="json")
    report: dict[str, Any] = {"path": str(path)}
    for key in INSPECT_KEYS:
        report[key] = dumped.get(key)
    report["weights_bytes"] = metadata.weights.total_bytes if metadata.weights else None
    results = compat.evaluate_all(
        metadata, WorkerTypeRegistry().list(), context_length=context_length
    )
    report["compatibility"] = [
        {
            "worker_type": r.worker_type,
            "verdict": r.verdict.value,
            "reasons": list(r.reasons),
            "memory": r.memory.model_dump(mode="json") if r.memory else None,
        }
        for r in results
    ]
    return report


def cmd_models_inspect(args: argparse.Namespace) -> int:
    from services.catalog.inspect import InspectError
    from services.common.errors import NotFound

    path = Path(args.path).expanduser()
    try:
        report = inspect_report(path.resolve(), context_length=args.ctx)
    except (InspectError, NotFound) as exc:
        raise CliError(exc.message, reason=exc.reason, hint=_inspect_hint(exc.reason)) from exc
    if args.format == "json":
        print_json(report)
        return EXIT_OK
    fields = {k: report[k] for k in INSPECT_KEYS if k not in {"dtypes", "hints", "split"}}
    fields["path"] = report["path"]
    fields["parameter_count"] = human_count(report["parameter_count"])
    fields["size_bytes"] = human_bytes(report["size_bytes"])
    if report["kv_cache_bytes_per_token"]:
        fields["kv_cache_bytes_per_token"] = human_bytes(report["kv_cache_bytes_per_token"])
    print_fields(fields)
    print_table(
        ("WORKER TYPE", "VERDICT"),
        [(r["worker_type"], r["verdict"]) for r in report["compatibility"]],
        title="compatibility",
    )
    print_reasons([(r["worker_type"], r["reasons"]) for r in report["compatibility"]])
    return EXIT_OK


def _inspect_hint(reason: str) -> str:
    if reason == "FILE_NOT_FOUND":
        return "check the path"
    if reason == "UNSUPPORTED_FILE_FORMAT":
        return "rbee reads GGUF files, safetensors files, diffusers folders and HF model folders"
    return "the file may be truncated or corrupt: download it again"


# ---- commands that talk to the catalog -----------------------------------------------------


def _catalog(args: argparse.Namespace) -> Any:
    from rbee_client.catalog import CatalogClient

    return CatalogClient(args.catalog, security=client_security(), timeout=args.timeout)


def _model_row(m: Any) -> tuple[Any, ...]:
    md = m.metadata
    return (
        m.id,
        m.state.value,
        md.format.value if md else "",
        md.model_type.value if md else "",
        (md.architecture or md.family or "") if md else "",
        (md.quantization or "") if md else "",
        human_count(md.parameter_count) if md else "",
        human_bytes(m.size_bytes),
    )


def cmd_models_ls(args: argparse.Namespace) -> int:
    with _catalog(args) as client:
        models, total = client.list_models(
            filter=args.filter, page_size=args.page_size, all_pages=True
        )
    if args.format == "json":
        print_json({"models": [m.model_dump(mode="json") for m in models], "total_size": total})
        return EXIT_OK
    print_table(
        ("ID", "STATE", "FORMAT", "TYPE", "ARCH/FAMILY", "QUANT", "PARAMS", "SIZE"),
        [_model_row(m) for m in models],
    )
    return EXIT_OK


def cmd_models_show(args: argparse.Namespace) -> int:
    with _catalog(args) as client:
        model = client.get_model(args.model)
    if args.format == "json":
        print_json(model.model_dump(mode="json"))
        return EXIT_OK
    md = model.metadata.model_dump(mode="json") if model.metadata else {}
    fields: dict[str, Any] = {
        "name": model.name,
        "display_name": model.display_name,
        "state": model.state.value,
        "state_message": model.state_message,
        "source": model.source.kind.value,
        "paths": model.paths,
        "size": human_bytes(model.size_bytes),
        "sha256": model.sha256,
        "labels": model.labels,
    }
    for key in INSPECT_KEYS:
        if key in md and key not in {"dtypes", "hints", "split", "size_bytes"}:
            fields[key] = md[key]
    if model.metadata and model.metadata.parameter_count:
        fields["parameter_count"] = human_count(model.metadata.parameter_count)
    print_fields(fields)
    return EXIT_OK


def cmd_models_add(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser().resolve()
    with _catalog(args) as client:
        model = client.register_local(
            str(path), model_id=args.id or "", display_name=args.name or ""
        )
    if args.format == "json":
        print_json(model.model_dump(mode="json"))
    else:
        print_table(
            ("ID", "STATE", "FORMAT", "TYPE", "ARCH/FAMILY", "QUANT", "PARAMS", "SIZE"),
            [_model_row(model)],
        )
        if model.state.value == "failed":
            stderr_console().print(f"registered as FAILED: {model.state_message}")
    return EXIT_FAILED if model.state.value == "failed" else EXIT_OK


def cmd_models_rm(args: argparse.Namespace) -> int:
    with _catalog(args) as client:
        model = client.delete_model(args.model, force=args.force)
    if args.format == "json":
        print_json({"deleted": model.name})
    else:
        stderr_console().print(f"deleted {model.name} (files were left in place)")
    return EXIT_OK


def _device_from_args(args: argparse.Namespace) -> Any:
    if not args.device:
        return None
    from services.catalog.domain import Device, DeviceKind

    kind = DeviceKind(args.device)
    return Device(
        kind=kind,
        name=args.device,
        total_ram_bytes=args.ram,
        free_ram_bytes=args.ram,
        total_vram_bytes=args.vram,
        free_vram_bytes=args.vram,
        unified_memory=kind is DeviceKind.METAL,
    )


def cmd_compat(args: argparse.Namespace) -> int:
    if args.chart:
        return cmd_compat_chart(args)
    if args.format == "markdown":
        raise CliError("--format markdown renders the chart", hint="add --chart", code=EXIT_USAGE)
    from rbee_client.cli.pull import is_remote_source

    device = _device_from_args(args)
    if args.model and not args.matrix and is_remote_source(args.model):
        return cmd_compat_remote(args, device)
    with _catalog(args) as client:
        if args.matrix:
            rows = client.compatibility_matrix(device=device, context_length=args.ctx)
            if args.format == "json":
                print_json(
                    {
                        "rows": [
                            {
                                "model": name,
                                "reason": reason,
                                "results": [r.model_dump(mode="json") for r in results],
                            }
                            for name, results, reason in rows
                        ]
                    }
                )
                return EXIT_OK
            types = sorted({r.worker_type for _, results, _ in rows for r in results})
            print_table(
                ("MODEL", *types),
                [
                    (name, *[_verdict_cell(results, t) or reason for t in types])
                    for name, results, reason in rows
                ],
            )
            return EXIT_OK
        if not args.model:
            raise CliError("name a model, or use --matrix", code=EXIT_USAGE)
        results, ctx = client.evaluate_compatibility(
            args.model,
            worker_types=args.worker_type or (),
            device=device,
            context_length=args.ctx,
            kv_cache_type=args.kv_type,
        )
    if args.format == "json":
        print_json({"context_length": ctx, "results": [r.model_dump(mode="json") for r in results]})
        return EXIT_OK
    _print_results(results, title=f"context {ctx} tokens" if ctx else "")
    return EXIT_OK


def _print_results(results: Sequence[Any], *, title: str) -> None:
    """A verdict per worker type with the memory numbers, then the reasons."""
    print_table(
        ("WORKER TYPE", "VERDICT", "WEIGHTS", "KV CACHE", "RAM", "VRAM", "GPU LAYERS"),
        [
            (
                r.worker_type,
                r.verdict.value,
                human_bytes(r.memory.weights_bytes) if r.memory else "",
                human_bytes(r.memory.kv_cache_bytes) if r.memory else "",
                human_bytes(r.memory.ram_bytes) if r.memory else "",
                human_bytes(r.memory.vram_bytes) if r.memory else "",
                f"{r.memory.gpu_layers}/{r.memory.total_layers}"
                if r.memory and r.memory.total_layers
                else "",
            )
            for r in results
        ],
        title=title,
    )
    print_reasons([(r.worker_type, r.reasons) for r in results])


def _reevaluate(args: argparse.Namespace, metadata: Any, device: Any) -> tuple[list[Any], int]:
    """The catalog's EvaluateCompatibility on inline metadata (an unregistered model), for the
    options InspectRemote does not take (KV cache type, worker types)."""
    import grpc

    from rbee.catalog.v1 import catalog_pb2_grpc
    from rbee_client.catalog import compatibility_request
    from rbee_client.errors import error_from_rpc
    from services.catalog import convert
    from services.common.channels import open_channel

    request = compatibility_request(
        "placeholder",
        worker_types=args.worker_type or (),
        device=device,
        context_length=args.ctx,
        kv_cache_type=args.kv_type,
    )
    request.metadata.CopyFrom(convert.metadata_to_pb(metadata))  # the oneof drops `model`
    with open_channel(args.catalog, client_security()) as channel:
        try:
            resp = catalog_pb2_grpc.CatalogServiceStub(channel).EvaluateCompatibility(
                request, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
    return [convert.compat_result_from_pb(r) for r in resp.results], int(resp.context_length_used)


def cmd_compat_remote(args: argparse.Namespace, device: Any) -> int:
    """`rbee compat SOURCE`: the header only (InspectRemote), then the verdicts per device."""
    from rbee_client.cli.pull import best_verdict, inspect_remote_source
    from rbee_client.provisioner import ProvisionerClient

    with ProvisionerClient(
        args.provisioner, security=client_security(), timeout=args.timeout
    ) as client:
        report = inspect_remote_source(
            client,
            args.model,
            devices=[device] if device is not None else (),
            context_length=args.ctx or 0,
        )
    sections: list[tuple[str, list[Any], int]] = []
    for dev, inspected in report.devices:
        results = inspected
        ctx = results[0].memory.context_length if results and results[0].memory else 0
        if args.kv_type != "f16" or args.worker_type:
            results, ctx = _reevaluate(args, report.metadata, dev)
        sections.append((dev.name or dev.kind.value, results, ctx))
    badge, _, _ = best_verdict(report)
    md = report.metadata
    if args.format == "json":
        print_json(
            {
                "source": report.source,
                "files": report.files,
                "bytes_read": report.bytes_read,
                "metadata": md.model_dump(mode="json"),
                "summary": badge,
                "devices": [
                    {
                        "device": name,
                        "context_length": ctx,
                        "results": [r.model_dump(mode="json") for r in results],
                    }
                    for name, results, ctx in sections
                ],
            }
        )
        return EXIT_OK
    print_fields(
        {
            "source": report.source,
            "files": report.files,
            "format": md.format.value,
            "model_type": md.model_type.value,
            "architecture": md.architecture or md.family,
            "quantization": md.quantization,
            "parameter_count": human_count(md.parameter_count),
            "context_length": md.context_length,
            "weights": human_bytes(md.weights.total_bytes) if md.weights else None,
            "header_bytes_read": human_bytes(report.bytes_read),
            "this hive": badge,
        }
    )
    for name, results, ctx in sections:
        title = f"device {name}" + (f", context {ctx} tokens" if ctx else "")
        _print_results(results, title=title)
    return EXIT_OK


def _verdict_cell(results: Sequence[Any], worker_type: str) -> str:
    for r in results:
        if r.worker_type == worker_type:
            return str(r.verdict.value)
    return ""


def cmd_worker_types(args: argparse.Namespace) -> int:
    with _catalog(args) as client:
        types = client.list_worker_types()
    if args.format == "json":
        print_json(
            {
                "worker_types": [
                    {**wt.model_dump(mode="json"), "supported_on_host": on} for wt, on in types
                ]
            }
        )
        return EXIT_OK
    print_table(
        ("ID", "BACKEND", "DEVICE", "FORMATS", "PLATFORMS", "THIS HOST"),
        [
            (
                wt.id,
                wt.backend.value,
                wt.device_kind.value,
                ",".join(f.value for f in wt.formats),
                ",".join(wt.platforms),
                "yes" if on else "no",
            )
            for wt, on in types
        ],
    )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == "catalog":
        from services.catalog.__main__ import main as catalog_main

        return catalog_main([])
    if args.service == "pool":
        from services.worker.pool.__main__ import main as pool_main

        return pool_main([])
    if args.service == "provisioner":
        from services.provisioner.__main__ import main as provisioner_main

        return provisioner_main([])
    raise CliError(f"unknown service {args.service!r}", code=EXIT_USAGE)


# ---- parser --------------------------------------------------------------------------------


def _size(text: str) -> int:
    """Parse 24GiB, 512MiB, 16GB, 1e9 into bytes."""
    units = {
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
        "tib": 1024**4,
        "kb": 1000,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
    }
    lowered = text.strip().lower()
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(suffix):
            try:
                return int(float(lowered[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(float(lowered))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 24GiB)") from None


def _common_parent(formats: Sequence[str]) -> argparse.ArgumentParser:
    """The flags every command takes. A command with more output formats (`compat --chart`
    renders markdown) gets its own parent: argparse parents share their action objects."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--format", choices=tuple(formats), default="human", help="output format")
    common.add_argument(
        "--catalog",
        default=os.environ.get("RBEE_CATALOG_ADDR", DEFAULT_CATALOG),
        help="catalog address host:port (env RBEE_CATALOG_ADDR)",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_parent(("human", "json"))

    parser = argparse.ArgumentParser(
        prog="rbee",
        description="rbee mesh: local AI models, one host or a fleet",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="models in the catalog").add_subparsers(
        dest="models_cmd", required=True
    )
    p = models.add_parser(
        "inspect", parents=[common], help="parse a model file or folder (no service needed)"
    )
    p.add_argument("path")
    p.add_argument("--ctx", type=int, default=None, help="context length for the memory numbers")
    p.set_defaults(func=cmd_models_inspect)
    p = models.add_parser("ls", parents=[common], help="list models")
    p.add_argument("--filter", default="", help="e.g. 'format=gguf AND state=ready'")
    p.add_argument("--page-size", type=int, default=200)
    p.set_defaults(func=cmd_models_ls)
    p = models.add_parser("show", parents=[common], help="one model in full")
    p.add_argument("model", help="models/ID or ID")
    p.set_defaults(func=cmd_models_show)
    p = models.add_parser("add", parents=[common], help="register a local file or folder in place")
    p.add_argument("path")
    p.add_argument("--id", default="", help="model id (derived from the path when omitted)")
    p.add_argument("--name", default="", help="display name")
    p.set_defaults(func=cmd_models_add)
    p = models.add_parser("rm", parents=[common], help="remove a model from the catalog")
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="even when a worker uses it")
    p.set_defaults(func=cmd_models_rm)

    from rbee_client.cli.pull import add_provisioner_argument

    p = sub.add_parser(
        "compat",
        parents=[_common_parent(CHART_FORMATS)],
        help="which worker types can run a model, and whether it fits; --chart: the chart",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="models/ID or ID; or a remote SOURCE (hf:ORG/REPO[:FILE], ORG/REPO, civitai:ID, "
        "https://...), inspected by its header before any download",
    )
    p.add_argument("--matrix", action="store_true", help="every model x every worker type")
    p.add_argument("--worker-type", action="append", help="limit to these worker types")
    p.add_argument(
        "--device", choices=("cpu", "cuda", "metal"), help="evaluate the fit on this device kind"
    )
    p.add_argument("--ram", type=_size, default=None, help="free RAM, e.g. 32GiB")
    p.add_argument("--vram", type=_size, default=None, help="free VRAM, e.g. 24GiB")
    p.add_argument(
        "--ctx", type=int, default=None, help="context length (default: min(model, 8192))"
    )
    p.add_argument("--kv-type", default="f16", help="KV cache type: f16, q8_0, q4_0, ...")
    add_provisioner_argument(p)  # a remote SOURCE is inspected by the provisioner
    add_chart_arguments(p)
    p.set_defaults(func=cmd_compat)

    workers = sub.add_parser("workers", help="workers and worker types").add_subparsers(
        dest="workers_cmd", required=True
    )
    p = workers.add_parser(
        "types", parents=[common], help="the worker types and whether this host runs them"
    )
    p.set_defaults(func=cmd_worker_types)
    from rbee_client.cli.pool import add_commands as add_pool_commands

    add_pool_commands(workers, sub, common)

    from rbee_client.cli.pull import add_commands as add_provisioner_commands

    add_provisioner_commands(sub, common)

    from rbee_client.cli.status import add_commands as add_status_commands

    add_status_commands(sub)

    from rbee_client.cli.mesh import add_commands as add_mesh_commands

    add_mesh_commands(sub)

    from rbee_client.cli.chat import add_commands as add_generation_commands

    add_generation_commands(sub, common)

    from rbee_client.cli.config import add_commands as add_config_commands

    add_config_commands(sub)

    p = sub.add_parser("serve", help="run a service in the foreground")
    p.add_argument("service", choices=("catalog", "provisioner", "pool"))
    p.set_defaults(func=cmd_serve)
    return parser


def _unreachable_hint(args: argparse.Namespace) -> str:
    from rbee_client.cli.pull import is_remote_source

    if getattr(args, "func", None) is cmd_compat and not is_remote_source(args.model or ""):
        return (
            f"is the catalog running? start it with `rbee serve catalog` (address {args.catalog})"
        )
    if hasattr(args, "pool"):
        return f"is the pool running? start it with `rbee serve pool` (address {args.pool})"
    if hasattr(args, "provisioner"):
        return (
            "is the provisioner running? start it with `rbee serve provisioner` "
            f"(address {args.provisioner})"
        )
    return (
        "is the service running? start it with `rbee serve catalog` "
        f"(address {getattr(args, 'catalog', '')})"
    )


def _report_error(args: argparse.Namespace | None, err: CliError) -> int:
    line = f"error: {err.message}"
    if err.hint:
        line += f" (hint: {err.hint})"
    stderr_console().print(line, markup=False, highlight=False)
    if args is not None and getattr(args, "format", "human") == "json":
        print_json(
            {
                "error": {
                    "message": err.message,
                    "reason": err.reason,
                    "hint": err.hint,
                    "exit_code": err.code,
                }
            }
        )
    return err.code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as err:
        return _report_error(args, err)
    except ServiceUnavailableError as exc:
        if os.environ.get("RBEE_DEBUG") == "1":
            traceback.print_exc()
        if exc.reason and exc.reason != "UNAVAILABLE":
            # The service answered: something behind it is unavailable (a worker that
            # crashed, an upstream, the catalog). Its message says what; not "is it running?".
            return _report_error(args, CliError(exc.message, reason=exc.reason, hint=exc.hint))
        return _report_error(
            args,
            CliError(
                str(exc),
                hint=_unreachable_hint(args),
                code=EXIT_UNREACHABLE,
                reason=exc.reason,
            ),
        )
    except RbeeClientError as exc:
        if os.environ.get("RBEE_DEBUG") == "1":
            traceback.print_exc()
        return _report_error(args, CliError(exc.message, reason=exc.reason, hint=exc.hint))
    except KeyboardInterrupt:
        stderr_console().print("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: one line, traceback only on demand
        if os.environ.get("RBEE_DEBUG") == "1":
            traceback.print_exc()
        return _report_error(
            args,
            CliError(
                f"unexpected error: {type(exc).__name__}",
                hint="rerun with RBEE_DEBUG=1 for details",
            ),
        )


if __name__ == "__main__":
    sys.exit(main())
