"""Typed settings shared by every service (pydantic-settings).

Each service subclasses `ServiceSettings`, sets its own env prefix and default port:

    class CatalogSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="RBEE_CATALOG_")
        listen: str = "127.0.0.1:50051"

and reads `RBEE_CATALOG_LISTEN`, `RBEE_CATALOG_METRICS_LISTEN`, ... . A few settings are the
same for every service on a hive and also come from an unprefixed variable (`RBEE_HOME`,
`RBEE_LOG_LEVEL`, `RBEE_LOG_FORMAT`); the prefixed variable wins over it. The settings object is
built once in the entry point and passed down; nothing else reads the environment.

Access settings (services.common.auth has the model: one token per mesh) are hive-wide too:
`RBEE_AUTH_TOKEN_FILE` (a file holding the token: preferred, it stays out of `ps` and the
environment of every child) or `RBEE_AUTH_TOKEN`; `RBEE_AUTH_EXEMPT_HEALTH` (default true),
`RBEE_AUTH_EXEMPT_REFLECTION` (default false); `RBEE_TLS_CERT_FILE` + `RBEE_TLS_KEY_FILE` (this
service's certificate: TLS), `RBEE_TLS_CLIENT_CA_FILE` (mutual TLS: client certificates
required), `RBEE_TLS_CA_FILE` (the CA that the other services' certificates are checked against
when this one calls them; default: the client CA, else the system roots) and
`RBEE_TLS_SERVER_NAME`. A bad combination or an unreadable file fails at start-up with one line
(`load_settings`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from services.common.auth import ServerSecurity
from services.common.channels import ChannelSecurity

DEFAULT_HOME = "~/.local/share/rbee"
REDACTED = "**********"

# Settings that hold one value for the whole hive: field name -> unprefixed variable.
SHARED_ENV_VARS = {
    "home": "RBEE_HOME",
    "log_level": "RBEE_LOG_LEVEL",
    "log_format": "RBEE_LOG_FORMAT",
    "auth_token": "RBEE_AUTH_TOKEN",
    "auth_token_file": "RBEE_AUTH_TOKEN_FILE",
    "auth_exempt_health": "RBEE_AUTH_EXEMPT_HEALTH",
    "auth_exempt_reflection": "RBEE_AUTH_EXEMPT_REFLECTION",
    "tls_cert_file": "RBEE_TLS_CERT_FILE",
    "tls_key_file": "RBEE_TLS_KEY_FILE",
    "tls_client_ca_file": "RBEE_TLS_CLIENT_CA_FILE",
    "tls_ca_file": "RBEE_TLS_CA_FILE",
    "tls_server_name": "RBEE_TLS_SERVER_NAME",
}

# The access settings, by field name (a service hands them on to the workers it spawns).
ACCESS_FIELDS = (
    "auth_token",
    "auth_token_file",
    "auth_exempt_health",
    "auth_exempt_reflection",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "tls_ca_file",
    "tls_server_name",
)

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
    log_level: Annotated[str, AfterValidator(_upper_log_level)] = Field(
        default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: one line per record; json: one JSON object per line."
    )

    auth_token: SecretStr | None = Field(
        default=None,
        description=(
            "The mesh's bearer token; set: every call must carry it. After loading it holds "
            "the token read from `auth_token_file` when that is set."
        ),
    )
    auth_token_file: Path | None = Field(
        default=None, description="A file holding the token (preferred over auth_token)."
    )
    auth_exempt_health: bool = Field(
        default=True, description="grpc.health.v1 answers without a token."
    )
    auth_exempt_reflection: bool = Field(
        default=False, description="Server reflection answers without a token."
    )
    tls_cert_file: Path | None = Field(
        default=None, description="This service's PEM certificate chain (with tls_key_file: TLS)."
    )
    tls_key_file: Path | None = Field(default=None, description="Its PEM private key.")
    tls_client_ca_file: Path | None = Field(
        default=None, description="PEM CA for client certificates: set = mutual TLS."
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA to check the other services with when calling them.",
    )
    tls_server_name: str = Field(
        default="",
        description="The name the other services' certificates are checked against.",
    )

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

    @field_validator(
        "auth_token",
        "auth_token_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "tls_ca_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty variable (RBEE_AUTH_TOKEN=) means "not set", never "the empty token".
        return _empty_to_none(value)

    @field_validator(
        "auth_token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_ca_file"
    )
    @classmethod
    def _expand_path(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _check_access(self) -> ServiceSettings:
        """Read the token file and check the TLS files now, so that a mistake stops the
        service at start-up with one line rather than at the first call."""
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError(
                "set the token once: auth_token_file (RBEE_AUTH_TOKEN_FILE) or auth_token "
                "(RBEE_AUTH_TOKEN), not both"
            )
        if self.auth_token_file is not None:
            token = _read_text_file(self.auth_token_file, "auth_token_file").strip()
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file} is empty")
            # Frozen model: the validator is the one place that may fill the field in.
            object.__setattr__(self, "auth_token", SecretStr(token))
        if self.auth_token is not None:
            value = self.auth_token.get_secret_value()
            # Metadata values are printable ASCII; anything else could never be sent.
            if not value.isascii() or not value.isprintable() or " " in value:
                raise ValueError("the auth token must be printable ASCII without spaces")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "TLS needs both tls_cert_file (RBEE_TLS_CERT_FILE) and tls_key_file "
                "(RBEE_TLS_KEY_FILE)"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "mutual TLS (tls_client_ca_file) needs the service's own tls_cert_file and "
                "tls_key_file"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None:
                _read_pem(path, name)
        return self

    def server_security(self) -> ServerSecurity:
        """How this service's server checks callers: token, exemptions, TLS (PEM read now)."""
        return ServerSecurity(
            token=self.auth_token.get_secret_value() if self.auth_token is not None else "",
            exempt_health=self.auth_exempt_health,
            exempt_reflection=self.auth_exempt_reflection,
            tls_certificate_chain=_maybe_pem(self.tls_cert_file, "tls_cert_file"),
            tls_private_key=_maybe_pem(self.tls_key_file, "tls_key_file"),
            tls_client_ca=_maybe_pem(self.tls_client_ca_file, "tls_client_ca_file"),
        )

    def client_security(self) -> ChannelSecurity:
        """How this service calls the others of the mesh: the same token; TLS when it serves
        TLS itself (or a CA is set), checked against `tls_ca_file` (else the client CA, else
        the system roots); under mutual TLS it presents its own certificate."""
        tls = self.tls_cert_file is not None or self.tls_ca_file is not None
        mutual = self.tls_client_ca_file is not None
        return ChannelSecurity(
            token=self.auth_token.get_secret_value() if self.auth_token is not None else "",
            tls=tls,
            ca_file=(self.tls_ca_file or self.tls_client_ca_file) if tls else None,
            cert_file=self.tls_cert_file if mutual else None,
            key_file=self.tls_key_file if mutual else None,
            server_name=self.tls_server_name if tls else "",
        )

    @property
    def python_log_level(self) -> int:
        """`log_level` as a logging module constant."""
        return logging.getLevelNamesMapping()[self.log_level]


def _read_text_file(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name}: cannot read {path}: {_reason(exc)}") from None


def _read_pem(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {_reason(exc)}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{name}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def _maybe_pem(path: Path | None, name: str) -> bytes | None:
    return None if path is None else _read_pem(path, name)


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


class SettingsError(Exception):
    """Settings that cannot be used; the message is one line for the user."""


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting and what is wrong with it."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def load_settings(settings_cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """`settings_cls(**overrides)` (environment underneath), or SettingsError with one line
    saying what is wrong: entry points print it and exit 2 instead of a traceback."""
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(
            f"invalid {settings_cls.__name__}: {describe_validation_error(exc)}"
        ) from None


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
