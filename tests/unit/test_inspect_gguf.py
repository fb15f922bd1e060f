"""GGUF inspection on generated files: real tiny models, header-only giants, broken bytes."""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.catalog.domain import ModelFormat, ModelType
from services.catalog.inspect import InspectError, inspect_path
from services.catalog.inspect.gguf import (
    FTYPE_LABELS,
    VECTORIZED_MIN_STRINGS,
    quantization_label,
    read_gguf_header,
    skip_short_strings,
)
from services.common.errors import NotFound
from tests.fixtures.gguf_models import (
    CORRUPT_KINDS,
    LLAMA3_8B,
    LLAMA3_70B,
    GGMLType,
    pack_string,
    write_adapter_gguf,
    write_corrupt_gguf,
    write_header_only_gguf,
    write_mmproj_gguf,
    write_split_gguf,
    write_tiny_llama_gguf,
    write_truncated_gguf,
)

pytestmark = pytest.mark.unit

SMALL: dict[str, Any] = {
    "n_layer": 4,
    "n_embd": 256,
    "n_head": 4,
    "n_head_kv": 2,
    "n_vocab": 512,
    "n_ff": 512,
}


def test_tiny_llama_fields(tmp_path: pathlib.Path) -> None:
    path = write_tiny_llama_gguf(
        tmp_path / "tiny.gguf", n_vocab=300, n_embd=64, n_layer=3, n_head=4, n_head_kv=2,
        n_ff=96, n_ctx=128, chat_template="{{ messages }}",
    )  # fmt: skip
    meta = inspect_path(path)
    assert meta.format is ModelFormat.GGUF
    assert meta.model_type is ModelType.LLM
    assert meta.architecture == "llama"
    assert meta.name == "tiny-llama"
    assert meta.quantization == "F32" and meta.file_type == 0
    assert (meta.context_length, meta.block_count, meta.embedding_length) == (128, 3, 64)
    assert (meta.feed_forward_length, meta.head_count, meta.head_count_kv) == (96, 4, 2)
    assert (meta.key_length, meta.value_length) == (16, 16)  # n_embd / n_head default
    assert meta.vocab_size == 300
    assert meta.tokenizer_model == "llama"
    assert meta.has_chat_template is True
    # 3 layers * 2 kv heads * (16 + 16) * 2 bytes
    assert meta.kv_cache_bytes_per_token == 3 * 2 * 32 * 2
    head_dim_kv = 2 * 16
    per_layer = 2 * 64 + 64 * 64 * 2 + 2 * head_dim_kv * 64 + 3 * 96 * 64
    assert meta.parameter_count == 2 * 300 * 64 + 64 + 3 * per_layer
    assert meta.tensor_count == 3 + 3 * 9  # token_embd, output_norm, output; 9 per layer
    assert meta.dtypes == {"F32": meta.tensor_count}
    assert meta.size_bytes == path.stat().st_size
    assert meta.weights is not None
    assert meta.weights.input_bytes == 300 * 64 * 4
    assert meta.weights.output_bytes == 300 * 64 * 4 + 64 * 4
    assert meta.weights.layer_bytes == [per_layer * 4] * 3
    assert meta.weights.total_bytes == meta.parameter_count * 4
    assert meta.warnings == []


def test_f16_and_empty_template(tmp_path: pathlib.Path) -> None:
    meta = inspect_path(write_tiny_llama_gguf(tmp_path / "t.gguf", dtype="f16", chat_template=" "))
    assert meta.quantization == "F16"
    assert meta.has_chat_template is False
    assert meta.dtypes["F16"] > 0 and meta.dtypes["F32"] > 0


def test_llama3_8b_preset(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(tmp_path / "Meta-Llama-3-8B.Q4_K_M.gguf", **LLAMA3_8B)
    assert path.stat().st_size > 4_000_000_000  # sparse: the tensor data is a hole
    meta = inspect_path(path)
    assert meta.kv_cache_bytes_per_token == 131072  # 128 KiB, reference §3.7
    assert meta.parameter_count == 8_030_261_248
    assert meta.tensor_count == 291
    assert meta.quantization == "Q4_K_M" and meta.file_type == 15
    assert meta.vocab_size == 128_256
    assert meta.weights is not None and len(meta.weights.layer_bytes) == 32
    assert meta.size_bytes == path.stat().st_size


def test_realistic_70b_tokenizer_arrays_are_counted(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(
        tmp_path / "70b.gguf", **LLAMA3_70B, vocab_arrays=True, n_merges=20_000,
        tensor_type=GGMLType.Q2_K, file_type=10,
    )  # fmt: skip
    meta = inspect_path(path)
    assert meta.vocab_size == 128_256
    assert meta.tensor_count == 723
    assert meta.block_count == 80
    assert meta.tokenizer_model == "gpt2"
    assert meta.quantization == "Q2_K"


def test_per_layer_head_count_kv(tmp_path: pathlib.Path) -> None:
    kv = [8, 0, 8, 4]  # hybrid model: layer 1 has no attention
    path = write_header_only_gguf(tmp_path / "hybrid.gguf", **{**SMALL, "n_head_kv": kv})
    meta = inspect_path(path)
    assert meta.head_count_kv == 8
    head_dim = 256 // 4
    assert meta.kv_cache_bytes_per_token == sum(kv) * (head_dim * 2) * 2


def test_explicit_key_value_lengths(tmp_path: pathlib.Path) -> None:
    extra = {"llama.attention.key_length": 128, "llama.attention.value_length": 96}
    meta = inspect_path(write_header_only_gguf(tmp_path / "kv.gguf", **SMALL, extra_kv=extra))
    assert (meta.key_length, meta.value_length) == (128, 96)
    assert meta.kv_cache_bytes_per_token == 4 * 2 * (128 + 96) * 2


def test_hints_and_extra_fields_are_bounded(tmp_path: pathlib.Path) -> None:
    extra = {
        "general.basename": "Llama-3",
        "general.size_label": "8B",
        "general.license": "x" * 1000,
        "general.finetune": "Instruct",
        "llama.expert_count": 8,
        "llama.expert_used_count": 2,
        "llama.attention.sliding_window": 4096,
    }
    meta = inspect_path(write_header_only_gguf(tmp_path / "h.gguf", **SMALL, extra_kv=extra))
    assert meta.hints["general.basename"] == "Llama-3"
    assert meta.hints["general.size_label"] == "8B"
    assert meta.hints["general.finetune"] == "Instruct"
    assert meta.hints["general.license"] == "x" * 256
    assert (meta.expert_count, meta.expert_used_count, meta.sliding_window) == (8, 2, 4096)


@pytest.mark.parametrize(("ftype", "label"), sorted(FTYPE_LABELS.items()))
def test_quantization_label_table(ftype: int, label: str) -> None:
    assert quantization_label(ftype) == (label, [])


def test_quantization_label_guessed_unknown_removed() -> None:
    label, warnings = quantization_label(15 | 1024)
    assert label == "Q4_K_M" and "GUESSED" in warnings[0]
    assert quantization_label(999)[0] == "unknown"
    label, warnings = quantization_label(4)
    assert label == "unknown" and "removed" in warnings[0]


def test_quantization_from_file_type_in_file(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(tmp_path / "m.gguf", **SMALL, file_type=7, tensor_type=8)
    meta = inspect_path(path)
    assert meta.quantization == "Q8_0" and meta.file_type == 7
    assert meta.dtypes == {"Q8_0": 4 * 7 + 2, "F32": 4 * 2 + 1}


def test_quantization_inferred_without_file_type(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(
        tmp_path / "model.gguf", **SMALL, file_type=None, tensor_type=GGMLType.Q4_K,
        output_type=GGMLType.Q6_K,
    )  # fmt: skip
    meta = inspect_path(path)
    assert meta.file_type is None
    assert meta.quantization == "Q4_K"  # not a guessed _S/_M/_L mix
    assert any("inferred" in w for w in meta.warnings)


def test_quantization_inferred_refined_by_file_name(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(
        tmp_path / "llama-Q4_K_M.gguf", **SMALL, file_type=None, tensor_type=GGMLType.Q4_K
    )
    assert inspect_path(path).quantization == "Q4_K_M"
    # a file name that contradicts the tensors is ignored
    path = write_header_only_gguf(
        tmp_path / "llama-Q8_0.gguf", **SMALL, file_type=None, tensor_type=GGMLType.Q5_K
    )
    assert inspect_path(path).quantization == "Q5_K"


def test_adapter_and_projector(tmp_path: pathlib.Path) -> None:
    adapter = inspect_path(write_adapter_gguf(tmp_path / "lora.gguf"))
    assert adapter.model_type is ModelType.ADAPTER
    assert adapter.hints["adapter.type"] == "lora"
    assert adapter.kv_cache_bytes_per_token is None
    mmproj = inspect_path(write_mmproj_gguf(tmp_path / "mmproj.gguf"))
    assert mmproj.model_type is ModelType.PROJECTOR
    assert mmproj.architecture == "clip"
    assert mmproj.quantization == "F16"


def test_split_all_shards(tmp_path: pathlib.Path) -> None:
    shards = write_split_gguf(tmp_path, "model", 3)
    whole = inspect_path(write_header_only_gguf(tmp_path / "whole.gguf", **SMALL))
    meta = inspect_path(shards[0])
    assert meta.split is not None
    assert (meta.split.index, meta.split.count, meta.split.files_found) == (1, 3, 3)
    assert meta.split.tensors_total == whole.tensor_count == meta.tensor_count
    assert meta.parameter_count == whole.parameter_count
    assert meta.size_bytes == sum(p.stat().st_size for p in shards)
    assert meta.weights is not None and whole.weights is not None
    assert meta.weights.total_bytes == whole.weights.total_bytes
    assert meta.architecture == "llama" and meta.block_count == 4
    assert not any("missing" in w for w in meta.warnings)
    # inspecting a later shard finds shard 1 and reports the same model
    later = inspect_path(shards[2])
    assert later.split is not None and later.split.index == 3
    assert later.parameter_count == whole.parameter_count
    assert later.architecture == "llama"


def test_split_missing_shard(tmp_path: pathlib.Path) -> None:
    shards = write_split_gguf(tmp_path, "model", 3)
    shards[1].unlink()
    meta = inspect_path(shards[0])
    assert meta.split is not None
    assert meta.split.files_found == 2 < meta.split.count
    assert any("missing" in w for w in meta.warnings)
    assert meta.tensor_count is not None and meta.tensor_count < (meta.split.tensors_total or 0)


def test_missing_path_is_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(NotFound) as info:
        inspect_path(tmp_path / "nope.gguf")
    assert info.value.reason == "FILE_NOT_FOUND"
    assert info.value.resource_type == "file"


def test_truncated_tensor_data(tmp_path: pathlib.Path) -> None:
    path = write_truncated_gguf(tmp_path / "cut.gguf", cut_bytes=100)
    with pytest.raises(InspectError) as info:
        inspect_path(path)
    assert info.value.reason == "MODEL_FILE_INVALID"
    full = path.stat().st_size + 100
    assert str(full) in info.value.message and str(full - 100) in info.value.message


@pytest.mark.parametrize("kind", sorted(CORRUPT_KINDS))
def test_corrupt_headers_fail_fast(tmp_path: pathlib.Path, kind: str) -> None:
    path = write_corrupt_gguf(tmp_path / f"{kind}.gguf", kind)
    start = time.perf_counter()
    with pytest.raises(InspectError) as info:
        inspect_path(path)
    assert time.perf_counter() - start < 1.0
    assert info.value.reason == "MODEL_FILE_INVALID"


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("bad_magic", "not a GGUF"),
        ("version_1", "version 1"),
        ("big_endian", "big-endian"),
        ("version_99", "unsupported GGUF version 99"),
        ("huge_kv_count", "KV count"),
        ("huge_tensor_count", "tensor count"),
        ("huge_string_value", "string length"),
        ("huge_string_array", "array of"),
        ("deep_nesting", "nested"),
        ("unaligned_tensor_offset", "aligned"),
    ],
)
def test_corrupt_header_messages(tmp_path: pathlib.Path, kind: str, words: str) -> None:
    with pytest.raises(InspectError, match=words):
        inspect_path(write_corrupt_gguf(tmp_path / f"{kind}.gguf", kind))


def test_huge_sparse_file_with_absurd_array_fails_fast(tmp_path: pathlib.Path) -> None:
    """A 4M-element string array inside a sparse 1 TB file: bounded by the caps, not the size."""
    path = write_corrupt_gguf(tmp_path / "a.gguf", "array_string_lengths_overflow")
    with path.open("r+b") as f:
        f.truncate(1 << 40)
    start = time.perf_counter()
    with pytest.raises(InspectError):
        inspect_path(path)
    assert time.perf_counter() - start < 1.0


def test_reader_never_reads_tensor_data(tmp_path: pathlib.Path) -> None:
    path = write_header_only_gguf(tmp_path / "big.gguf", **LLAMA3_8B)
    header = read_gguf_header(path)
    assert header.data_offset < 1_000_000 < header.file_size
    assert header.tensors[0].shape == (4096, 128_256)  # ne[] innermost first


def _valid_small_file() -> tuple[bytes, int]:
    """A valid tiny model and its header length (data offset)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_llama_gguf(
            pathlib.Path(d) / "t.gguf", n_vocab=260, n_embd=32, n_layer=1, n_head=2,
            n_head_kv=1, n_ff=32, chat_template="{{ x }}",
        )  # fmt: skip
        return path.read_bytes(), read_gguf_header(path).data_offset


_FILE, _HEADER_LEN = _valid_small_file()


@settings(
    max_examples=150,
    deadline=1000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, _HEADER_LEN - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.one_of(st.none(), st.integers(0, len(_FILE))),
)
def test_mutated_headers_only_raise_inspect_errors(
    tmp_path: pathlib.Path, mutations: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_FILE)
    for pos, value in mutations:
        data[pos] = value
    path = tmp_path / "mutant.gguf"
    path.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    start = time.perf_counter()
    # Anything but these two escaping (struct.error, IndexError, MemoryError...) fails.
    with contextlib.suppress(InspectError, NotFound):
        inspect_path(path)
    assert time.perf_counter() - start < 1.0


# --- the vectorized string walk ----------------------------------------------------------------


def walk_strings(buf: bytes, off: int, count: int) -> int | None:
    """The plain definition: `count` times, a u64 length then that many bytes (None past the
    end)."""
    for _ in range(count):
        if off + 8 > len(buf):
            return None
        off += 8 + int.from_bytes(buf[off : off + 8], "little")
        if off > len(buf):
            return None
    return off


def packed(strings: list[bytes]) -> bytes:
    return b"".join(pack_string(s) for s in strings)


def test_vectorized_walk_lands_where_the_lengths_say() -> None:
    strings = [f"\u0120tok{i}".encode() for i in range(20_000)] + ["\u00e9".encode() * 120]
    data = b"HEAD" + packed(strings) + packed([b"after"]) + bytes(3)
    assert skip_short_strings(data, 4, len(strings), len(data)) == walk_strings(
        data, 4, len(strings)
    )


@pytest.mark.parametrize(
    ("odd", "declined"),
    [(b"", True), (b"x" * 256, True), (bytes(7) + b"z", True), (b"nul\x00inside", False)],
    ids=["empty", "256-bytes", "zeros", "one-nul"],
)
def test_vectorized_walk_declines_what_it_cannot_vouch_for(odd: bytes, declined: bool) -> None:
    strings = [b"ab"] * 100 + [odd] + [b"cd"] * 100
    data = packed(strings) + b"tail"
    expected = walk_strings(data, 0, len(strings))
    assert expected == len(data) - 4
    # Declined (the loop's job, then), or right: a lone NUL leaves no seven zero bytes.
    assert skip_short_strings(data, 0, len(strings), len(data)) == (None if declined else expected)


def test_vectorized_walk_declines_an_array_longer_than_the_buffer() -> None:
    data = packed([b"ab"] * 10)
    assert skip_short_strings(data, 0, 11, len(data)) is None
    assert skip_short_strings(data, 0, 0, len(data)) == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strings=st.lists(st.binary(max_size=300), max_size=40),
    trailer=st.binary(max_size=64),
    extra=st.integers(min_value=0, max_value=3),
)
def test_vectorized_walk_is_never_wrong(strings: list[bytes], trailer: bytes, extra: int) -> None:
    data = packed(strings) + trailer
    count = len(strings) + extra  # some claim more strings than there are
    got = skip_short_strings(data, 0, count, len(data))
    assert got is None or got == walk_strings(data, 0, count)


def test_the_parser_falls_back_when_the_fast_walk_declines(tmp_path: pathlib.Path) -> None:
    # An array big enough for the vectorized walk, with empty strings it declines.
    strings = [""] * 3000 + ["x" * 300] * 1200 + ["ok"] * 1000
    assert len(strings) >= VECTORIZED_MIN_STRINGS
    odd = write_header_only_gguf(
        tmp_path / "odd-strings.gguf", **LLAMA3_70B, extra_kv={"rbee.test.strings": strings}
    )
    meta = inspect_path(odd)
    assert meta.tensor_count == 723 and meta.block_count == 80  # parsed past the array
