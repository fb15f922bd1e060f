"""Page sizes and opaque, signed page tokens for List methods (AIP-158).

A token is `base64url(payload) "." base64url(mac)` without padding, where `payload` is compact
JSON `{"v": version, "k": last key, "f": filter fingerprint}` and `mac` is HMAC-SHA256 over the
payload with a per-store random secret (kept in the database, so tokens survive a restart).
Clients cannot forge keys, and a token minted for one filter (or collection, or order) is
refused for another: both fail with INVALID_PAGE_TOKEN on the `page_token` field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
TOKEN_VERSION = 1
SECRET_BYTES = 32
# Real tokens are ~150 characters; anything much longer is not ours.
MAX_TOKEN_LENGTH = 1024
_MAC_BYTES = 16  # a truncated HMAC-SHA256 is plenty against forgery by guessing
_FINGERPRINT_HEX = 32


def new_secret() -> bytes:
    """A fresh random signing secret for a store."""
    return secrets.token_bytes(SECRET_BYTES)


def normalize_page_size(page_size: int) -> int:
    """0 means the default (50); larger than 1000 is clamped; negative is INVALID_ARGUMENT."""
    if page_size < 0:
        raise InvalidArgument.for_field("page_size", f"must not be negative, got {page_size}")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def filter_fingerprint(collection: str, normalized_filter: str, order_by: str) -> str:
    """sha256 over what selects and orders a listing; a token is only valid for its own."""
    material = json.dumps([collection, normalized_filter, order_by], separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:_FINGERPRINT_HEX]


class PageTokenCodec:
    """Mints and checks page tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("page token secret must be at least 16 bytes")
        self._secret = secret

    def encode(self, last_key: str, fingerprint: str) -> str:
        """A token that resumes a listing after `last_key` for the listing `fingerprint`."""
        payload = json.dumps(
            {"v": TOKEN_VERSION, "k": last_key, "f": fingerprint},
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode("ascii")
        return f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"

    def decode(self, token: str, fingerprint: str) -> str | None:
        """The last key in `token`, or None for an empty token (the first page).

        Raises InvalidArgument (INVALID_PAGE_TOKEN, field `page_token`) for garbage, a forged
        or altered token, another version, or a token minted for another listing.
        """
        if token == "":
            return None
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
            raise _token_error("page_token is malformed; pass the next_page_token you received")
        payload_text, mac_text = token.split(".")
        try:
            payload = _b64decode(payload_text)
            mac = _b64decode(mac_text)
        except (binascii.Error, ValueError):
            raise _token_error(
                "page_token is malformed; pass the next_page_token you received"
            ) from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise _token_error("page_token is not valid for this server; start from the first page")
        try:
            data = json.loads(payload)
        except ValueError:  # a signed payload is ours, so this means a bug, not a client error
            raise _token_error("page_token is malformed; start from the first page") from None
        if not isinstance(data, dict) or data.get("v") != TOKEN_VERSION:
            raise _token_error("page_token is from another version; start from the first page")
        last_key = data.get("k")
        if data.get("f") != fingerprint or not isinstance(last_key, str):
            raise _token_error(
                "page_token was issued for a different filter or order; repeat the request "
                "with the same filter, or start from the first page"
            )
        return last_key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    padded = text + "=" * (-len(text) % 4)
    data = base64.b64decode(padded, altchars=b"-_", validate=True)
    # Only the canonical spelling is ours: unused low bits in the last character must be zero,
    # so a token has exactly one valid form.
    if _b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _token_error(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("page_token", description, reason="INVALID_PAGE_TOKEN")


OrderKey = str | tuple[float, str]
_Item = TypeVar("_Item")


def page_in_memory(
    items: Sequence[_Item],
    *,
    key: Callable[[_Item], OrderKey],
    codec: PageTokenCodec,
    fingerprint: str,
    page_size: int,
    page_token: str,
) -> tuple[list[_Item], str]:
    """One page of `items` (already sorted by `key`, ascending) after `page_token`, and the
    token of the next page ("" on the last). For the small collections a service keeps in
    memory (pulls, jobs, workers, recipes, preloads); the key travels as JSON in the token."""
    size = normalize_page_size(page_size)
    after_text = codec.decode(page_token, fingerprint)
    rest = list(items)
    if after_text is not None:
        after = _order_key_from_text(after_text)
        rest = [item for item in rest if _comparable(key(item)) > after]
    page = rest[:size]
    token = codec.encode(json.dumps(key(page[-1])), fingerprint) if len(rest) > size else ""
    return page, token


def _comparable(value: OrderKey) -> tuple[Any, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _order_key_from_text(text: str) -> tuple[Any, ...]:
    try:
        value = json.loads(text)
    except ValueError:  # signed by us, so a bug rather than a client error; still refused
        raise _token_error("page_token is malformed; start from the first page") from None
    return (value,) if isinstance(value, str) else tuple(value)
