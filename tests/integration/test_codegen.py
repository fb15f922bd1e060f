"""The contract's tooling: committed stubs are current, `buf lint` is clean, `buf breaking` bites.

Subprocesses on purpose: the point is the real scripts/codegen and the real buf binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def find_buf() -> str | None:
    """The buf binary of this environment (buf-bin installs it beside the interpreter)."""
    beside = Path(sys.executable).parent / "buf"
    if beside.is_file():
        return str(beside)
    return shutil.which("buf")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs a command with a deadline, capturing its output as text."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=90, check=False)


def test_committed_stubs_are_current() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [str(ROOT / "scripts" / "codegen"), "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "stubs are current" in result.stdout


def test_codegen_check_reports_a_stale_stub(tmp_path: Path) -> None:
    # A copy of the tree with one stub edited must fail the check and name the file.
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    stub = copy / "protos" / "rbee" / "common" / "v1" / "errors_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (copy / "protos" / "rbee" / "common" / "v1" / "orphan_pb2.py").write_text("")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [str(copy / "scripts" / "codegen"), "--check"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 1
    assert "stale rbee/common/v1/errors_pb2.pyi" in result.stderr
    assert "orphaned rbee/common/v1/orphan_pb2.py" in result.stderr


def test_buf_lint_is_clean() -> None:
    buf = find_buf()
    if buf is None:
        pytest.skip("buf is not installed (the dev extra's buf-bin provides it)")
    result = run([buf, "lint"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = run([buf, "ls-files"], ROOT)
    assert "protos/rbee/catalog/v1/catalog.proto" in listed.stdout


def test_buf_breaking_catches_a_removed_field(tmp_path: Path) -> None:
    buf = find_buf()
    if buf is None:
        pytest.skip("buf is not installed (the dev extra's buf-bin provides it)")
    before = tmp_path / "before"
    after = tmp_path / "after"
    for tree in (before, after):
        shutil.copytree(ROOT / "protos", tree / "protos", ignore=shutil.ignore_patterns("*.py*"))
        shutil.copy(ROOT / "buf.yaml", tree / "buf.yaml")
    same = run([buf, "breaking", "--against", str(before)], after)
    assert same.returncode == 0, same.stdout + same.stderr
    proto = after / "protos" / "rbee" / "catalog" / "v1" / "catalog.proto"
    text = proto.read_text()
    edited = text.replace("  string state_message = 8;\n", "", 1)
    assert edited != text
    proto.write_text(edited)
    broken = run([buf, "breaking", "--against", str(before)], after)
    assert broken.returncode != 0
    assert "state_message" in broken.stdout + broken.stderr
