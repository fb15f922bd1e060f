"""The small List filter of the job-like collections (pulls, workers): `field=value` terms
joined by `AND`, values optionally quoted. Enumerated fields take their values
case-insensitively (an `ENUM_PREFIX_` spelling is accepted too). Anything else is
INVALID_ARGUMENT (INVALID_FILTER) on `filter`, with the fields listed and an example.

(Models have the fuller AIP-160 subset of services.catalog.filtering, with `!=` and prefixes.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from services.common.errors import InvalidArgument

MAX_FILTER_LENGTH = 1024


def _error(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("filter", description, reason="INVALID_FILTER")


def parse_equality_filter(
    text: str,
    *,
    fields: Collection[str],
    enums: Mapping[str, tuple[Collection[str], str]] | None = None,
    labels: bool = False,
    example: str,
) -> dict[str, str]:
    """The terms of `text` as {field: value}. `enums` maps a field to (allowed lower-case
    values, the enum's wire prefix such as "pull_state_"); `labels` allows `labels.KEY`."""
    terms: dict[str, str] = {}
    text = text.strip()
    if not text:
        return terms
    if len(text) > MAX_FILTER_LENGTH:
        raise _error(f"longer than {MAX_FILTER_LENGTH} characters")
    allowed = ", ".join([*fields, *(["labels.KEY"] if labels else [])])
    for raw in text.split(" AND "):
        name, sep, value = raw.strip().partition("=")
        name, value = name.strip(), value.strip().strip('"')
        known = name in fields or (labels and name.startswith("labels.") and len(name) > 7)
        if not sep or not known or not value:
            raise _error(
                f"cannot read {raw.strip()[:60]!r}: use field=value terms joined by AND, with "
                f"fields {allowed} (e.g. {example})"
            )
        if enums and name in enums:
            values, prefix = enums[name]
            value = value.lower().removeprefix(prefix)
            if value not in values:
                raise _error(f"{name} must be one of {', '.join(sorted(values))}")
        terms[name] = value
    return terms
