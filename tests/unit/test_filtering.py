"""List filters: the AIP-160 subset parser and its in-memory semantics."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.catalog.domain import (
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelType,
    SourceKind,
)
from services.catalog.filtering import (
    MAX_FILTER_LENGTH,
    MAX_FILTER_TERMS,
    FilterOp,
    FilterTerm,
    ModelFilter,
    parse_model_filter,
)
from services.common.errors import InvalidArgument

pytestmark = pytest.mark.unit

_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _model(
    model_id: str = "m-1",
    *,
    family: str | None = "sdxl",
    quantization: str | None = "Q4_K_M",
    labels: dict[str, str] | None = None,
    with_metadata: bool = True,
) -> Model:
    metadata = (
        ModelMetadata(
            format=ModelFormat.GGUF,
            model_type=ModelType.LLM,
            architecture="llama",
            family=family,
            quantization=quantization,
        )
        if with_metadata
        else None
    )
    return Model(
        id=model_id,
        source=ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/repo"),
        metadata=metadata,
        labels=labels or {},
        created_at=_NOW,
        updated_at=_NOW,
    )


def test_empty_filter_has_no_terms() -> None:
    assert parse_model_filter("") == ModelFilter()
    assert parse_model_filter("   ") == ModelFilter()
    assert ModelFilter().matches(_model())


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("model_type=llm", FilterTerm("model_type", FilterOp.EQ, "llm")),
        ("format=gguf", FilterTerm("format", FilterOp.EQ, "gguf")),
        ("format=GGUF", FilterTerm("format", FilterOp.EQ, "gguf")),
        ("architecture=llama", FilterTerm("architecture", FilterOp.EQ, "llama")),
        ("family = sd3.5-large", FilterTerm("family", FilterOp.EQ, "sd3.5-large")),
        ("quantization!=Q4_K_M", FilterTerm("quantization", FilterOp.NE, "Q4_K_M")),
        ("state=READY", FilterTerm("state", FilterOp.EQ, "ready")),
        ("source=civitai", FilterTerm("source", FilterOp.EQ, "civitai")),
        ("name=models/llama-2", FilterTerm("name", FilterOp.EQ, "llama-2")),
        ("name=llama-2", FilterTerm("name", FilterOp.EQ, "llama-2")),
        ("name=llama*", FilterTerm("name", FilterOp.EQ, "llama", prefix=True)),
        ('name="models/ll*"', FilterTerm("name", FilterOp.EQ, "ll", prefix=True)),
        ("name!=models/*", FilterTerm("name", FilterOp.NE, "", prefix=True)),
        (
            "labels.team=ml",
            FilterTerm("labels", FilterOp.EQ, "ml", label_key="team"),
        ),
        (
            'labels.app.kubernetes.io/name!="a b"',
            FilterTerm("labels", FilterOp.NE, "a b", label_key="app.kubernetes.io/name"),
        ),
        (
            r'labels.note="say \"hi\" \\ \* ok"',
            FilterTerm("labels", FilterOp.EQ, 'say "hi" \\ * ok', label_key="note"),
        ),
        ('family=""', FilterTerm("family", FilterOp.EQ, "")),
        (
            "labels.k=hf:org/repo+x",
            FilterTerm("labels", FilterOp.EQ, "hf:org/repo+x", label_key="k"),
        ),
    ],
)
def test_every_field_parses(text: str, term: FilterTerm) -> None:
    assert parse_model_filter(text).terms == (term,)


def test_conjunctions_and_normalisation() -> None:
    flt = parse_model_filter('format=gguf AND state=ready AND labels.team="ml"')
    assert [term.field for term in flt.terms] == ["format", "state", "labels"]
    reordered = parse_model_filter("labels.team=ml   AND state=READY AND format = gguf")
    assert flt.normalized() == reordered.normalized()
    assert flt.normalized() != parse_model_filter("format=gguf AND state=ready").normalized()
    assert parse_model_filter(" AND ".join(["format=gguf"] * MAX_FILTER_TERMS)).terms


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("size=3", ["unknown field 'size' at position 0", "allowed fields:", "labels.KEY"]),
        ("format=gguf OR format=safetensors", ["OR at position 12", "only AND"]),
        ("format=gguf and state=ready", ["'and' at position 12", "AND (upper case)"]),
        ("format=gguf state=ready", ["unexpected 'state' at position 12"]),
        ("format=", ["incomplete term", "position 6"]),
        ("format", ["incomplete term"]),
        ("format=gguf AND", ["ends after AND"]),
        ("format==gguf", ["expected a value at position 7"]),
        ("format gguf x", ["expected '=' or '!='"]),
        ("=gguf x", ["expected a field name at position 0"]),
        ("NOT format=gguf", ["NOT at position 0 is not supported"]),
        ("format<gguf", ["unexpected character '<' at position 6", "'=' and '!='"]),
        ("(format=gguf)", ["unexpected character '(' at position 0", "parentheses"]),
        ("format=gguf;", ["unexpected character ';' at position 11"]),
        (
            "format=onnx",
            ["'onnx' is not a valid value", "allowed values: gguf, safetensors, diffusers"],
        ),
        ("state=broken", ["allowed values: downloading, ready, failed"]),
        ("model_type=chat", ["allowed values: llm, image, lora"]),
        ("source=s3", ["allowed values: huggingface, civitai, url, local"]),
        ("family=sd*", ["prefix matching is supported on name only"]),
        ("name=a*b", ["wildcard is only allowed at the end of a name value"]),
        ('name="a*b*"', ["wildcard is only allowed at the end"]),
        ("name=Models/A", ["is not a model name"]),
        ("name=models/a_b*", ["is not a model name"]),
        ('family="unterminated', ["unterminated quoted value starting at position 7"]),
        ("labels.=x", ["invalid label key ''"]),
        ("labels.a:b=x", ["invalid label key 'a:b'"]),
        ("format=gguf" + " AND format=gguf" * MAX_FILTER_TERMS, ["more than 16 terms"]),
        ("family=" + "x" * 300, ["longer than 256 characters"]),
        ("family=" + "x" * MAX_FILTER_LENGTH, ["at most 1024 are allowed"]),
    ],
)
def test_bad_filters_are_refused_with_a_pointer(text: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_model_filter(text)
    error = caught.value
    assert error.reason == "INVALID_FILTER"
    assert [violation.field for violation in error.field_violations] == ["filter"]
    for fragment in fragments:
        assert fragment in error.message


def test_escaped_star_is_literal_and_allowed_everywhere() -> None:
    flt = parse_model_filter(r'family="sd\*"')
    assert flt.terms == (FilterTerm("family", FilterOp.EQ, "sd*"),)


def test_matches_follows_the_documented_semantics() -> None:
    tagged = _model("llama-7b", labels={"team": "ml"})
    bare = _model("phi-2", family=None, quantization=None, with_metadata=True)
    downloading = _model("x-1", with_metadata=False)

    def selected(text: str) -> list[str]:
        flt = parse_model_filter(text)
        return [m.id for m in (tagged, bare, downloading) if flt.matches(m)]

    assert selected("quantization=q4_k_m") == ["llama-7b"]
    assert selected("quantization!=Q4_K_M") == ["phi-2", "x-1"]
    assert selected('family=""') == ["phi-2", "x-1"]
    assert selected('family!=""') == ["llama-7b"]
    assert selected("format!=gguf") == ["x-1"]
    assert selected("labels.team=ml") == ["llama-7b"]
    assert selected("labels.team!=ml") == ["phi-2", "x-1"]
    assert selected("name=llama*") == ["llama-7b"]
    assert selected("name!=llama*") == ["phi-2", "x-1"]
    assert selected("name=models/phi-2") == ["phi-2"]
    assert selected("name=*") == ["llama-7b", "phi-2", "x-1"]
    assert selected("state=ready AND source=huggingface AND format=gguf") == ["llama-7b", "phi-2"]
