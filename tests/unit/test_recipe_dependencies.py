"""A recipe's depends and makedepends are checked against the host before anything builds."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.provisioner.recipes.pkgbuild import Pkgbuild, missing_dependencies

pytestmark = pytest.mark.unit


def pkgbuild(depends: list[str], makedepends: list[str]) -> Pkgbuild:
    return Pkgbuild(
        path="/r/PKGBUILD",
        pkgname="p",
        pkgver="1",
        pkgrel="1",
        arch=["any"],
        depends=depends,
        makedepends=makedepends,
    )


def tools(*present: str) -> Callable[[str], str | None]:
    """A tool finder that finds only `present`."""
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_nothing_missing() -> None:
    recipe = pkgbuild(["python>=3.11", "bash"], ["cmake", "gcc", "cuda"])
    found = tools("bash", "cmake", "gcc", "cuda")
    assert missing_dependencies(recipe, find=found, python_version=(3, 11, 7)) == []


def test_each_missing_tool_is_named_with_why() -> None:
    recipe = pkgbuild(["python>=3.11"], ["cmake", "gcc", "cuda"])
    missing = missing_dependencies(recipe, find=tools("gcc"), python_version=(3, 12, 0))
    assert missing == [
        "cmake (no cmake on the build's PATH)",
        "cuda (nvcc is not on the build's PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin)",
    ]


@pytest.mark.parametrize(
    ("bound", "version", "ok"),
    [
        ("python>=3.11", (3, 11, 0), True),
        ("python>=3.11", (3, 10, 14), False),
        ("python<3.13", (3, 13, 1), False),
        ("python=3.11", (3, 11, 0), True),
        ("python==3.12.1", (3, 12, 1), True),
        ("python>3.11", (3, 11, 0), False),
        ("python", (2, 7, 0), True),  # no bound: the interpreter the services run is enough
    ],
)
def test_python_bounds_are_the_services_interpreter(
    bound: str, version: tuple[int, ...], ok: bool
) -> None:
    missing = missing_dependencies(pkgbuild([bound], []), find=tools(), python_version=version)
    assert (missing == []) is ok
    if not ok:
        assert missing[0].startswith(f"{bound} (the services run Python ")


def test_a_name_that_is_not_a_command_spec_is_left_to_the_build() -> None:
    assert missing_dependencies(pkgbuild(["lib foo (weird)"], []), find=tools()) == []
