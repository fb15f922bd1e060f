"""The GGUF and safetensors header readers, fuzzed with hypothesis on mutated real headers.

Issue 7, "Bad input": no crash (only the documented `InspectError`, or `NotFound` for a split
GGUF whose shards are missing, comes out), no hang (bounded time per example) and no allocation
beyond a fixed bound (tracemalloc peak). The seeds are real files from the fixtures: a tiny llama
GGUF that llama.cpp runs, a header-only GGUF with tokenizer arrays, and safetensors files with
real key names and metadata. Mutations: byte overwrites, insertions, deletions, u32/u64 fields
overwritten with boundary values (counts and lengths), truncation and extension.

Coverage-guided fuzzing with atheris runs beside this: tests/integration/test_reader_atheris.py.

Run issue 7's tests alone with `-m security`.
"""

from __future__ import annotations

import pathlib
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.catalog.inspect import InspectError, inspect_path
from services.catalog.inspect.gguf import read_gguf_header
from services.catalog.inspect.safetensors import MAX_HEADER_BYTES, read_safetensors_header
from services.common.errors import NotFound
from tests.fixtures.gguf_models import write_header_only_gguf, write_tiny_llama_gguf
from tests.fixtures.safetensors_models import sd1_tensors, write_header_only_safetensors

pytestmark = [pytest.mark.unit, pytest.mark.slow, pytest.mark.security]

# Per example; the readers take milliseconds on these files, the slack is for a loaded machine.
MAX_SECONDS = 2.0
# The seeds are small, so no mutant can honestly ask for more than this.
MAX_PEAK_BYTES = 64 * 1024 * 1024
MAX_EXAMPLES = 200

ALLOWED = (InspectError, NotFound)

# Values that make counts, lengths and offsets lie: zero, one, sign bits, all ones.
BOUNDARY_U64 = (0, 1, 2, 7, 8, 255, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                2**63, 2**64 - 1)  # fmt: skip
BOUNDARY_U32 = tuple(v for v in BOUNDARY_U64 if v < 2**32)


def _gguf_seeds() -> dict[str, bytes]:
    # Mutations land in the header part of a seed (see `header_span`), not in tensor data.
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        tiny = write_tiny_llama_gguf(
            root / "tiny.gguf", n_vocab=260, n_embd=32, n_layer=1, n_head=2, n_head_kv=1,
            n_ff=32, chat_template="{{ messages }}",
        )  # fmt: skip
        header_only = write_header_only_gguf(
            root / "vocab.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_vocab=300,
            n_ff=256, vocab_arrays=True, n_merges=40, chat_template="{% for m in x %}{% endfor %}",
        )  # fmt: skip
        return {"tiny": tiny.read_bytes(), "vocab": header_only.read_bytes()}


def _safetensors_seeds() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        small = write_header_only_safetensors(
            root / "small.safetensors",
            {"a.weight": ("F32", (2, 3)), "b.bias": ("F16", (4,)), "c": ("I64", (1, 1, 2))},
            {"format": "pt", "modelspec.architecture": "stable-diffusion-v1"},
        )
        # Real SD1 key names with tiny shapes: the family rules run, the file stays small.
        family = {
            name: (dtype, (2,) * len(shape)) for name, (dtype, shape) in sd1_tensors().items()
        }
        sd1 = write_header_only_safetensors(root / "sd1.safetensors", family, {"ss_network": "x"})
        return {"small": small.read_bytes(), "sd1": sd1.read_bytes()}


GGUF_SEEDS = _gguf_seeds()
SAFETENSORS_SEEDS = _safetensors_seeds()


def header_span(data: bytes) -> int:
    """How many leading bytes of a seed are header (metadata, tensor infos): where to mutate."""
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "seed"
        path.write_bytes(data)
        if data[:4] == b"GGUF":
            return read_gguf_header(path).data_offset
        return 8 + read_safetensors_header(path).header_length


HEADER_SPANS = {
    name: header_span(data) for name, data in {**GGUF_SEEDS, **SAFETENSORS_SEEDS}.items()
}


def _mutation() -> st.SearchStrategy[tuple[object, ...]]:
    position = st.integers(0, 1 << 20)  # taken modulo the current length
    return st.one_of(
        st.tuples(st.just("byte"), position, st.integers(0, 255)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
        st.tuples(st.just("u64"), position, st.sampled_from(BOUNDARY_U64)),
        st.tuples(st.just("u32"), position, st.sampled_from(BOUNDARY_U32)),
    )


def apply_mutations(seed: str, mutations: list[tuple[object, ...]], end: int | None,
                    tail: bytes) -> bytes:  # fmt: skip
    """Seed `seed` with each mutation applied in turn (within its header span), then cut at
    `end` and `tail` appended."""
    data = bytearray({**GGUF_SEEDS, **SAFETENSORS_SEEDS}[seed])
    span = HEADER_SPANS[seed]
    for op, raw_position, arg in mutations:
        position = int(raw_position) % max(min(len(data), span), 1)  # type: ignore[call-overload]
        if op == "byte" and data:
            data[position] = int(arg)  # type: ignore[call-overload]
        elif op == "insert":
            data[position:position] = bytes(arg)  # type: ignore[call-overload]
        elif op == "delete":
            del data[position : position + int(arg)]  # type: ignore[call-overload]
        elif op == "u64":
            data[position : position + 8] = struct.pack("<Q", int(arg))  # type: ignore[call-overload]
        elif op == "u32":
            data[position : position + 4] = struct.pack("<I", int(arg))  # type: ignore[call-overload]
    if end is not None:
        del data[end:]
    return bytes(data) + tail


def run_bounded(read: Callable[[pathlib.Path], object], path: pathlib.Path) -> None:
    """Call `read(path)`: only ALLOWED errors, within MAX_SECONDS and MAX_PEAK_BYTES."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        read(path)
    except ALLOWED:
        pass
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < MAX_SECONDS, f"{read.__name__} took {elapsed:.2f} s"
    assert peak < MAX_PEAK_BYTES, f"{read.__name__} allocated {peak} bytes at peak"


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _mutants(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        apply_mutations,
        st.sampled_from(sorted(seeds)),
        st.lists(_mutation(), min_size=1, max_size=6),
        st.one_of(st.none(), st.integers(0, max(len(s) for s in seeds.values()))),
        st.one_of(st.just(b""), st.binary(max_size=32), st.just(b"\x00" * 4096)),
    )


@FUZZ_SETTINGS
@given(data=_mutants(GGUF_SEEDS))
def test_security_mutated_gguf_headers(tmp_path: pathlib.Path, data: bytes) -> None:
    path = tmp_path / "mutant.gguf"
    path.write_bytes(data)
    run_bounded(read_gguf_header, path)
    run_bounded(inspect_path, path)


@FUZZ_SETTINGS
@given(data=_mutants(SAFETENSORS_SEEDS))
def test_security_mutated_safetensors_headers(tmp_path: pathlib.Path, data: bytes) -> None:
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(data)
    run_bounded(read_safetensors_header, path)
    run_bounded(inspect_path, path)


@FUZZ_SETTINGS
@given(data=_mutants({**GGUF_SEEDS, **SAFETENSORS_SEEDS}))
def test_security_mutants_without_a_telling_suffix(tmp_path: pathlib.Path, data: bytes) -> None:
    """No suffix: inspect_path chooses the reader from the first bytes alone."""
    path = tmp_path / "mutant.bin"
    path.write_bytes(data)
    run_bounded(inspect_path, path)


def test_security_the_seeds_are_valid_models(tmp_path: pathlib.Path) -> None:
    """Unmutated, every seed reads: the fuzzing starts from real headers, not from garbage."""
    for name, data in {**GGUF_SEEDS, **SAFETENSORS_SEEDS}.items():
        suffix = ".gguf" if name in GGUF_SEEDS else ".safetensors"
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        assert inspect_path(path).format is not None
        assert 0 < HEADER_SPANS[name] <= len(data)


def test_security_safetensors_header_at_the_documented_limit_stays_bounded(
    tmp_path: pathlib.Path,
) -> None:
    """A sparse file whose header length is the largest allowed (100 MB of zeros): refused,
    and the memory it costs is bounded by that documented limit, not by the file's size."""
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES))
        f.truncate(8 + MAX_HEADER_BYTES + (1 << 30))
    tracemalloc.start()
    try:
        with pytest.raises(InspectError):
            read_safetensors_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The raw bytes plus their decoded text: twice the limit, plus slack.
    assert peak < 2 * MAX_HEADER_BYTES + 16 * 1024 * 1024
    with path.open("r+b") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    with pytest.raises(InspectError, match="limit"):
        read_safetensors_header(path)
