"""Model sources: the grammar (`parse_source`) and resolution into a `Resolution`.

    spec = parse_source("hf:org/repo:model.Q4_K_M.gguf")
    resolution = resolve(spec, PullOptions(), ctx)   # blocking: call it from a thread

`resolve` lists the remote (or local) source and plans every file a pull fetches; it never
downloads model bytes.
"""

from __future__ import annotations

from services.provisioner.domain import (
    CivitaiSpec,
    HfSpec,
    LocalSpec,
    PullOptions,
    Resolution,
    SourceSpec,
    UrlSpec,
)
from services.provisioner.sources.civitai import resolve_civitai
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.huggingface import resolve_hf
from services.provisioner.sources.local import resolve_local
from services.provisioner.sources.spec import format_source, parse_source
from services.provisioner.sources.url import resolve_url

__all__ = ["SourceContext", "format_source", "parse_source", "resolve"]


def resolve(
    spec: SourceSpec, options: PullOptions, ctx: SourceContext, *, write_refs: bool = True
) -> Resolution:
    """Resolve a parsed source into the files to fetch and the paths to register.

    `write_refs=False` leaves the HF cache untouched (remote inspection); a pull writes
    `refs/<revision>` so other HF tools find the snapshot by branch or tag name.
    """
    if isinstance(spec, HfSpec):
        return resolve_hf(spec, options, ctx, write_refs=write_refs)
    if isinstance(spec, CivitaiSpec):
        return resolve_civitai(spec, options, ctx)
    if isinstance(spec, UrlSpec):
        return resolve_url(spec, options, ctx)
    if isinstance(spec, LocalSpec):
        return resolve_local(spec, options, ctx)
    raise TypeError(f"not a source spec: {type(spec).__name__}")
