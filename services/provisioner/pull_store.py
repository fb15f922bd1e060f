"""Pull records on disk: one JSON file per pull under RBEE_HOME/provisioner/pulls/.

Each write is atomic (temp file, fsync, rename, directory fsync), so a kill -9 leaves either the
old record or the new one, never half of one. The records are what lets a pull interrupted by a
crash come back PAUSED (and resume from its partial files) when the provisioner restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from services.catalog.domain import ID_PATTERN
from services.provisioner.domain import PullRecord

logger = logging.getLogger(__name__)


class PullStore:
    """Reads and writes pull records; the directory is created on first use."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, pull_id: str) -> Path:
        # Ids are validated slugs (never raw source strings), so joining them is safe.
        if not ID_PATTERN.fullmatch(pull_id):
            raise ValueError(f"not a pull id: {pull_id!r}")
        return self._dir / f"{pull_id}.json"

    def load_all(self) -> list[PullRecord]:
        """Every readable record; unreadable files are logged and skipped, never fatal."""
        if not self._dir.is_dir():
            return []
        records: list[PullRecord] = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                records.append(PullRecord.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError, ValueError) as exc:
                logger.warning("skipping unreadable pull record %s: %s", path.name, exc)
        return records

    def save(self, record: PullRecord) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        target = self._path(record.id)
        data = record.model_dump_json(indent=1).encode("utf-8")
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".{record.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # Owner-only: a URL source as given may carry a signed query.
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self._dir)

    def delete(self, pull_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(pull_id).unlink()
        _fsync_dir(self._dir)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
