"""Fixtures shared by the provisioner's integration tests: empty fakes and a running mesh.

Modules that need pre-populated fakes define their own `hub` / `civitai`, which take precedence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fake_civitai import FakeCivitai
from tests.fixtures.fake_hub import FakeHub
from tests.integration.provisioner_harness import Mesh, running_mesh


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def civitai() -> Iterator[FakeCivitai]:
    with FakeCivitai() as fake:
        yield fake


@pytest.fixture
def mesh(tmp_path: Path, hub: FakeHub, civitai: FakeCivitai) -> Iterator[Mesh]:
    """A catalog and a provisioner under tmp_path/home, pointed at the fakes."""
    with running_mesh(
        tmp_path / "home", hf_endpoint=hub.endpoint, civitai_endpoint=civitai.endpoint
    ) as running:
        yield running
