"""How the CLI prints: data on stdout, messages on stderr; `--format human|json`; NO_COLOR."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def _color_allowed() -> bool:
    return "NO_COLOR" not in os.environ


# Off a terminal (pipes, logs, CI) rich would assume 80 columns and wrap every table cell.
PIPE_WIDTH = 200


def stdout_console() -> Console:
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(
        file=sys.stdout, no_color=not _color_allowed(), highlight=False, soft_wrap=True, width=width
    )


def stderr_console() -> Console:
    return Console(file=sys.stderr, no_color=not _color_allowed(), highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """One JSON document on stdout (sorted keys, so scripts and diffs are stable)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str = "") -> None:
    table = Table(title=title or None, show_edge=False, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    stdout_console().print(table)


def print_fields(fields: Mapping[str, Any]) -> None:
    """Key: value lines for one resource."""
    width = max((len(k) for k in fields), default=0)
    console = stdout_console()
    for key, value in fields.items():
        if value is None or value in ("", [], {}):
            continue
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            shown = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            shown = str(value)
        console.print(f"[bold]{key.ljust(width)}[/bold]  {shown}", markup=True)


def print_reasons(rows: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Each subject's reasons as indented lines (too long for a table cell)."""
    console = stdout_console()
    for subject, reasons in rows:
        for reason in reasons:
            console.print(f"  {subject}: {reason}", markup=False)


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def human_count(n: int | None) -> str:
    if n is None:
        return ""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
