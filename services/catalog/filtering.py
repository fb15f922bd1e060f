"""List filters for models: a small, documented subset of AIP-160.

Grammar (whitespace between tokens is free)::

    filter  := term ( "AND" term )*          at most 16 terms, at most 1,024 characters
    term    := field ( "=" | "!=" ) value
    field   := name | model_type | format | architecture | family | quantization
             | state | source | labels.KEY
    value   := bare | quoted
    bare    := [A-Za-z0-9_.:/+-]+ with an optional trailing "*"
    quoted  := '"' ... '"'  with backslash escapes (\\" \\\\ \\* and \\ before any character)

Meaning:

* `AND` is the only keyword and is case-sensitive; `OR`, `NOT`, parentheses and comparison
  operators other than `=` and `!=` are refused with a message that says so.
* `name` is the resource name (`models/{id}`) or the bare id; a trailing unescaped `*` makes it
  a prefix match (`name=llama*`, `name="models/llama-2*"`). `*` is allowed nowhere else.
* `state`, `format`, `model_type` and `source` (the source kind) take their enum values
  (`state=ready`, `format=gguf`, `source=huggingface`), case-insensitively.
* `architecture`, `family` and `quantization` compare case-insensitively (ASCII), so
  `quantization=q4_k_m` finds Q4_K_M. An empty quoted value (`family=""`) matches models that
  have no value for the field.
* `labels.KEY=value` compares a label exactly; `labels.KEY!=value` also matches models without
  that label.
* `!=` matches models whose value differs, including models that have no value at all.

`ModelFilter` is a plain frozen value: the store turns it into parameterised SQL (values are
never formatted into SQL text) and `ModelFilter.matches` evaluates it in memory with the same
semantics.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from services.catalog.domain import (
    ID_PATTERN,
    Model,
    ModelFormat,
    ModelState,
    ModelType,
    SourceKind,
)
from services.common.errors import InvalidArgument

MAX_FILTER_LENGTH = 1024
MAX_FILTER_TERMS = 16
MAX_VALUE_LENGTH = 256
MAX_LABEL_KEY_LENGTH = 63

# Fields compared exactly against an enum value (lower-case).
ENUM_FIELDS: dict[str, type[enum.StrEnum]] = {
    "state": ModelState,
    "format": ModelFormat,
    "model_type": ModelType,
    "source": SourceKind,
}
# Free-text metadata fields compared case-insensitively (ASCII, like SQLite's NOCASE).
TEXT_FIELDS = ("architecture", "family", "quantization")
NAME_FIELD = "name"
LABELS_PREFIX = "labels."
ALLOWED_FIELDS = (
    NAME_FIELD,
    "model_type",
    "format",
    "architecture",
    "family",
    "quantization",
    "state",
    "source",
    "labels.KEY",
)
_ALLOWED_TEXT = ", ".join(ALLOWED_FIELDS)
_BARE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/+-*")
_LABEL_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")
_MODELS_PREFIX = "models/"


class FilterOp(enum.StrEnum):
    EQ = "="
    NE = "!="


@dataclass(frozen=True)
class FilterTerm:
    """One `field op value` comparison.

    `field` is one of ALLOWED_FIELDS except that labels are `field="labels"` with `label_key`
    set. For `name`, `value` is the bare id (or id prefix when `prefix` is true). Enum values
    are stored lower-case, as the enums spell them.
    """

    field: str
    op: FilterOp
    value: str
    prefix: bool = False
    label_key: str | None = None

    def canonical(self) -> str:
        """A stable text form of the term (used for filter fingerprints)."""
        return json.dumps(
            [self.field, self.label_key, self.op.value, self.value, self.prefix],
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class ModelFilter:
    """A conjunction of terms; the empty filter matches every model."""

    terms: tuple[FilterTerm, ...] = ()

    def normalized(self) -> str:
        """A canonical text form: equal for filters that select the same models by the same
        terms, whatever their order or spacing in the original text."""
        return "&".join(sorted({term.canonical() for term in self.terms}))

    def matches(self, model: Model) -> bool:
        """Evaluate the filter in memory, with the same semantics as the store's SQL."""
        return all(_term_matches(term, model) for term in self.terms)


def parse_model_filter(text: str) -> ModelFilter:
    """Parse a List filter (grammar in the module docstring) into a ModelFilter.

    Raises InvalidArgument with reason INVALID_FILTER and a field violation on `filter`, whose
    message points at the offending token and lists the allowed fields (or values).
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise _filter_error(
            f"filter is {len(text)} characters long; at most {MAX_FILTER_LENGTH} are allowed"
        )
    tokens = _tokenize(text)
    terms: list[FilterTerm] = []
    index = 0
    while index < len(tokens):
        if terms:
            _expect_and(tokens[index])
            index += 1
            if index >= len(tokens):
                raise _filter_error(
                    f"filter ends after AND at position {len(text)}; expected a term "
                    f"(field=value); allowed fields: {_ALLOWED_TEXT}"
                )
        if len(tokens) - index < 3:
            last = tokens[-1]
            raise _filter_error(
                f"incomplete term after {last.text!r} at position {last.position}; "
                f"expected field=value; allowed fields: {_ALLOWED_TEXT}"
            )
        field_token, op_token, value_token = tokens[index : index + 3]
        terms.append(_parse_term(field_token, op_token, value_token))
        index += 3
        if len(terms) > MAX_FILTER_TERMS:
            raise _filter_error(
                f"filter has more than {MAX_FILTER_TERMS} terms (term at position "
                f"{field_token.position}); at most {MAX_FILTER_TERMS} are allowed"
            )
    return ModelFilter(tuple(terms))


# --- lexing -------------------------------------------------------------------------------


class _Kind(enum.Enum):
    WORD = "word"
    STRING = "string"
    OP = "op"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    text: str  # for STRING: the unescaped value
    position: int  # 0-based offset of the token in the filter text
    # For STRING: offsets (into `text`) of `*` characters that were escaped, hence literal.
    escaped_stars: frozenset[int] = frozenset()


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    length = len(text)
    while i < length:
        char = text[i]
        if char.isspace():
            i += 1
        elif char == "=":
            tokens.append(_Token(_Kind.OP, "=", i))
            i += 1
        elif text.startswith("!=", i):
            tokens.append(_Token(_Kind.OP, "!=", i))
            i += 2
        elif char == '"':
            token, i = _read_string(text, i)
            tokens.append(token)
        elif char in _BARE_CHARS:
            start = i
            while i < length and text[i] in _BARE_CHARS:
                i += 1
            tokens.append(_Token(_Kind.WORD, text[start:i], start))
        else:
            raise _filter_error(_unexpected_character(text, i))
    return tokens


def _unexpected_character(text: str, i: int) -> str:
    char = text[i]
    if char in "<>":
        hint = "only '=' and '!=' are supported"
    elif char in "()":
        hint = "parentheses are not supported; join terms with AND"
    else:
        hint = "expected field=value terms joined by AND"
    return f"unexpected character {char!r} at position {i}; {hint}; allowed fields: {_ALLOWED_TEXT}"


def _read_string(text: str, start: int) -> tuple[_Token, int]:
    chars: list[str] = []
    escaped_stars: set[int] = set()
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text):
                break
            escaped = text[i + 1]
            if escaped == "*":
                escaped_stars.add(len(chars))
            chars.append(escaped)
            i += 2
        elif char == '"':
            return _Token(_Kind.STRING, "".join(chars), start, frozenset(escaped_stars)), i + 1
        else:
            chars.append(char)
            i += 1
    raise _filter_error(f"unterminated quoted value starting at position {start}")


# --- parsing ------------------------------------------------------------------------------


def _expect_and(token: _Token) -> None:
    if token.kind is _Kind.WORD and token.text == "AND":
        return
    if token.kind is _Kind.WORD and token.text in {"OR", "or"}:
        message = f"OR at position {token.position} is not supported; only AND joins terms"
    elif token.kind is _Kind.WORD and token.text.upper() == "AND":
        message = f"{token.text!r} at position {token.position}: the keyword is AND (upper case)"
    else:
        message = f"unexpected {token.text!r} at position {token.position}; terms are joined by AND"
    raise _filter_error(message)


def _parse_term(field_token: _Token, op_token: _Token, value_token: _Token) -> FilterTerm:
    if field_token.kind is not _Kind.WORD:
        raise _filter_error(
            f"expected a field name at position {field_token.position}, found "
            f"{field_token.text!r}; allowed fields: {_ALLOWED_TEXT}"
        )
    field = field_token.text
    if field in {"NOT", "OR", "AND"}:
        raise _filter_error(
            f"{field} at position {field_token.position} is not supported here; "
            f"expected field=value; allowed fields: {_ALLOWED_TEXT}"
        )
    label_key: str | None = None
    if field.startswith(LABELS_PREFIX):
        label_key = field[len(LABELS_PREFIX) :]
        if (
            not label_key
            or len(label_key) > MAX_LABEL_KEY_LENGTH
            or not set(label_key) <= _LABEL_KEY_CHARS
        ):
            raise _filter_error(
                f"invalid label key {label_key!r} at position {field_token.position}; a key is "
                f"1-{MAX_LABEL_KEY_LENGTH} characters of letters, digits, '_', '.', '-', '/'"
            )
        field = "labels"
    elif field not in ENUM_FIELDS and field not in TEXT_FIELDS and field != NAME_FIELD:
        raise _filter_error(
            f"unknown field {field!r} at position {field_token.position}; "
            f"allowed fields: {_ALLOWED_TEXT}"
        )
    if op_token.kind is not _Kind.OP:
        raise _filter_error(
            f"expected '=' or '!=' after {field_token.text!r} at position {op_token.position}, "
            f"found {op_token.text!r}"
        )
    if value_token.kind is _Kind.OP:
        raise _filter_error(
            f"expected a value at position {value_token.position}, found {value_token.text!r}"
        )
    value, prefix = _value_of(value_token, field_token.text)
    op = FilterOp(op_token.text)
    where = f"for {field_token.text} at position {value_token.position}"
    if len(value) > MAX_VALUE_LENGTH:
        raise _filter_error(f"value {where} is longer than {MAX_VALUE_LENGTH} characters")
    if prefix and field != NAME_FIELD:
        raise _filter_error(
            f"'*' {where}: prefix matching is supported on name only "
            "(write \\* inside a quoted value for a literal star)"
        )
    if field in ENUM_FIELDS:
        value = _enum_value(field, value, where)
    elif field == NAME_FIELD:
        value = _name_value(value, prefix, where)
    return FilterTerm(field=field, op=op, value=value, prefix=prefix, label_key=label_key)


def _value_of(token: _Token, field_text: str) -> tuple[str, bool]:
    """The value and whether it ends in a (prefix) wildcard; refuses `*` anywhere else."""
    value = token.text
    literal_stars = token.escaped_stars if token.kind is _Kind.STRING else frozenset()
    wildcard_stars = [i for i, char in enumerate(value) if char == "*" and i not in literal_stars]
    if not wildcard_stars:
        return value, False
    if wildcard_stars != [len(value) - 1]:
        raise _filter_error(
            f"'*' inside the value for {field_text} at position {token.position}: a wildcard is "
            "only allowed at the end of a name value (write \\* in a quoted value for a "
            "literal star)"
        )
    return value[:-1], True


def _enum_value(field: str, value: str, where: str) -> str:
    enum_type = ENUM_FIELDS[field]
    allowed = [member.value for member in enum_type]
    lowered = value.lower()
    if lowered not in allowed:
        raise _filter_error(
            f"{value!r} is not a valid value {where}; allowed values: {', '.join(allowed)}"
        )
    return lowered


def _name_value(value: str, prefix: bool, where: str) -> str:
    model_id = value.removeprefix(_MODELS_PREFIX)
    if prefix:
        valid = all(char in "abcdefghijklmnopqrstuvwxyz0123456789-" for char in model_id)
    else:
        valid = ID_PATTERN.fullmatch(model_id) is not None
    if not valid:
        raise _filter_error(
            f"{value!r} is not a model name {where}; expected models/{{id}} or an id (lower-case "
            "letters, digits and hyphens), optionally ending in * for a prefix match"
        )
    return model_id


def _filter_error(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("filter", description, reason="INVALID_FILTER")


# --- in-memory evaluation -----------------------------------------------------------------


def model_field_value(model: Model, field: str) -> str | None:
    """The value a filter field sees for `model` (None when the model has none).

    This is the single definition of which attribute a field names; the store denormalises
    the same values into indexed columns.
    """
    metadata = model.metadata
    if field == NAME_FIELD:
        return model.id
    if field == "state":
        return model.state.value
    if field == "source":
        return model.source.kind.value
    if metadata is None:
        return None
    if field == "format":
        return metadata.format.value
    if field == "model_type":
        return metadata.model_type.value
    if field == "architecture":
        return metadata.architecture
    if field == "family":
        return metadata.family
    if field == "quantization":
        return metadata.quantization
    raise ValueError(f"unknown filter field {field!r}")


def _ascii_fold(text: str) -> str:
    # SQLite's NOCASE folds ASCII letters only; do the same so both evaluations agree.
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _term_matches(term: FilterTerm, model: Model) -> bool:
    if term.field == "labels":
        assert term.label_key is not None
        actual = model.labels.get(term.label_key)
        equal = actual == term.value
    elif term.field == NAME_FIELD:
        equal = model.id.startswith(term.value) if term.prefix else model.id == term.value
    else:
        actual = model_field_value(model, term.field)
        if term.field in TEXT_FIELDS:
            if term.value == "":
                equal = actual is None or actual == ""
            else:
                equal = actual is not None and _ascii_fold(actual) == _ascii_fold(term.value)
        else:
            equal = actual == term.value
    return equal if term.op is FilterOp.EQ else not equal
