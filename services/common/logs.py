"""Logging for service entry points: configured once, text or JSON, request ids on every record.

`configure_logging` installs one stderr handler on the root logger (calling it again replaces
that handler instead of adding a second one). A filter on the handler stamps every record with
`request_id` (the id of the RPC being handled, "-" outside one), whichever logger emitted it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from pydantic import BaseModel

from services.common.request_context import current_request_id
from services.common.settings import non_default_settings

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
NO_REQUEST_ID = "-"

# Marks the handler configure_logging installed, so a second call replaces exactly that one.
_OWNED_HANDLER_ATTR = "_rbee_configured"


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the current RPC's id, or "-" outside an RPC."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp the record; never drops it."""
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or NO_REQUEST_ID
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", NO_REQUEST_ID)
        if request_id != NO_REQUEST_ID:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str | int = "INFO", fmt: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger for a service process; idempotent. Returns the handler."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _OWNED_HANDLER_ATTR, False):
            root.removeHandler(existing)
            existing.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OWNED_HANDLER_ATTR, True)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def log_settings(logger: logging.Logger, settings: BaseModel) -> None:
    """Log the non-default settings in one line, secrets redacted (call once at startup)."""
    changed = non_default_settings(settings)
    if changed:
        rendered = ", ".join(f"{name}={value}" for name, value in sorted(changed.items()))
        logger.info("%s: %s", type(settings).__name__, rendered)
    else:
        logger.info("%s: all defaults", type(settings).__name__)
