"""`rbee compat --chart`: the compatibility chart users read, built from the worker-type registry.

What each worker type runs (formats, model types, image families, LLM architectures,
quantizations) and where (devices, platforms, CPU architectures), what the catalog knows but
does not serve and why, and a side-by-side with Ollama and LM Studio.

Where the facts come from:
- the worker types: the running catalog's ListWorkerTypes (the default), or, with `--offline`,
  the in-process `WorkerTypeRegistry` (the same registry the catalog serves). When the catalog
  cannot be reached the offline registry is used, and stderr says so. Both give the same chart.
- what is known but not served (non-generative llama.cpp architectures, image families and
  variants) and the pipeline per image family: the catalog's rule tables
  (services.catalog.llm_architectures / worker_types), the same ones `EvaluateCompatibility`
  applies; they ship in this distribution with the catalog.
- the peers' columns: rbee_client.cli.peer_support (static, cited there). rbee's column is
  derived here from the worker types, never written by hand.

Nothing host-specific (this host's support, a timestamp) goes into the chart, so the markdown is
deterministic: docs/COMPATIBILITY.md is this command's output (scripts/gen-compat-docs), and a
test fails when the file is stale. `--architectures-from newest` pins the LLM architecture list
to the catalog's table instead of the installed llama-cpp-python, so the document does not
depend on the machine that builds it.

The lead wires it into `rbee compat` with `add_chart_arguments(parser)` and, first thing in
cmd_compat, `if args.chart: return cmd_compat_chart(args)`. `python -m rbee_client.cli.chart`
runs the same command standalone (scripts/gen-compat-docs uses it).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from rbee_client.cli.output import print_json, print_table, stderr_console, stdout_console
from rbee_client.cli.peer_support import PEER_SUPPORT
from services.catalog.domain import DeviceKind, KvCacheType, ModelFormat, ModelType, Verdict
from services.catalog.domain import WorkerType as WorkerTypeRecord
from services.catalog.llm_architectures import (
    NON_GENERATIVE_ARCHITECTURES,
    resolve_architectures,
    table_architectures,
)
from services.catalog.worker_types import (
    IMAGE_FAMILIES,
    IMAGE_INPUT_VARIANTS,
    UNSUPPORTED_IMAGE_FAMILIES,
    WorkerTypeRegistry,
)
from services.common.channels import ChannelSecurity

CHART_FORMATS = ("human", "json", "markdown")
DEFAULT_CATALOG = "127.0.0.1:50061"
# The command the markdown header names: the same for the live and the offline chart, so the
# two outputs stay byte-identical (the docs script adds --offline --architectures-from newest).
CHART_COMMAND = "rbee compat --chart --format markdown"
DOCS_SCRIPT = "scripts/gen-compat-docs"

YES = "✓"
NO = "—"
WRAP_WIDTH = 100

_DEVICE_ORDER = {kind: i for i, kind in enumerate(DeviceKind)}


class WorkerTypeFacts(BaseModel):
    """What one worker type runs and where: the registry's facts, lists sorted."""

    model_config = ConfigDict(frozen=True)

    id: str
    display_name: str
    description: str
    backend: str
    device_kind: str
    platforms: list[str]
    cpu_architectures: list[str]
    formats: list[str]
    model_types: list[str]
    addon_model_types: list[str]
    image_families: list[str]
    llm_architectures: list[str]
    llm_architectures_source: str
    quantizations: list[str]
    max_context_length: int | None
    streaming: bool
    batching: bool


class NotServed(BaseModel):
    """Something inspection recognises that no worker type serves, and why."""

    model_config = ConfigDict(frozen=True)

    name: str
    why: str


class PeerRow(BaseModel):
    """One row of the side-by-side: rbee (derived from the registry) against the peers."""

    model_config = ConfigDict(frozen=True)

    topic: str
    rbee: str
    ollama: str
    lm_studio: str


class CompatibilityChart(BaseModel):
    """The whole chart: `--format json` prints it as is; markdown and human render it."""

    model_config = ConfigDict(frozen=True)

    worker_types: list[WorkerTypeFacts]
    image_family_pipelines: dict[str, str]
    llm_architectures_not_served: list[NotServed]
    image_families_not_served: list[NotServed]
    image_variants_not_served: list[NotServed]
    kv_cache_types: list[str]
    verdicts: list[str]
    peers: list[PeerRow]


# ---- building the chart ------------------------------------------------------------------------


def _chart_order(wt: WorkerTypeRecord) -> tuple[int, int, str]:
    # LLM workers first, then by device kind (cpu, cuda, metal): the order users scan in.
    return (0 if ModelType.LLM in wt.model_types else 1, _DEVICE_ORDER[wt.device_kind], wt.id)


def _facts(wt: WorkerTypeRecord) -> WorkerTypeFacts:
    return WorkerTypeFacts(
        id=wt.id,
        display_name=wt.display_name,
        description=wt.description,
        backend=wt.backend.value,
        device_kind=wt.device_kind.value,
        platforms=sorted(wt.platforms),
        cpu_architectures=sorted(wt.cpu_architectures),
        # Enum declaration order, not alphabetical: gguf, safetensors, diffusers; llm, image...
        formats=[f.value for f in ModelFormat if f in wt.formats],
        model_types=[t.value for t in ModelType if t in wt.model_types],
        addon_model_types=[t.value for t in ModelType if t in wt.addon_model_types],
        image_families=sorted(wt.families),
        llm_architectures=sorted(wt.llm_architectures),
        llm_architectures_source=wt.llm_architectures_source,
        quantizations=sorted(wt.quantizations),
        max_context_length=wt.max_context_length,
        streaming=wt.streaming,
        batching=wt.batching,
    )


def _union(values: Iterable[Iterable[str]]) -> list[str]:
    return sorted({v for group in values for v in group})


def _ordered_union(groups: Iterable[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        for v in group:
            seen.setdefault(v, None)
    return list(seen)


def _rbee_formats(types: Sequence[WorkerTypeFacts]) -> str:
    by_backend: dict[str, list[str]] = {}
    for wt in types:
        by_backend.setdefault(wt.backend, [])
        by_backend[wt.backend] = _ordered_union([by_backend[wt.backend], wt.formats])
    return "; ".join(f"{', '.join(fmts)} ({backend})" for backend, fmts in by_backend.items())


def _rbee_imports(types: Sequence[WorkerTypeFacts]) -> str:
    llm_formats = _ordered_union(
        wt.formats for wt in types if ModelType.LLM.value in wt.model_types
    )
    return (
        f"none: models load as pulled; the llm workers load {', '.join(llm_formats) or 'nothing'} "
        "only, so a safetensors LLM is refused with a hint to convert it with llama.cpp's "
        "convert_hf_to_gguf.py"
    )


def _rbee_model_types(types: Sequence[WorkerTypeFacts]) -> str:
    runs = _ordered_union(wt.model_types for wt in types)
    addons = _ordered_union(wt.addon_model_types for wt in types)
    text = f"runs {', '.join(runs)}"
    if addons:
        text += f"; add-ons loaded with a base model: {', '.join(addons)}"
    return text


def _generative(types: Sequence[WorkerTypeFacts]) -> list[str]:
    known = _union(wt.llm_architectures for wt in types)
    return [a for a in known if a not in NON_GENERATIVE_ARCHITECTURES]


def _rbee_architectures(types: Sequence[WorkerTypeFacts]) -> str:
    known = _union(wt.llm_architectures for wt in types)
    sources = sorted({wt.llm_architectures_source for wt in types if wt.llm_architectures})
    refused = len(known) - len(_generative(types))
    return (
        f"{len(_generative(types))} that generate text, listed above (source: "
        f"{'; '.join(sources)}); "
        f"{refused} more known to llama.cpp are refused with the reason (embedding models, "
        "projectors, text-to-speech, draft heads)"
    )


def _rbee_quantizations(types: Sequence[WorkerTypeFacts]) -> str:
    llm = [wt for wt in types if wt.quantizations]
    every = _union(wt.quantizations for wt in llm)
    kinds = _ordered_union([wt.device_kind] for wt in llm)
    same = all(set(wt.quantizations) == set(every) for wt in llm)
    return (
        f"{'' if same else 'up to '}{len(every)} llama.cpp file types, listed above, "
        f"on {', '.join(kinds)}"
    )


def _rbee_kv_cache(types: Sequence[WorkerTypeFacts]) -> str:
    full = {KvCacheType.F16, KvCacheType.BF16, KvCacheType.F32}
    quantized = [k.value for k in KvCacheType if k not in full]
    return (
        f"{', '.join(k.value for k in KvCacheType)}; a quantized cache "
        f"({', '.join(quantized)}) needs flash attention"
    )


def _rbee_images(types: Sequence[WorkerTypeFacts]) -> str:
    image = [wt for wt in types if wt.image_families]
    families = _union(wt.image_families for wt in image)
    if not families:
        return "not offered"
    backends = _ordered_union([wt.backend] for wt in image)
    streamed = ", step progress streamed" if all(wt.streaming for wt in image) else ""
    return (
        f"text-to-image with {', '.join(backends)}: {len(families)} families "
        f"({', '.join(families)}){streamed}"
    )


def _rbee_devices(types: Sequence[WorkerTypeFacts]) -> str:
    parts = []
    for kind in _ordered_union([wt.device_kind] for wt in types):
        of_kind = [wt for wt in types if wt.device_kind == kind]
        platforms = _union(wt.platforms for wt in of_kind)
        machines = _union(wt.cpu_architectures for wt in of_kind)
        parts.append(f"{kind} ({', '.join(platforms)}; {', '.join(machines)})")
    return "one worker per device: " + "; ".join(parts)


def _rbee_fit(types: Sequence[WorkerTypeFacts]) -> str:
    return (
        "`rbee compat MODEL [--device D]`: a verdict per worker type ("
        + ", ".join(v.value for v in Verdict)
        + ") with weights, KV cache and compute bytes against free RAM and VRAM"
    )


def _rbee_concurrency(types: Sequence[WorkerTypeFacts]) -> str:
    batching = [wt.id for wt in types if wt.batching]
    text = (
        f"batching on {', '.join(batching)}"
        if batching
        else "one request at a time per worker (no batching); more workers for more requests"
    )
    if all(wt.streaming for wt in types):
        text += "; every worker streams its output"
    return text


# Topic (PeerSupport.topic) -> how rbee's cell is derived from the worker types.
_RBEE_COLUMN: dict[str, Callable[[Sequence[WorkerTypeFacts]], str]] = {
    "Model formats (run time)": _rbee_formats,
    "Importing other formats": _rbee_imports,
    "Model types": _rbee_model_types,
    "LLM architectures": _rbee_architectures,
    "Quantizations": _rbee_quantizations,
    "KV cache types": _rbee_kv_cache,
    "Image generation": _rbee_images,
    "Devices and platforms": _rbee_devices,
    "Memory-fit check": _rbee_fit,
    "Concurrency": _rbee_concurrency,
}


def build_chart(worker_types: Iterable[WorkerTypeRecord]) -> CompatibilityChart:
    """The chart for these worker types (any order: the chart sorts). Pure: no I/O."""
    types = [_facts(wt) for wt in sorted(worker_types, key=_chart_order)]
    families = _union(wt.image_families for wt in types)
    known_archs = set(_union(wt.llm_architectures for wt in types))
    return CompatibilityChart(
        worker_types=types,
        image_family_pipelines={f: IMAGE_FAMILIES.get(f, "") for f in families},
        llm_architectures_not_served=[
            NotServed(name=a, why=NON_GENERATIVE_ARCHITECTURES[a])
            for a in sorted(known_archs & NON_GENERATIVE_ARCHITECTURES.keys())
        ],
        image_families_not_served=[
            NotServed(name=f, why=UNSUPPORTED_IMAGE_FAMILIES[f])
            for f in sorted(UNSUPPORTED_IMAGE_FAMILIES)
            if f not in families
        ],
        image_variants_not_served=[
            NotServed(name=v, why=IMAGE_INPUT_VARIANTS[v]) for v in sorted(IMAGE_INPUT_VARIANTS)
        ],
        kv_cache_types=[k.value for k in KvCacheType],
        verdicts=[v.value for v in Verdict],
        peers=[
            PeerRow(
                topic=row.topic,
                rbee=_RBEE_COLUMN[row.topic](types),
                ollama=row.ollama,
                lm_studio=row.lm_studio,
            )
            for row in PEER_SUPPORT
        ],
    )


def registry_worker_types(architectures_from: str | None = None) -> list[WorkerTypeRecord]:
    """The in-process registry's worker types (what a catalog on this host serves).

    `architectures_from`: a llama-cpp-python version whose list in the catalog's table to use
    ("newest": the newest listed) instead of the installed one. KeyError for an unlisted one.
    """
    archs = (
        resolve_architectures()
        if architectures_from is None
        else table_architectures(architectures_from)
    )
    return WorkerTypeRegistry(archs).list()


def catalog_worker_types(target: str, *, timeout: float = 30.0) -> list[WorkerTypeRecord]:
    """The running catalog's worker types (ListWorkerTypes), over a channel opened from the
    environment's security settings (RBEE_TOKEN, RBEE_TLS...). Raises the SDK's typed errors."""
    from rbee_client.catalog import CatalogClient
    from services.common.channels import open_channel

    channel = open_channel(target, _client_security())
    try:
        with CatalogClient(target, timeout=timeout, channel=channel) as client:
            return [wt for wt, _on_host in client.list_worker_types()]
    finally:
        channel.close()


# ---- markdown ----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    # A pipe would end the table cell.
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _wrapped_codes(names: Sequence[str]) -> list[str]:
    text = ", ".join(f"`{n}`" for n in names)
    return textwrap.wrap(
        text, width=WRAP_WIDTH, break_long_words=False, break_on_hyphens=False
    ) or [NO]


def _grouped(
    types: Sequence[WorkerTypeFacts], values: Callable[[WorkerTypeFacts], Sequence[str]]
) -> list[tuple[list[str], list[str]]]:
    """Values grouped by the exact set of worker types that list them: [(type ids, values)],
    widest groups first. A value missing from one worker type moves to a narrower group."""
    owners: dict[str, list[str]] = {}
    for wt in types:
        for v in values(wt):
            owners.setdefault(v, []).append(wt.id)
    groups: dict[tuple[str, ...], list[str]] = {}
    for v, ids in owners.items():
        groups.setdefault(tuple(ids), []).append(v)
    return [
        (list(ids), sorted(vals))
        for ids, vals in sorted(groups.items(), key=lambda g: (-len(g[0]), g[0]))
    ]


def _grouped_section(
    types: Sequence[WorkerTypeFacts],
    values: Callable[[WorkerTypeFacts], Sequence[str]],
    noun: str,
) -> list[str]:
    lines: list[str] = []
    for ids, vals in _grouped(types, values):
        lines += [f"**{', '.join(ids)}** ({len(vals)} {noun}):", ""]
        lines += [*_wrapped_codes(vals), ""]
    return lines or [f"No worker type lists {noun}.", ""]


def _matrix(
    types: Sequence[WorkerTypeFacts],
    rows: Sequence[str],
    cell: Callable[[WorkerTypeFacts, str], str],
) -> list[str]:
    return _table(
        ["", *[wt.id for wt in types]],
        [[f"`{r}`", *[cell(wt, r) for wt in types]] for r in rows],
    )


def _max_context(wt: WorkerTypeFacts) -> str:
    if wt.max_context_length:
        return str(wt.max_context_length)
    return "the model's own" if ModelType.LLM.value in wt.model_types else NO


def _model_type_cell(wt: WorkerTypeFacts, model_type: str) -> str:
    if model_type in wt.model_types:
        return "runs"
    if model_type in wt.addon_model_types:
        return "add-on"
    return NO


def render_markdown(chart: CompatibilityChart) -> str:
    """docs/COMPATIBILITY.md: deterministic (sorted, no timestamp, nothing host-specific)."""
    types = chart.worker_types
    lines: list[str] = [
        "# Compatibility chart",
        "",
        f"<!-- Generated by `{CHART_COMMAND}` from the catalog's worker-type registry "
        f"({DOCS_SCRIPT} writes this file). Do not edit by hand: CI fails when it is stale. -->",
        "",
        f"Generated by `{CHART_COMMAND}` from the catalog's worker-type registry, the same "
        "facts `rbee compat MODEL` evaluates against. Do not edit: run "
        f"`{DOCS_SCRIPT}`. {YES} = supported, {NO} = not supported.",
        "",
        "## Worker types, devices and platforms",
        "",
    ]
    lines += _table(
        [
            "Worker type",
            "Backend",
            "Device",
            "Platforms",
            "CPU architectures",
            "Max context",
            "Streams",
            "Batches",
        ],
        [
            [
                f"`{wt.id}`",
                wt.backend,
                wt.device_kind,
                ", ".join(wt.platforms),
                ", ".join(wt.cpu_architectures),
                _max_context(wt),
                YES if wt.streaming else NO,
                YES if wt.batching else NO,
            ]
            for wt in types
        ],
    )
    lines.append("")
    lines += [f"- `{wt.id}` ({wt.display_name}): {wt.description}" for wt in types]
    lines += ["", "## Formats", ""]
    formats = _ordered_union(wt.formats for wt in types)
    lines += _matrix(types, formats, lambda wt, f: YES if f in wt.formats else NO)
    lines += [
        "",
        "## Model types",
        "",
        "runs = loaded on its own; add-on = loaded on top of a base model, never alone.",
        "",
    ]
    model_types = [
        t.value
        for t in ModelType
        if any(t.value in wt.model_types or t.value in wt.addon_model_types for wt in types)
    ]
    lines += _matrix(types, model_types, _model_type_cell)
    lines += ["", "## Image families (Stable Diffusion and successors)", ""]
    image_types = [wt for wt in types if wt.image_families]
    families = sorted(chart.image_family_pipelines)
    if image_types:
        lines += _table(
            ["", "diffusers pipeline", *[wt.id for wt in image_types]],
            [
                [
                    f"`{f}`",
                    chart.image_family_pipelines[f] or NO,
                    *[YES if f in wt.image_families else NO for wt in image_types],
                ]
                for f in families
            ],
        )
    else:
        lines.append("No worker type runs image families.")
    lines += ["", "Recognised but not run:", ""]
    lines += _table(
        ["Family or variant", "Why not"],
        [[f"`{n.name}`", n.why] for n in chart.image_families_not_served]
        + [[f"`{n.name}` variant", n.why] for n in chart.image_variants_not_served],
    )
    lines += ["", "## LLM architectures", ""]
    sources = sorted({(wt.llm_architectures_source, wt.id) for wt in types if wt.llm_architectures})
    by_source: dict[str, list[str]] = {}
    for source, wt_id in sources:
        by_source.setdefault(source, []).append(wt_id)
    for source, ids in by_source.items():
        lines.append(f"Architecture list of {', '.join(ids)}: {source or 'unknown'}.")
    lines += [
        "",
        "Architectures that generate text (GGUF `general.architecture`):",
        "",
    ]
    lines += _grouped_section(
        types,
        lambda wt: [a for a in wt.llm_architectures if a not in NON_GENERATIVE_ARCHITECTURES],
        "architectures",
    )
    lines += ["Known to llama.cpp but not served as text generators:", ""]
    lines += _table(
        ["Architecture", "What it is"],
        [[f"`{n.name}`", n.why] for n in chart.llm_architectures_not_served],
    )
    lines += ["", "## Quantizations (GGUF file types)", ""]
    lines += _grouped_section(types, lambda wt: wt.quantizations, "quantizations")
    lines += [
        "## rbee, Ollama and LM Studio",
        "",
        "rbee's column is derived from the registry above; the others are from our research "
        "notes (reference/protocols-and-formats.md section 5, reference/peers.md).",
        "",
    ]
    lines += _table(
        ["", "rbee", "Ollama", "LM Studio"],
        [[row.topic, row.rbee, row.ollama, row.lm_studio] for row in chart.peers],
    )
    return "\n".join(lines) + "\n"


# ---- human -------------------------------------------------------------------------------------


def print_chart_human(chart: CompatibilityChart) -> None:
    """The chart as rich tables on stdout."""
    types = chart.worker_types
    print_table(
        (
            "WORKER TYPE",
            "BACKEND",
            "DEVICE",
            "PLATFORMS",
            "CPU ARCHS",
            "FORMATS",
            "RUNS",
            "ADD-ONS",
        ),
        [
            (
                wt.id,
                wt.backend,
                wt.device_kind,
                ",".join(wt.platforms),
                ",".join(wt.cpu_architectures),
                ",".join(wt.formats),
                ",".join(wt.model_types),
                ",".join(wt.addon_model_types),
            )
            for wt in types
        ],
        title="worker types",
    )
    image_types = [wt for wt in types if wt.image_families]
    if image_types:
        print_table(
            ("FAMILY", "PIPELINE", *[wt.id for wt in image_types]),
            [
                (
                    f,
                    chart.image_family_pipelines[f],
                    *[YES if f in wt.image_families else NO for wt in image_types],
                )
                for f in sorted(chart.image_family_pipelines)
            ],
            title="image families",
        )
    console = stdout_console()
    for title, values in (
        (
            "LLM architectures (text generation)",
            lambda wt: [a for a in wt.llm_architectures if a not in NON_GENERATIVE_ARCHITECTURES],
        ),
        ("quantizations", lambda wt: wt.quantizations),
    ):
        console.print(f"\n[bold]{title}[/bold]")
        for ids, vals in _grouped(types, values):
            console.print(f"{', '.join(ids)} ({len(vals)}):", markup=False)
            console.print(textwrap.fill(", ".join(vals), width=WRAP_WIDTH), markup=False)
    print_table(
        ("NOT SERVED", "WHY"),
        [(n.name, n.why) for n in chart.llm_architectures_not_served]
        + [(n.name, n.why) for n in chart.image_families_not_served]
        + [(f"{n.name} (variant)", n.why) for n in chart.image_variants_not_served],
        title="recognised, not served",
    )
    print_table(
        ("", "RBEE", "OLLAMA", "LM STUDIO"),
        [(r.topic, r.rbee, r.ollama, r.lm_studio) for r in chart.peers],
        title="rbee, Ollama and LM Studio",
    )


# ---- the command -------------------------------------------------------------------------------


def add_chart_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --chart, --offline and --architectures-from to the `rbee compat` parser.

    `--format`, `--catalog` and `--timeout` come from the parser's common parent; its
    `--format` must accept "markdown" (CHART_FORMATS) for the chart.
    """
    parser.add_argument(
        "--chart",
        action="store_true",
        help="the compatibility chart: worker types x formats, model types, image families, "
        "LLM architectures, quantizations; and rbee against Ollama and LM Studio",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="with --chart: build it from the in-process registry, not the running catalog",
    )
    parser.add_argument(
        "--architectures-from",
        metavar="VERSION",
        default=None,
        help="with --chart: the LLM architectures of this llama-cpp-python version in the "
        "catalog's table ('newest': the newest listed) instead of the installed one; "
        "implies --offline",
    )


def _usage_error(message: str, hint: str = "") -> Exception:
    from rbee_client.cli.main import EXIT_USAGE, CliError

    return CliError(message, hint=hint, code=EXIT_USAGE)


def chart_worker_types(args: argparse.Namespace) -> list[WorkerTypeRecord]:
    """The worker types the chart is built from: the running catalog unless --offline or
    --architectures-from; the in-process registry when the catalog cannot be reached."""
    from rbee_client.errors import ServiceUnavailableError

    architectures_from = getattr(args, "architectures_from", None)
    if architectures_from is not None:
        try:
            return registry_worker_types(architectures_from)
        except KeyError as exc:
            raise _usage_error(str(exc.args[0])) from None
    if getattr(args, "offline", False):
        return registry_worker_types()
    target = getattr(args, "catalog", DEFAULT_CATALOG)
    try:
        return catalog_worker_types(target, timeout=getattr(args, "timeout", 30.0))
    except ServiceUnavailableError as exc:
        if exc.reason and exc.reason != "UNAVAILABLE":
            raise  # the catalog answered: something behind it failed; not "unreachable"
        stderr_console().print(
            f"note: the catalog at {target} is not reachable; chart built from the in-process "
            "worker-type registry (--offline)",
            markup=False,
        )
        return registry_worker_types()


def cmd_compat_chart(args: argparse.Namespace) -> int:
    """`rbee compat --chart [--offline] [--format human|json|markdown]`: print the chart."""
    if getattr(args, "model", None) or getattr(args, "matrix", False):
        raise _usage_error("--chart takes no model and no --matrix", "use one of them at a time")
    chart = build_chart(chart_worker_types(args))
    output = getattr(args, "format", "human")
    if output == "markdown":
        sys.stdout.write(render_markdown(chart))
    elif output == "json":
        print_json(chart.model_dump(mode="json"))
    else:
        print_chart_human(chart)
    return 0


def build_chart_parser() -> argparse.ArgumentParser:
    """The standalone parser (`python -m rbee_client.cli.chart`): the chart's options only."""
    parser = argparse.ArgumentParser(
        prog="python -m rbee_client.cli.chart",
        description="The compatibility chart (what `rbee compat --chart` prints).",
    )
    parser.add_argument("--format", choices=CHART_FORMATS, default="human", help="output format")
    parser.add_argument(
        "--catalog",
        default=os.environ.get("RBEE_CATALOG_ADDR", DEFAULT_CATALOG),
        help="catalog address host:port (env RBEE_CATALOG_ADDR)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    add_chart_arguments(parser)
    parser.set_defaults(chart=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chart command standalone; a failure is one line on stderr and exit code."""
    from rbee_client.cli.main import CliError
    from rbee_client.errors import RbeeClientError

    args = build_chart_parser().parse_args(argv)
    try:
        return cmd_compat_chart(args)
    except CliError as err:
        hint = f" (hint: {err.hint})" if err.hint else ""
        stderr_console().print(f"error: {err.message}{hint}", markup=False)
        return err.code
    except RbeeClientError as exc:
        stderr_console().print(f"error: {exc.message}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def _client_security() -> ChannelSecurity:
    from rbee_client.cli.main import client_security

    return client_security()
