"""The source grammar: every accepted form, every refused form, and properties over any text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.provisioner.domain import CivitaiSpec, HfSpec, LocalSpec, UrlSpec
from services.provisioner.sources import parse_source
from services.provisioner.sources.spec import format_source

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
            HfSpec("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"),
        ),
        ("hf:org/repo:model.Q4_K_M.gguf", HfSpec("org/repo", "model.Q4_K_M.gguf")),
        (
            "hf:org/repo:sub/dir/x.safetensors@v1.0",
            HfSpec("org/repo", "sub/dir/x.safetensors", "v1.0"),
        ),
        ("hf:org/repo@refs/pr/1", HfSpec("org/repo", None, "refs/pr/1")),
        ("hf:org/repo@" + "a" * 40, HfSpec("org/repo", None, "a" * 40)),
        ("HF:org/repo", HfSpec("org/repo")),
        ("org/repo", HfSpec("org/repo")),
        ("org/repo:file.gguf", HfSpec("org/repo", "file.gguf")),
        ("  org/repo  ", HfSpec("org/repo")),
        ("civitai:12345", CivitaiSpec(12345)),
        ("civitai:12345:my model v2.safetensors", CivitaiSpec(12345, "my model v2.safetensors")),
        ("https://example.com/m/model.gguf?x=1", UrlSpec("https://example.com/m/model.gguf?x=1")),
        ("http://127.0.0.1:8080/a.gguf", UrlSpec("http://127.0.0.1:8080/a.gguf")),
        ("file:/models/a.gguf", LocalSpec(Path("/models/a.gguf"))),
        ("file:///models/my%20model.gguf", LocalSpec(Path("/models/my model.gguf"))),
        ("/models/folder", LocalSpec(Path("/models/folder"))),
    ],
)
def test_accepted_forms(text: str, expected: object) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "gpt2",  # a repo id without ORG
        "hf:org",
        "hf:org/repo/extra",
        "hf:org/re po",
        "hf:-org/repo",
        "hf:org/repo-",
        "hf:org/re--po",
        "hf:org/re..po",
        "hf:org/repo.git",
        "hf:" + "a" * 97 + "/repo",
        "hf:org/repo:",
        "hf:org/repo:../../etc/passwd",
        "hf:org/repo:a/../b.gguf",
        "hf:org/repo:/abs.gguf",
        "hf:org/repo:a\\b.gguf",
        "hf:org/repo:a//b.gguf",
        "hf:org/repo:./a.gguf",
        "hf:org/repo@",
        "hf:org/repo@a..b",
        "hf:org/repo@-x",
        "hf:org/repo@a b",
        "civitai:",
        "civitai:abc",
        "civitai:0",
        "civitai:-5",
        "civitai:12:",
        "civitai:12:../x",
        "civitai:12:a/b",
        "civitai:١٢٣",  # non-ASCII digits
        "ftp://example.com/a.gguf",
        "s3://bucket/a",
        "https://",
        "https://:80/x",
        "https://example.com:notaport/x",
        "https://user:secret@example.com/a.gguf",
        "file:relative/path.gguf",
        "file:/models/../etc/passwd",
        "file://otherhost/a.gguf",
        "/models/../x",
        "org/repo\x00:x",
        "C:\\models\\a.gguf",
        "x" * 5000,
    ],
)
def test_refused_forms(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_source(text)
    assert info.value.reason == "INVALID_SOURCE"
    assert info.value.field_violations[0].field == "source"
    assert "hf:ORG/REPO" in info.value.message  # the hint lists the forms


def test_url_credentials_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_source("https://alice:hunter2@example.com/model.gguf")
    assert "hunter2" not in info.value.message
    assert "token" in info.value.message


def test_format_source_round_trips() -> None:
    for text in (
        "hf:org/repo",
        "hf:org/repo:a/b.gguf@main",
        "civitai:7:x.safetensors",
        "https://h/x.gguf",
        "file:///m/x.gguf",
        "file:///m/with%20space%25.gguf",
    ):
        assert format_source(parse_source(text)) == text


def _no_traversal(spec: object) -> None:
    if isinstance(spec, HfSpec):
        assert spec.repo.count("/") == 1 and ".." not in spec.repo and "--" not in spec.repo
        if spec.file is not None:
            parts = spec.file.split("/")
            assert ".." not in parts and "" not in parts and "." not in parts
            assert "\\" not in spec.file and "\x00" not in spec.file
        if spec.revision is not None:
            assert ".." not in spec.revision
    elif isinstance(spec, CivitaiSpec):
        assert spec.version_id > 0
        if spec.filename is not None:
            assert "/" not in spec.filename and spec.filename not in (".", "..")
    elif isinstance(spec, LocalSpec):
        assert spec.path.is_absolute() and ".." not in spec.path.parts
    else:
        assert isinstance(spec, UrlSpec) and "@" not in spec.url.split("/")[2]


_PIECES = st.sampled_from(
    [
        "hf:",
        "civitai:",
        "file:",
        "https://",
        "/",
        "..",
        ":",
        "@",
        "org",
        "repo",
        "a.gguf",
        "\\",
        "\x00",
        "--",
        "1",
        "//",
        ".",
        " ",
        "%2e",
        "user:pw@",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_PIECES, max_size=10).map("".join)))
def test_parse_never_raises_anything_else_and_never_accepts_traversal(text: str) -> None:
    try:
        spec = parse_source(text)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_SOURCE"
        return
    _no_traversal(spec)
    assert parse_source(format_source(spec)) == spec


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}[A-Za-z0-9]", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}[A-Za-z0-9]", fullmatch=True),
)
def test_valid_repo_ids_parse_unless_they_hold_double_separators(org: str, name: str) -> None:
    text = f"hf:{org}/{name}"
    if any(bad in org + "/" + name for bad in ("--", "..")) or name.endswith(".git"):
        with pytest.raises(InvalidArgument):
            parse_source(text)
    else:
        assert parse_source(text) == HfSpec(f"{org}/{name}")
