"""The header readers under coverage-guided fuzzing (atheris), seeded with real headers.

Issue 7, "Bad input": the GGUF and safetensors readers, fuzzed on mutated real headers, never
crash, hang or allocate without bound. tests/unit/test_reader_fuzz.py does the same with
hypothesis' structured mutations; this lets libFuzzer's coverage feedback find the paths those
mutations miss. atheris ships wheels for Linux x86_64 (a dev dependency there); elsewhere the
test is skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.gguf_models import write_header_only_gguf, write_tiny_llama_gguf
from tests.fixtures.safetensors_models import sd1_tensors, write_header_only_safetensors

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.security]

pytest.importorskip("atheris")

RUNS = 3000
GGUF, SAFETENSORS = b"\x00", b"\x01"  # the harness's suffix byte (see tests.fuzz)


def _seeds(folder: Path) -> list[bytes]:
    tiny = write_tiny_llama_gguf(
        folder / "tiny.gguf", n_vocab=260, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=32
    )
    vocab = write_header_only_gguf(
        folder / "vocab.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_vocab=300, n_ff=256
    )
    family = {name: (dtype, (2,) * len(shape)) for name, (dtype, shape) in sd1_tensors().items()}
    sd1 = write_header_only_safetensors(folder / "sd1.safetensors", family, {"format": "pt"})
    # GGUF seeds cut to their header part: libFuzzer's inputs stay small and mutations land
    # where the reader looks.
    return [
        GGUF + tiny.read_bytes()[:16384],
        GGUF + vocab.read_bytes()[:16384],
        SAFETENSORS + sd1.read_bytes()[:65536],
    ]


def test_security_atheris_finds_no_crash_hang_or_runaway_allocation(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(_seeds(tmp_path)):
        (corpus / f"seed-{i}").write_bytes(seed)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_readers",
            f"-runs={RUNS}",
            "-timeout=10",  # seconds per input: a hang
            "-rss_limit_mb=1536",
            "-malloc_limit_mb=512",  # one allocation beyond this is a failure
            "-max_len=70000",
            "-seed=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    assert f"Done {RUNS} runs" in tail, tail
