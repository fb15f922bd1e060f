"""The id of the RPC being handled, visible to every log record and function below the handler.

The error interceptor binds the id (from the client's `x-request-id` metadata, or a fresh one)
in a ContextVar for the duration of the call, so nothing has to pass it around explicitly.
This module knows nothing about grpc: metadata is a sequence of (key, value) pairs.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar, Token

REQUEST_ID_METADATA_KEY = "x-request-id"

# Ids end up in logs and response metadata: accept only short, plain tokens from clients so a
# caller cannot inject newlines, huge values or markup into our logs.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_request_id: ContextVar[str | None] = ContextVar("rbee_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the RPC being handled in this task, or None outside an RPC."""
    return _request_id.get()


def new_request_id() -> str:
    """A fresh random request id (32 lowercase hex characters)."""
    return uuid.uuid4().hex


def is_sane_request_id(value: str) -> bool:
    """True when `value` may be used as a request id as given (<= 64 of [A-Za-z0-9._-])."""
    return _SANE_REQUEST_ID.fullmatch(value) is not None


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's `x-request-id` when it is a sane token, else a new id."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_METADATA_KEY and isinstance(value, str):
            return value if is_sane_request_id(value) else new_request_id()
    return new_request_id()


def bind_request_id(request_id: str) -> Token[str | None]:
    """Make `request_id` current in this context; undo with `unbind_request_id(token)`."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    """Undo `bind_request_id`.

    An async generator handler may be finalised from another task (when the client went away
    and the generator is closed by the event loop's asyncgen hook); resetting the token there
    raises ValueError. That context dies with the RPC task anyway, so there is nothing to undo.
    """
    with contextlib.suppress(ValueError):
        _request_id.reset(token)
