"""Resource ids: validation, resource-name parsing, and ids derived from model sources."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.catalog.domain import ID_PATTERN, ModelSource, SourceKind
from services.catalog.ids import (
    MAX_ID_LENGTH,
    model_id_for_source,
    parse_resource_name,
    slugify,
    source_hash_suffix,
    validate_id,
)
from services.common.errors import InvalidArgument

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value", ["a", "0", "llama-2-7b", "a" * 63, "x-1-y", "9lives"])
def test_validate_id_accepts_valid_ids(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "-a", "a-", "A", "a_b", "a.b", "a/b", "a" * 64, "a\n", "a\x00", "é", " a", "a b"],
)
def test_validate_id_refuses_invalid_ids_with_the_rule(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_id(value, field="model_id")
    error = caught.value
    assert error.reason == "INVALID_NAME"
    assert [violation.field for violation in error.field_violations] == ["model_id"]
    assert "lower-case letters, digits and hyphens" in error.message
    assert "1-63" in error.message


def test_parse_resource_name_returns_the_id() -> None:
    assert parse_resource_name("models/llama-2-7b", "models") == "llama-2-7b"
    assert parse_resource_name("installs/cpu-llm-1", "installs") == "cpu-llm-1"


@pytest.mark.parametrize(
    "name",
    [
        "models/../etc",
        "models/a/b",
        "/abs",
        "/models/a",
        "models/",
        "models",
        "models/a\x00b",
        "models/\x00",
        "models/" + "a" * 10_000,
        "m" * 10_000,
        "installs/a",
        "models/A",
        "models/a\n",
        "Models/a",
        "",
    ],
)
def test_parse_resource_name_refuses_anything_but_collection_slash_id(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_resource_name(name, "models")
    error = caught.value
    assert error.reason == "INVALID_NAME"
    assert error.field_violations[0].field == "name"
    assert "models/{id}" in error.message
    # The message shows a bounded rendering of the client's value, never 10,000 characters.
    assert len(error.message) < 400


def test_slugify() -> None:
    assert slugify("Llama-2-7B.Q4_K_M") == "llama-2-7b-q4-k-m"
    assert slugify("--a//b::c--") == "a-b-c"
    assert slugify("日本語") == ""


def test_model_id_from_a_gguf_file_hint_is_readable_and_hashed() -> None:
    source = ModelSource(
        kind=SourceKind.HUGGINGFACE,
        repo="TheBloke/Llama-2-7B-GGUF",
        files=["llama-2-7b.Q4_K_M.gguf"],
    )
    model_id = model_id_for_source(source, "llama-2-7b.Q4_K_M.gguf")
    expected_suffix = hashlib.sha256(source.canonical().encode()).hexdigest()[:8]
    assert model_id == f"llama-2-7b-q4-k-m-{expected_suffix}"
    assert source_hash_suffix(source) == expected_suffix


def test_model_id_defaults_to_a_name_from_the_source() -> None:
    hf_file = ModelSource(
        kind=SourceKind.HUGGINGFACE, repo="org/repo", files=["sub/Tiny-Llama.Q8_0.gguf"]
    )
    hf_repo = ModelSource(kind=SourceKind.HUGGINGFACE, repo="stabilityai/SDXL-Turbo")
    civitai = ModelSource(kind=SourceKind.CIVITAI, civitai_model_id=1, civitai_version_id=4201)
    url = ModelSource(kind=SourceKind.URL, url="https://h.example/dl/Tiny.safetensors?token=SECRET")
    local = ModelSource(kind=SourceKind.LOCAL, path="/data/models/Phi-3.gguf")
    assert model_id_for_source(hf_file).startswith("tiny-llama-q8-0-")
    assert model_id_for_source(hf_repo).startswith("sdxl-turbo-")
    assert model_id_for_source(civitai).startswith("civitai-4201-")
    url_id = model_id_for_source(url)
    assert url_id.startswith("tiny-")
    assert "secret" not in url_id
    assert model_id_for_source(local).startswith("phi-3-")


def test_the_original_rbee_collision_does_not_happen() -> None:
    # The original mapped "/" and ":" to "-": "a/b:c" and "a-b-c" became the same id.
    slashed = ModelSource(kind=SourceKind.LOCAL, path="a/b:c")
    dashed = ModelSource(kind=SourceKind.LOCAL, path="a-b-c")
    assert model_id_for_source(slashed, "a-b-c") != model_id_for_source(dashed, "a-b-c")
    assert model_id_for_source(slashed) != model_id_for_source(dashed)
    hf = ModelSource(kind=SourceKind.HUGGINGFACE, repo="a/b", files=["c"])
    assert model_id_for_source(hf, "a-b-c") != model_id_for_source(dashed, "a-b-c")


@pytest.mark.parametrize("hint", ["x" * 500, "-" * 80 + "a", "日本語", "", "...", "A" * 54 + "-b"])
def test_model_id_is_always_valid_and_short(hint: str) -> None:
    source = ModelSource(kind=SourceKind.LOCAL, path="/m")
    model_id = model_id_for_source(source, hint)
    assert len(model_id) <= MAX_ID_LENGTH
    assert ID_PATTERN.fullmatch(model_id)
    assert validate_id(model_id) == model_id


_text = st.text(max_size=80)
_sources = st.builds(
    ModelSource,
    kind=st.sampled_from(SourceKind),
    repo=st.none() | _text,
    revision=st.none() | _text,
    files=st.lists(_text, max_size=3),
    civitai_version_id=st.none() | st.integers(min_value=1, max_value=2**40),
    url=st.none() | _text,
    path=st.none() | _text,
)


@settings(max_examples=300, deadline=None)
@given(first=_sources, second=_sources, hint=st.none() | st.text(max_size=120))
def test_model_ids_are_valid_and_distinct_sources_get_distinct_suffixes(
    first: ModelSource, second: ModelSource, hint: str | None
) -> None:
    first_id = model_id_for_source(first, hint)
    second_id = model_id_for_source(second, hint)
    for model_id in (first_id, second_id):
        assert len(model_id) <= MAX_ID_LENGTH
        assert ID_PATTERN.fullmatch(model_id)
    if first.canonical() != second.canonical():
        assert first_id[-8:] != second_id[-8:]
        assert first_id != second_id
    else:
        assert first_id == second_id


def test_a_separator_inside_a_value_does_not_merge_two_sources() -> None:
    joined = ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/r", files=["a,b"])
    split = ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/r", files=["a", "b"])
    empty = ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/r", files=[])
    blank = ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/r", files=[""])
    assert joined.canonical() != split.canonical()
    assert empty.canonical() != blank.canonical()
    assert model_id_for_source(joined) != model_id_for_source(split)
