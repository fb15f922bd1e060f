"""`rbee config`: every environment variable the mesh reads, its default and its value here.

The reference is built from the services' own settings classes (the variables they read are
their fields under their env prefix, plus the hive-wide and upstream fallbacks such as RBEE_HOME
and HF_TOKEN), and from the client-side variables the CLI and the SDK read. docs/CONFIGURATION.md
is `rbee config --reference --format markdown`, checked for staleness by the test suite
(regenerate it with `scripts/gen-config-docs`).

`rbee config` (no flag) shows the value each variable has in this environment, secrets masked.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rbee_client.cli.main import DEFAULT_CATALOG
from rbee_client.cli.output import print_json, print_table
from rbee_client.cli.pool import DEFAULT_POOL
from rbee_client.cli.pull import DEFAULT_PROVISIONER
from services.common import channels
from services.common.settings import REDACTED, SHARED_ENV_VARS, ServiceSettings

GENERATED_BY = "rbee config --reference --format markdown"


@dataclass(frozen=True)
class Variable:
    """One environment variable: who reads it, its default, what it means."""

    section: str
    name: str
    default: str
    description: str
    secret: bool = False
    also: str = ""  # another variable that sets the same thing (a fallback)


# What the CLI and the SDK read (the services' variables come from their settings classes).
CLIENT_VARIABLES: tuple[Variable, ...] = (
    Variable("client", "RBEE_CATALOG_ADDR", DEFAULT_CATALOG, "Where the CLI finds the catalog."),
    Variable(
        "client",
        "RBEE_PROVISIONER_ADDR",
        DEFAULT_PROVISIONER,
        "Where the CLI finds the provisioner.",
    ),
    Variable("client", "RBEE_POOL_ADDR", DEFAULT_POOL, "Where the CLI finds the pool."),
    Variable(
        "client",
        channels.ENV_TOKEN,
        "",
        "Bearer token the CLI and the SDK send on every call (a mesh with auth on).",
        secret=True,
        also=channels.ENV_SERVICE_TOKEN,
    ),
    Variable(
        "client",
        channels.ENV_TLS,
        "false",
        "Connect with TLS (implied by any of the certificate variables below).",
    ),
    Variable(
        "client", channels.ENV_TLS_CA, "", "PEM roots to check the services' certificates with."
    ),
    Variable(
        "client", channels.ENV_TLS_CERT, "", "This client's certificate, for mutual TLS (PEM)."
    ),
    Variable(
        "client", channels.ENV_TLS_KEY, "", "This client's private key, for mutual TLS (PEM)."
    ),
    Variable(
        "client",
        channels.ENV_TLS_SERVER_NAME,
        "",
        "The name to check the services' certificates against, when it is not the host.",
    ),
    Variable("client", "RBEE_DEBUG", "", "`1`: print tracebacks with CLI errors."),
    Variable("client", "NO_COLOR", "", "Set (to anything): no colours in the CLI's output."),
)


def _service_classes() -> list[tuple[str, type[ServiceSettings]]]:
    from services.catalog.settings import CatalogSettings
    from services.provisioner.settings import ProvisionerSettings
    from services.worker.pool.settings import PoolSettings
    from services.worker.settings import WorkerSettings

    return [
        ("catalog", CatalogSettings),
        ("provisioner", ProvisionerSettings),
        ("pool", PoolSettings),
        ("worker", WorkerSettings),
    ]


def _portable(text: str) -> str:
    """Machine-specific parts of a default (this user's home, this interpreter) in general terms,
    so the reference reads the same on every machine."""
    home = str(Path.home())
    # The console scripts beside this interpreter are found by name on any machine.
    text = text.replace(str(Path(sys.executable).parent) + os.sep, "")
    text = text.replace(sys.executable, "python")
    if home not in ("/", ""):
        text = text.replace(home, "~")
    return text


def _render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return _portable(str(value))
    if isinstance(value, list | tuple):
        return ",".join(_render(v) for v in value)
    if hasattr(value, "value") and isinstance(value.value, str):  # an Enum
        return str(value.value)
    return _portable(str(value))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            return _render(field.default_factory())  # type: ignore[call-arg]
        except Exception:  # a factory that needs arguments or the environment: say so
            return "(computed)"
    if field.default is PydanticUndefined:
        return ""
    return _render(field.default)


def _description(cls: type[BaseModel], name: str) -> str:
    # A service that overrides a field only to change its default keeps the base description.
    for klass in cls.__mro__:
        fields: Mapping[str, FieldInfo] = getattr(klass, "model_fields", {})
        field = fields.get(name)
        if field is not None and field.description:
            return " ".join(field.description.split())
    return ""


def _is_secret(field: FieldInfo) -> bool:
    text = repr(field.annotation)
    return "SecretStr" in text or "SecretBytes" in text


def service_variables() -> Iterator[Variable]:
    """Every variable each service reads, from its settings class."""
    for section, cls in _service_classes():
        prefix = str(cls.model_config.get("env_prefix", ""))
        fallbacks: dict[str, str] = getattr(cls, "fallback_env_vars", SHARED_ENV_VARS)
        for name, field in cls.model_fields.items():
            yield Variable(
                section=section,
                name=f"{prefix}{name.upper()}",
                default=_default(field),
                description=_description(cls, name),
                secret=_is_secret(field),
                also=fallbacks.get(name, ""),
            )


def all_variables() -> list[Variable]:
    return [*service_variables(), *CLIENT_VARIABLES]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|") if text else ""


def render_markdown(variables: list[Variable]) -> str:
    """The configuration reference, deterministic (docs/CONFIGURATION.md)."""
    lines = [
        "# Configuration",
        "",
        f"<!-- Generated by `{GENERATED_BY}` (scripts/gen-config-docs). Do not edit. -->",
        "",
        "Every service reads typed settings from environment variables with its own prefix; a",
        "variable in the *also* column sets the same value when the prefixed one is unset (the",
        "prefixed one wins). Command-line flags of `rbee-worker` and the CLI override both.",
        "Secrets are never logged: startup logs print them as `**********`.",
        "",
    ]
    titles = {
        "catalog": "The catalog (`rbee-catalog`)",
        "provisioner": "The provisioner (`rbee-provisioner`)",
        "pool": "The pool (`rbee-pool`)",
        "worker": "A worker (`rbee-worker`; the pool sets these for the workers it spawns)",
        "client": "The CLI and the Python SDK",
    }
    for section, title in titles.items():
        rows = [v for v in variables if v.section == section]
        if not rows:
            continue
        lines += [f"## {title}", "", "| variable | also | default | meaning |", "|---|---|---|---|"]
        for v in rows:
            default = f"`{v.default}`" if v.default else ""
            also = f"`{v.also}`" if v.also else ""
            meaning = v.description + (" (secret)" if v.secret else "")
            lines.append(f"| `{v.name}` | {also} | {_md_cell(default)} | {_md_cell(meaning)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _current(v: Variable, environ: Mapping[str, str]) -> tuple[str, str]:
    """(value, where it came from) in this environment."""
    for name in (v.name, v.also):
        if name and name in environ:
            value = environ[name]
            return (REDACTED if v.secret and value else value), name
    return v.default, "default"


def cmd_config(args: argparse.Namespace) -> int:
    variables = all_variables()
    if args.section:
        variables = [v for v in variables if v.section == args.section]
    if args.reference:
        if args.format == "json":
            print_json(
                {
                    "variables": [
                        {
                            "section": v.section,
                            "name": v.name,
                            "also": v.also,
                            "default": v.default,
                            "description": v.description,
                            "secret": v.secret,
                        }
                        for v in variables
                    ]
                }
            )
        elif args.format == "markdown":
            sys.stdout.write(render_markdown(variables))
        else:
            print_table(
                ("section", "variable", "default", "meaning"),
                [(v.section, v.name, v.default, v.description) for v in variables],
            )
        return 0
    current = [(v, *_current(v, os.environ)) for v in variables]
    if args.format == "json":
        print_json(
            {
                "variables": [
                    {"section": v.section, "name": v.name, "value": value, "source": source}
                    for v, value, source in current
                ]
            }
        )
    else:
        shown = current if args.all else [c for c in current if c[2] != "default"]
        if not shown:
            print("every variable has its default (rbee config --all shows them)")
            return 0
        print_table(
            ("section", "variable", "value", "from"),
            [(v.section, v.name, value, source) for v, value, source in shown],
        )
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "config", help="the environment variables the mesh reads: values here, or the reference"
    )
    p.add_argument(
        "--format", choices=("human", "json", "markdown"), default="human", help="output format"
    )
    p.add_argument(
        "--reference", action="store_true", help="every variable with its default and meaning"
    )
    p.add_argument("--all", action="store_true", help="also the variables left at their default")
    p.add_argument(
        "--section", choices=("catalog", "provisioner", "pool", "worker", "client"), default=""
    )
    p.set_defaults(func=cmd_config)
