"""docs/CONFIGURATION.md is generated from the settings classes, and every setting is documented."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from rbee_client.cli.config import all_variables, render_markdown, service_variables

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"


def _reference() -> str:
    # The generator runs with an empty environment: defaults must not depend on ours.
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    with mock.patch.dict(os.environ, keep, clear=True):
        return render_markdown(all_variables())


def test_configuration_doc_is_up_to_date() -> None:
    assert DOC.read_text() == _reference(), (
        "docs/CONFIGURATION.md is stale: scripts/gen-config-docs"
    )


def test_every_service_setting_has_a_meaning() -> None:
    undocumented = [v.name for v in service_variables() if not v.description]
    assert undocumented == []


def test_secrets_are_marked_and_never_rendered_with_a_value() -> None:
    secrets = {v.name for v in service_variables() if v.secret}
    assert {"RBEE_PROVISIONER_HF_TOKEN", "RBEE_PROVISIONER_CIVITAI_TOKEN"} <= secrets
    with mock.patch.dict(os.environ, {"HF_TOKEN": "hf_CANARYVALUE123"}):
        text = render_markdown(all_variables())
    assert "hf_CANARYVALUE123" not in text


def test_fallback_variables_are_listed() -> None:
    by_name = {v.name: v for v in all_variables()}
    assert by_name["RBEE_PROVISIONER_HF_TOKEN"].also == "HF_TOKEN"
    assert by_name["RBEE_CATALOG_HOME"].also == "RBEE_HOME"
    assert by_name["RBEE_POOL_LISTEN"].default == "127.0.0.1:50091"
