"""Page sizes and signed page tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from services.catalog.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    normalize_page_size,
    page_in_memory,
)
from services.common.errors import InvalidArgument

pytestmark = pytest.mark.unit

_SECRET = b"s" * 32
_FINGERPRINT = filter_fingerprint("models", "", "id")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(payload: dict[str, object], secret: bytes = _SECRET) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    mac = hmac.new(secret, raw, hashlib.sha256).digest()[:16]
    return f"{_b64(raw)}.{_b64(mac)}"


@pytest.mark.parametrize(
    ("requested", "used"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (999, 999), (MAX_PAGE_SIZE, 1000), (5000, 1000)],
)
def test_page_size_default_and_clamp(requested: int, used: int) -> None:
    assert normalize_page_size(requested) == used


def test_negative_page_size_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalize_page_size(-1)
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert caught.value.field_violations[0].field == "page_size"


def test_token_round_trip_and_empty_token() -> None:
    codec = PageTokenCodec(_SECRET)
    token = codec.encode("llama-2-7b", _FINGERPRINT)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert codec.decode(token, _FINGERPRINT) == "llama-2-7b"
    assert codec.decode("", _FINGERPRINT) is None
    # The helper above builds the same format, so the test knows what it checks.
    assert _signed({"v": 1, "k": "llama-2-7b", "f": _FINGERPRINT}) == token


def test_fingerprint_separates_collection_filter_and_order() -> None:
    fingerprints = {
        filter_fingerprint("models", "", "id"),
        filter_fingerprint("installs", "", "id"),
        filter_fingerprint("models", "x", "id"),
        filter_fingerprint("models", "", "created_at"),
    }
    assert len(fingerprints) == 4


def _refused(codec: PageTokenCodec, token: str, fingerprint: str = _FINGERPRINT) -> str:
    with pytest.raises(InvalidArgument) as caught:
        codec.decode(token, fingerprint)
    error = caught.value
    assert error.reason == "INVALID_PAGE_TOKEN"
    assert [violation.field for violation in error.field_violations] == ["page_token"]
    return error.message


def test_token_for_another_filter_is_refused() -> None:
    codec = PageTokenCodec(_SECRET)
    token = codec.encode("a", filter_fingerprint("models", "format=gguf", "id"))
    assert "different filter" in _refused(codec, token)


def test_token_signed_with_another_secret_is_refused() -> None:
    token = PageTokenCodec(b"o" * 32).encode("a", _FINGERPRINT)
    assert "not valid" in _refused(PageTokenCodec(_SECRET), token)


def test_forged_key_is_refused() -> None:
    codec = PageTokenCodec(_SECRET)
    genuine = codec.encode("a", _FINGERPRINT)
    mac = genuine.split(".")[1]
    forged_payload = json.dumps({"v": 1, "k": "zzz", "f": _FINGERPRINT}, separators=(",", ":"))
    _refused(codec, f"{_b64(forged_payload.encode())}.{mac}")


def test_other_version_is_refused_even_when_signed() -> None:
    codec = PageTokenCodec(_SECRET)
    assert "another version" in _refused(codec, _signed({"v": 2, "k": "a", "f": _FINGERPRINT}))
    assert "different filter" in _refused(codec, _signed({"v": 1, "k": 5, "f": _FINGERPRINT}))


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        ".",
        "!!!.???",
        "é.é",
        "x" * 5000,
        "AAAA.AAAA",
        "eyJ2IjoxfQ",
        "eyJ2IjoxfQ.",
    ],
)
def test_garbage_tokens_are_refused(token: str) -> None:
    _refused(PageTokenCodec(_SECRET), token)


def test_tampering_with_any_character_is_detected() -> None:
    codec = PageTokenCodec(_SECRET)
    token = codec.encode("some-model-id", _FINGERPRINT)
    for index in range(len(token)):
        if token[index] == ".":
            continue
        replacement = "A" if token[index] != "A" else "B"
        tampered = token[:index] + replacement + token[index + 1 :]
        with pytest.raises(InvalidArgument):
            codec.decode(tampered, _FINGERPRINT)


def test_short_secret_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PageTokenCodec(b"short")


def test_page_in_memory_walks_every_item_once_with_both_key_kinds() -> None:
    codec = PageTokenCodec(new_secret())
    newest_first = sorted(
        [(-float(t), f"id-{i}") for i, t in enumerate((5, 3, 3, 1, 9, 7))], key=lambda k: k
    )  # (-time, id): newest first, the id breaking ties
    for items, key in (
        (newest_first, lambda k: k),
        (sorted(f"w{i:02d}" for i in range(7)), lambda k: k),
    ):
        seen: list[object] = []
        token = ""
        while True:
            page, token = page_in_memory(
                items, key=key, codec=codec, fingerprint="f", page_size=2, page_token=token
            )
            seen.extend(page)
            if not token:
                break
        assert seen == list(items)
    with pytest.raises(InvalidArgument):
        page_in_memory(
            newest_first,
            key=lambda k: k,
            codec=codec,
            fingerprint="other",
            page_size=2,
            page_token=page_in_memory(
                newest_first,
                key=lambda k: k,
                codec=codec,
                fingerprint="f",
                page_size=2,
                page_token="",
            )[1],
        )
