"""`rbee install` through a real provisioner: `--build-env` reaches the build's clean
environment; malformed or secret-looking variables are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_client.cli.main import EXIT_FAILED, EXIT_USAGE, main
from tests.fixtures.recipe_repos import make_git_repo, write_hello_recipe
from tests.integration.provisioner_harness import running_mesh

pytestmark = pytest.mark.integration


def test_build_env_reaches_the_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_git_repo(tmp_path / "hello-repo")
    dump = tmp_path / "build-env.txt"
    recipes = tmp_path / "recipes"
    write_hello_recipe(recipes, repo, build=f'env > "{dump}"')
    with running_mesh(tmp_path / "home", recipe_dirs=[recipes]) as mesh:
        monkeypatch.setenv("RBEE_PROVISIONER_ADDR", mesh.address)
        monkeypatch.setenv("RBEE_CATALOG_ADDR", mesh.catalog_address)
        base = ["install", "cpu-llm", "--recipe", "hello"]

        assert main([*base, "--build-env", "NO_EQUALS_SIGN"]) == EXIT_USAGE
        assert "expected NAME=VALUE" in capsys.readouterr().err
        assert not dump.exists()

        assert main([*base, "--build-env", "MIRROR_TOKEN=x"]) == EXIT_FAILED
        assert "looks like a secret" in capsys.readouterr().err
        assert not dump.exists()

        assert main([*base, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("dry run: ") and "nothing was built" in out
        assert "installed" not in out.replace("would install", "")
        assert not dump.exists()

        code = main(
            [
                *base,
                "--build-env",
                "TORCH_INDEX_URL=https://mirror.invalid/whl/cpu",
                "--build-env",
                "PIP_FIND_LINKS=/opt/wheels=with-equals",
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "installed installs/" in out
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["TORCH_INDEX_URL"] == "https://mirror.invalid/whl/cpu"
    assert env["PIP_FIND_LINKS"] == "/opt/wheels=with-equals"
