"""Typed settings shared by every service (pydantic-settings).

Each service subclasses `ServiceSettings`, sets its own env prefix and default port:

    class CatalogSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="RBEE_CATALOG_")
        listen: str = "127.0.0.1:50051"

and reads `RBEE_CATALOG_LISTEN`, `RBEE_CATALOG_METRICS_LISTEN`, ... . A few settings are the
same for every service on a hive and also come from an unprefixed variable (`RBEE_HOME`,
`RBEE_LOG_LEVEL`, `RBEE_LOG_FORMAT`); the prefixed variable wins over it. The settings object is
built once in the entry point and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretBytes,
    SecretStr,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_HOME = "~/.local/share/rbee"
REDACTED = "**********"

# Settings that hold one value for the whole hive: field name -> unprefixed variable.
SHARED_ENV_VARS = {
    "home": "RBEE_HOME",
    "log_level": "RBEE_LOG_LEVEL",
    "log_format": "RBEE_LOG_FORMAT",
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets: "[::1]:50051"); port 0 means ephemeral.

    Raises ValueError with a message that says what is wrong.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {value!r}") from None
    elif ":" in host:
        raise ValueError(f"IPv6 hosts need brackets, e.g. [::1]:50051, got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, got {value!r}")
    return host, int(port_text)


def _check_host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _empty_to_none(value: Any) -> Any:
    # An empty variable (RBEE_CATALOG_METRICS_LISTEN=) switches the endpoint off.
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _upper_log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return level


HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""A "host:port" string, validated; port 0 asks for an ephemeral port."""

OptionalHostPort = Annotated[HostPort | None, BeforeValidator(_empty_to_none)]
"""A "host:port" string, or None (an empty variable) for off."""


class _SharedEnvSource(PydanticBaseSettingsSource):
    """Hive-wide variables (RBEE_HOME, ...) as a fallback below the service-prefixed ones.

    A service adds its own unprefixed fallbacks (HF_TOKEN, ...) with a `fallback_env_vars`
    class attribute that extends SHARED_ENV_VARS.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        fallbacks: dict[str, str] = getattr(self.settings_cls, "fallback_env_vars", SHARED_ENV_VARS)
        env_name = fallbacks.get(field_name)
        if env_name is None:
            return None, field_name, False
        return os.environ.get(env_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[field_name] = value
        return values


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses set `env_prefix` and their default port."""

    model_config = SettingsConfigDict(
        env_prefix="RBEE_",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    home: Path = Field(
        default_factory=lambda: Path(DEFAULT_HOME).expanduser(),
        description="Where the hive keeps its state (database, models, installs, logs).",
    )
    listen: str = Field(
        default="127.0.0.1:0",
        description="gRPC listen address host:port; services override the default port.",
    )
    metrics_listen: str | None = Field(
        default=None,
        description="Prometheus /metrics address host:port (port 0: ephemeral); None: off.",
    )
    grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long in-flight RPCs may finish after SIGTERM.",
    )
    log_level: Annotated[str, AfterValidator(_upper_log_level)] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then prefixed variables, then hive-wide variables, then defaults."""
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            _SharedEnvSource(settings_cls),
            file_secret_settings,
        )

    # Validators by field name, not by annotation, so that they still apply when a service
    # overrides the field to change its default (`listen: str = "127.0.0.1:50061"`).
    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _empty_means_off(cls, value: Any) -> Any:
        return _empty_to_none(value)

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _valid_host_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_host_port(value)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        # Expanded once, here, so no other code has to think about "~".
        return value.expanduser()

    @property
    def python_log_level(self) -> int:
        """`log_level` as a logging module constant."""
        return logging.getLevelNamesMapping()[self.log_level]


def non_default_settings(settings: BaseModel) -> dict[str, str]:
    """The settings whose value differs from the default, rendered for a log line.

    Secrets (SecretStr, SecretBytes) render as "**********" whatever their value, so the
    result is safe to log.
    """
    rendered: dict[str, str] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        default = field.get_default(call_default_factory=True, validated_data={})
        if value == default:
            continue
        rendered[name] = _render(value)
    return rendered


def _render(value: Any) -> str:
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, BaseModel):
        return str(non_default_settings(value))
    return str(value)


# Channel options for waiting on a process that is starting: gRPC's default reconnect backoff
# (1 s, growing 1.6x, with jitter) makes a health poll see a server that has been up for a
# second only 1-2 s later; 50-100 ms keeps the wait within a poll of the truth.
FAST_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
)
