"""Settings parsing from the environment and redaction (services.common.settings)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from services.common.logs import log_settings
from services.common.settings import (
    REDACTED,
    ServiceSettings,
    non_default_settings,
    parse_host_port,
)

pytestmark = pytest.mark.unit


class ExampleSettings(ServiceSettings):
    """A service as the real ones declare themselves: own prefix, own port, a secret."""

    model_config = SettingsConfigDict(env_prefix="RBEE_EXAMPLE_")

    # Overridden with a plain annotation, as services do: validation must still apply.
    listen: str = "127.0.0.1:50099"
    hf_token: SecretStr | None = None
    page_size: int = 50


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RBEE_* variable from the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("RBEE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_defaults() -> None:
    settings = ExampleSettings()

    assert settings.home == Path.home() / ".local/share/rbee"
    assert settings.home.is_absolute()
    assert settings.listen == "127.0.0.1:50099"
    assert settings.metrics_listen is None
    assert settings.grace_seconds == 10.0
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert non_default_settings(settings) == {}


def test_prefixed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RBEE_EXAMPLE_LISTEN", "0.0.0.0:7000")
    monkeypatch.setenv("RBEE_EXAMPLE_METRICS_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("RBEE_EXAMPLE_GRACE_SECONDS", "2.5")
    monkeypatch.setenv("RBEE_EXAMPLE_LOG_LEVEL", "debug")
    monkeypatch.setenv("RBEE_EXAMPLE_LOG_FORMAT", "json")
    monkeypatch.setenv("RBEE_EXAMPLE_HOME", str(tmp_path / "svc"))
    monkeypatch.setenv("RBEE_EXAMPLE_PAGE_SIZE", "7")

    settings = ExampleSettings()

    assert settings.listen == "0.0.0.0:7000"
    assert settings.metrics_listen == "127.0.0.1:0"
    assert settings.grace_seconds == 2.5
    assert settings.log_level == "DEBUG"
    assert settings.python_log_level == 10
    assert settings.log_format == "json"
    assert settings.home == tmp_path / "svc"
    assert settings.page_size == 7


def test_hive_wide_home_is_a_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RBEE_HOME", str(tmp_path / "hive"))
    assert ExampleSettings().home == tmp_path / "hive"

    monkeypatch.setenv("RBEE_EXAMPLE_HOME", str(tmp_path / "svc"))
    assert ExampleSettings().home == tmp_path / "svc"


def test_hive_wide_log_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_LOG_LEVEL", "warning")
    monkeypatch.setenv("RBEE_LOG_FORMAT", "json")
    settings = ExampleSettings()
    assert (settings.log_level, settings.log_format) == ("WARNING", "json")

    monkeypatch.setenv("RBEE_EXAMPLE_LOG_LEVEL", "ERROR")
    assert ExampleSettings().log_level == "ERROR"


def test_unprefixed_variables_other_than_shared_ones_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hive-wide listen address would make every service fight for one port.
    monkeypatch.setenv("RBEE_LISTEN", "0.0.0.0:1")
    monkeypatch.setenv("RBEE_OTHER_LISTEN", "0.0.0.0:2")
    assert ExampleSettings().listen == "127.0.0.1:50099"


def test_home_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RBEE_EXAMPLE_HOME", "~/models")
    assert ExampleSettings().home == tmp_path / "home" / "models"


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_EXAMPLE_LISTEN", "0.0.0.0:7000")
    assert ExampleSettings(listen="127.0.0.1:0").listen == "127.0.0.1:0"


class MetricsOnByDefaultSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RBEE_METRICSON_")

    metrics_listen: str | None = "127.0.0.1:9499"


def test_empty_metrics_listen_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MetricsOnByDefaultSettings().metrics_listen == "127.0.0.1:9499"

    monkeypatch.setenv("RBEE_METRICSON_METRICS_LISTEN", "")
    assert MetricsOnByDefaultSettings().metrics_listen is None


def test_overridden_address_fields_are_still_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_METRICSON_METRICS_LISTEN", "nohost")
    with pytest.raises(ValidationError, match="host:port"):
        MetricsOnByDefaultSettings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RBEE_EXAMPLE_LISTEN", "localhost"),
        ("RBEE_EXAMPLE_LISTEN", "127.0.0.1:70000"),
        ("RBEE_EXAMPLE_LISTEN", ":50051"),
        ("RBEE_EXAMPLE_LISTEN", "::1:50051"),
        ("RBEE_EXAMPLE_METRICS_LISTEN", "127.0.0.1:http"),
        ("RBEE_EXAMPLE_GRACE_SECONDS", "-1"),
        ("RBEE_EXAMPLE_LOG_LEVEL", "LOUD"),
        ("RBEE_EXAMPLE_LOG_FORMAT", "xml"),
    ],
)
def test_bad_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        ExampleSettings()


def test_settings_are_frozen() -> None:
    settings = ExampleSettings()
    with pytest.raises(ValidationError):
        settings.listen = "0.0.0.0:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:50051", ("0.0.0.0", 50051)),
        ("localhost:9090", ("localhost", 9090)),
        ("[::]:50051", ("::", 50051)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["", "50051", "host:", "[zz]:1", "::1:50051", "h:-1", "h:65536"])
def test_parse_host_port_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(value)


def test_non_default_settings_redacts_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_EXAMPLE_HF_TOKEN", "hf_SuperSecretValue")
    monkeypatch.setenv("RBEE_EXAMPLE_LISTEN", "0.0.0.0:7000")

    settings = ExampleSettings()
    rendered = non_default_settings(settings)

    assert settings.hf_token is not None
    assert settings.hf_token.get_secret_value() == "hf_SuperSecretValue"
    assert rendered == {"hf_token": REDACTED, "listen": "0.0.0.0:7000"}
    assert "SuperSecret" not in repr(rendered)


def test_non_default_settings_renders_paths_and_numbers(tmp_path: Path) -> None:
    settings = ExampleSettings(home=tmp_path, grace_seconds=1, page_size=3)
    assert non_default_settings(settings) == {
        "home": str(tmp_path),
        "grace_seconds": "1.0",
        "page_size": "3",
    }


def test_non_default_settings_skips_values_equal_to_default() -> None:
    settings = ExampleSettings(listen="127.0.0.1:50099", page_size=50)
    assert non_default_settings(settings) == {}


def test_log_settings_logs_one_redacted_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RBEE_EXAMPLE_HF_TOKEN", "hf_SuperSecretValue")
    monkeypatch.setenv("RBEE_EXAMPLE_PAGE_SIZE", "9")
    logger = logging.getLogger("rbee.test.settings")

    with caplog.at_level(logging.INFO, logger="rbee.test.settings"):
        log_settings(logger, ExampleSettings())

    assert [record.getMessage() for record in caplog.records] == [
        f"ExampleSettings: hf_token={REDACTED}, page_size=9"
    ]
