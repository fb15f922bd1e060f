"""Coverage-guided fuzzing (atheris / libFuzzer) of the model header readers.

Each input is a candidate model file: the first byte picks the suffix it is saved under
(.gguf, .safetensors, or none: sniffed), the rest is the file. The catalog's `inspect_path` may
refuse it only with the documented errors (InspectError, or NotFound for a split GGUF's missing
shards); anything else is a crash that libFuzzer reports with the input that caused it. Hangs
and allocations are bounded by libFuzzer's -timeout, -rss_limit_mb and -malloc_limit_mb.

    python -m tests.fuzz.atheris_readers -runs=5000 -timeout=5 CORPUS_DIR

tests/integration/test_reader_atheris.py runs it on seeds made from the test fixtures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from services.catalog.inspect import InspectError, inspect_path
    from services.common.errors import NotFound

SUFFIXES = (".gguf", ".safetensors", "")
_DIR = Path(tempfile.mkdtemp(prefix="rbee-atheris-"))


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: one candidate file."""
    if not data:
        return
    suffix = SUFFIXES[data[0] % len(SUFFIXES)]
    path = _DIR / f"input{suffix}"
    path.write_bytes(data[1:])
    try:
        inspect_path(path)
    except (InspectError, NotFound):
        pass
    finally:
        # Split GGUFs name sibling shards; none exist, and nothing else is left behind.
        for leftover in _DIR.iterdir():
            leftover.unlink()


def main() -> None:
    os.environ.setdefault("RBEE_LOG_LEVEL", "ERROR")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
