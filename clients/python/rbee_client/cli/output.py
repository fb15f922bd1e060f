"""How the CLI prints: data on stdout, messages on stderr; `--format human|json`; NO_COLOR.

Every rich Console of the CLI is built here (`make_console`), so one place decides colour:
with NO_COLOR set (to anything but "") nothing is styled at all: no colour and no bold, not
even on a forced terminal (FORCE_COLOR, TTY_COMPATIBLE=1). The live progress display
(cli/progress.py) still redraws its lines on a terminal; off a terminal it prints plain lines.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from rich.console import Console
from rich.table import Table


def color_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """False when NO_COLOR is set to a non-empty value (https://no-color.org)."""
    env = os.environ if environ is None else environ
    return env.get("NO_COLOR", "") == ""


# Off a terminal (pipes, logs, CI) rich would assume 80 columns and wrap every table cell.
PIPE_WIDTH = 200


def make_console(
    file: IO[str], *, width: int | None = None, force_terminal: bool | None = None
) -> Console:
    """The one Console factory: NO_COLOR turns every style off (color_system=None emits no
    escape for colour, bold or dim; no_color alone would still send bold)."""
    plain = not color_allowed()
    return Console(
        file=file,
        no_color=plain,
        color_system=None if plain else "auto",
        highlight=False,
        soft_wrap=True,
        width=width,
        force_terminal=force_terminal,
    )


def stdout_console() -> Console:
    """Data: tables and fields on stdout (200 columns when piped)."""
    return make_console(sys.stdout, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def stderr_console() -> Console:
    """Messages and progress on stderr."""
    return make_console(sys.stderr)


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
