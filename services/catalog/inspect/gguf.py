"""GGUF header reader: metadata and tensor infos, never tensor data.

Layout (little-endian; reference §3.1): magic "GGUF", u32 version, u64 tensor_count,
u64 kv_count, the KV pairs, the tensor infos, padding to `general.alignment`, tensor data.

The reader maps at most `MAX_HEADER_BYTES` of the file and walks it with
`struct.unpack_from`. Every count and length read from the file is checked against the bytes
that remain (and against the caps below) BEFORE anything is allocated or looped over, so a
header that claims 2^60 entries fails at once with `InspectError`. Arrays the catalog does not
need (tokens, merges, scores, token types) are skipped by a tight loop over the string lengths,
keeping only their element counts.
"""

from __future__ import annotations

import mmap
import pathlib
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from services.catalog.domain import (
    ModelFormat,
    ModelMetadata,
    ModelType,
    SplitInfo,
    WeightsBreakdown,
)
from services.catalog.inspect import MODEL_FILE_INVALID, InspectError

# --- bounds (documented: a file claiming more is rejected as MODEL_FILE_INVALID) -------------
# KV section + tensor infos. Real headers are below ~30 MB (the largest tokenizers).
MAX_HEADER_BYTES = 128 * 1024 * 1024
MAX_KV_COUNT = 65_536
MAX_TENSOR_COUNT = 1_048_576
MAX_KEY_BYTES = 65_535  # the GGUF spec caps keys at 2^16 - 1 bytes
MAX_STRING_BYTES = 64 * 1024 * 1024  # one string value (chat templates are the long ones)
MAX_ARRAY_ELEMENTS = 4 * 1024 * 1024  # largest real arrays: ~262k tokens, ~500k merges
MAX_ARRAY_DEPTH = 3  # arrays of arrays of arrays
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_LAYERS = 65_536  # block_count / blk.N indices above this are not plausible
MAX_SPLIT_COUNT = 1_024
# Values kept in memory: strings are truncated to this many bytes, numeric arrays longer than
# MAX_KEPT_ARRAY are skipped (only their counts kept).
MAX_KEPT_STRING_BYTES = 65_536
MAX_KEPT_ARRAY = 65_536
HINT_MAX_CHARS = 256
HINT_KEYS = ("general.basename", "general.size_label", "general.license", "general.finetune")

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
FTYPE_GUESSED = 1024

# gguf value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_FORMATS: dict[int, str] = {
    T_UINT8: "B",
    T_INT8: "b",
    T_UINT16: "H",
    T_INT16: "h",
    T_UINT32: "I",
    T_INT32: "i",
    T_FLOAT32: "f",
    T_BOOL: "?",
    T_UINT64: "Q",
    T_INT64: "q",
    T_FLOAT64: "d",
}
_INT_TYPES = frozenset({T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64})
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
# Smallest encoding of one KV pair (empty key, u32 type, 1-byte value) and one tensor info
# (empty name, u32 n_dims = 0, u32 type, u64 offset): used to bound counts by remaining bytes.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_TYPE_AND_COUNT = struct.Struct("<IQ").unpack_from
_TYPE_AND_OFFSET = struct.Struct("<IQ").unpack_from
_PREAMBLE = struct.Struct("<4sIQQ")

# ggml_type id -> (name, block size in elements, bytes per block); reference §3.4 and
# gguf-py 0.19.0 GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# general.file_type (llama_ftype) -> the label llama.cpp / Ollama show (reference §3.3).
FTYPE_LABELS: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}
REMOVED_FTYPES = frozenset({4, 5, 6, 33, 34, 35})
UNKNOWN_QUANTIZATION = "unknown"

_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
_FILENAME_QUANT = re.compile(r"(?i)(?<![A-Z0-9])(IQ\d_[A-Z]+|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32)")


@dataclass(frozen=True)
class GgufArray:
    """An array value: its element type and count; `values` only for short numeric arrays."""

    element_type: int
    count: int
    values: tuple[int | float | bool, ...] | None = None


GgufValue = int | float | bool | str | GgufArray


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor-info record. `shape` is ggml's `ne[]`: innermost dimension first."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int
    n_bytes: int | None  # None for a ggml type this reader does not know


@dataclass
class GgufHeader:
    """Everything before the tensor data of one GGUF file."""

    path: pathlib.Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    kv: dict[str, GgufValue]
    tensors: list[GgufTensorInfo]
    warnings: list[str] = field(default_factory=list)


def _fail(path: pathlib.Path, message: str) -> InspectError:
    return InspectError(f"{path.name}: {message}", reason=MODEL_FILE_INVALID)


try:
    import numpy as _numpy
except ImportError:  # pragma: no cover - a core dependency; the loop covers its absence
    _numpy = None  # type: ignore[assignment]

# Arrays of at least this many strings try the vectorized walk first (below that the loop is
# as fast as numpy's setup).
VECTORIZED_MIN_STRINGS = 4096
_SCAN_CHUNK = 1 << 20  # bytes the vectorized walk looks at per step


def skip_short_strings(buf: mmap.mmap | bytes, off: int, count: int, end: int) -> int | None:
    """The offset after `count` gguf strings at `off`, found with numpy, or None when this
    path cannot vouch for the answer (the caller then walks the strings one by one).

    A string whose length is under 256 is one nonzero byte and seven zero bytes, then the
    text: so the start of every such string is a byte followed by seven zeros. Those places are
    found chunk by chunk, vectorized; the first `count` of them must then be exactly the chain
    the lengths describe (each start + 8 + its length is the next start). Anything else (an
    empty string, a NUL inside a token, a string of 256 bytes or more, too few strings before
    the end) breaks the chain and gives None; it never gives a wrong offset.
    """
    if count <= 0:
        return off
    np = _numpy
    if np is None:  # numpy is a dependency; without it the loop does the work
        return None
    starts: list[Any] = []
    found = 0
    scan = off
    while found < count and end - scan > 8:
        stop = min(end, scan + _SCAN_CHUNK + 8)
        region = np.frombuffer(buf, dtype=np.uint8, count=stop - scan, offset=scan)
        zero = region == 0
        pairs = zero[:-1] & zero[1:]
        quads = pairs[:-2] & pairs[2:]
        span = len(region) - 8
        seven = quads[1 : 1 + span] & quads[4 : 4 + span]  # bytes p+1..p+7 are all zero
        hits = np.flatnonzero(seven)
        hits += scan
        starts.append(hits)
        found += len(hits)
        scan += span
        del region, zero, pairs, quads, seven  # no view of the map may outlive this call
    if found < count:
        return None
    chain = np.concatenate(starts)[:count]
    del starts
    if int(chain[0]) != off:
        return None
    lengths = np.frombuffer(buf, dtype=np.uint8, count=end)
    following = chain + 8 + lengths[chain]
    del lengths
    if count > 1 and not np.array_equal(following[:-1], chain[1:]):
        return None
    after = int(following[-1])
    return after if after <= end else None


class _HeaderParser:
    """Walks one mapped header. `end` is the mapped length; offsets never go backwards."""

    def __init__(self, path: pathlib.Path, buf: mmap.mmap, file_size: int) -> None:
        self.path = path
        self.buf = buf
        self.end = len(buf)
        self.file_size = file_size

    def remaining(self, off: int) -> int:
        return self.end - off

    def need(self, off: int, n: int, what: str) -> None:
        """Fail unless `n` bytes remain at `off`."""
        if n > self.end - off:
            if self.end < self.file_size:
                raise _fail(
                    self.path,
                    f"{what} needs {n} bytes at offset {off}, beyond the "
                    f"{MAX_HEADER_BYTES}-byte header limit",
                )
            raise _fail(
                self.path,
                f"truncated header: {what} needs {n} bytes at offset {off}, "
                f"the file has {self.file_size}",
            )

    def read_string(self, off: int, what: str, limit: int) -> tuple[bytes, int]:
        self.need(off, 8, what)
        (n,) = _U64(self.buf, off)
        if n > limit:
            raise _fail(self.path, f"{what}: string length {n} exceeds the limit of {limit}")
        self.need(off + 8, n, what)
        start = off + 8
        return self.buf[start : start + n], start + n

    def read_value(self, off: int, vtype: int, key: str, depth: int) -> tuple[GgufValue, int]:
        if vtype == T_STRING:
            self.need(off, 8, key)
            (n,) = _U64(self.buf, off)
            if n > MAX_STRING_BYTES:
                raise _fail(self.path, f"{key}: string length {n} exceeds {MAX_STRING_BYTES}")
            self.need(off + 8, n, key)
            start = off + 8
            kept = self.buf[start : start + min(n, MAX_KEPT_STRING_BYTES)]
            return kept.decode("utf-8", "replace"), start + n
        if vtype == T_ARRAY:
            return self.read_array(off, key, depth + 1)
        st = _SCALAR_STRUCTS.get(vtype)
        if st is None:
            raise _fail(self.path, f"{key}: unknown value type {vtype}")
        self.need(off, st.size, key)
        value: int | float | bool = st.unpack_from(self.buf, off)[0]
        return value, off + st.size

    def read_array(self, off: int, key: str, depth: int) -> tuple[GgufArray, int]:
        if depth > MAX_ARRAY_DEPTH:
            raise _fail(self.path, f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        self.need(off, 12, key)
        etype, count = _TYPE_AND_COUNT(self.buf, off)
        off += 12
        if count > MAX_ARRAY_ELEMENTS:
            raise _fail(self.path, f"{key}: array of {count} elements exceeds {MAX_ARRAY_ELEMENTS}")
        if etype == T_STRING:
            # Each element is at least its u64 length: bound the loop before running it.
            self.need(off, count * 8, f"{key} ({count} strings)")
            return GgufArray(etype, count), self.skip_strings(off, count, key)
        if etype == T_ARRAY:
            self.need(off, count * 12, f"{key} ({count} arrays)")
            for _ in range(count):
                _, off = self.read_array(off, key, depth + 1)
            return GgufArray(etype, count), off
        st = _SCALAR_STRUCTS.get(etype)
        if st is None:
            raise _fail(self.path, f"{key}: unknown array element type {etype}")
        nbytes = count * st.size
        self.need(off, nbytes, f"{key} ({count} elements)")
        values = None
        if count <= MAX_KEPT_ARRAY:
            values = struct.unpack_from(f"<{count}{_SCALAR_FORMATS[etype]}", self.buf, off)
        return GgufArray(etype, count, values), off + nbytes

    def skip_strings(self, off: int, count: int, key: str) -> int:
        """Skip `count` gguf strings, keeping nothing: the hot loop for tokens and merges.

        Large arrays try the vectorized walk first (`skip_short_strings`: numpy, strings under
        256 bytes), which answers for real vocabularies in a third of the loop's time; anything
        it cannot vouch for comes back None and takes the loop below.

        Each string is a u64 length and its bytes, so the walk is sequential. Eight u64
        views of the buffer (one per byte alignment) turn each step into one index
        operation, unrolled by four: ~2x faster than `unpack_from` per element.
        """
        end = self.end
        if count >= VECTORIZED_MIN_STRINGS:
            skipped = skip_short_strings(self.buf, off, count, end)
            if skipped is not None:
                return skipped
        if sys.byteorder != "little":  # the u64 views are native-endian
            return self._skip_strings_portable(off, count, key)
        whole = memoryview(self.buf)
        views = [whole[r : r + (end - r) // 8 * 8].cast("Q") for r in range(8)]
        try:
            for _ in repeat(None, count >> 2):
                off += views[off & 7][off >> 3] + 8
                off += views[off & 7][off >> 3] + 8
                off += views[off & 7][off >> 3] + 8
                off += views[off & 7][off >> 3] + 8
            for _ in repeat(None, count & 3):
                off += views[off & 7][off >> 3] + 8
        except IndexError:
            off = end + 1
        finally:
            for view in views:
                view.release()
            whole.release()
        if off > end:
            self.need(end, off - end, f"{key} ({count} strings)")
        return off

    def _skip_strings_portable(self, off: int, count: int, key: str) -> int:
        buf = self.buf
        u64 = _U64
        try:
            for _ in repeat(None, count):
                off += u64(buf, off)[0] + 8
        except struct.error:
            off = self.end + 1
        if off > self.end:
            self.need(self.end, off - self.end, f"{key} ({count} strings)")
        return off

    def parse(self) -> GgufHeader:
        path, buf = self.path, self.buf
        self.need(0, _PREAMBLE.size, "the GGUF preamble")
        magic, version, n_tensors, n_kv = _PREAMBLE.unpack_from(buf, 0)
        if magic != GGUF_MAGIC:
            raise _fail(path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        if version & 0xFFFF == 0 and version != 0:
            raise _fail(
                path,
                f"GGUF version field {version:#x} looks byte-swapped: "
                "big-endian GGUF files are not supported",
            )
        if version == 1:
            raise _fail(path, "GGUF version 1 is not supported (llama.cpp reads versions 2 and 3)")
        if version not in (2, 3):
            raise _fail(path, f"unsupported GGUF version {version} (supported: 2 and 3)")
        off = _PREAMBLE.size
        if n_kv > MAX_KV_COUNT:
            raise _fail(path, f"metadata KV count {n_kv} exceeds {MAX_KV_COUNT}")
        if n_tensors > MAX_TENSOR_COUNT:
            raise _fail(path, f"tensor count {n_tensors} exceeds {MAX_TENSOR_COUNT}")
        self.need(off, n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES, "the header")

        kv: dict[str, GgufValue] = {}
        for _ in range(n_kv):
            raw_key, off = self.read_string(off, "a metadata key", MAX_KEY_BYTES)
            key = raw_key.decode("utf-8", "replace")
            self.need(off, 4, key)
            (vtype,) = _U32(buf, off)
            value, off = self.read_value(off + 4, vtype, key, 0)
            kv[key] = value

        alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise _fail(path, f"general.alignment {alignment!r} is not a power of two")

        self.need(off, n_tensors * _MIN_TENSOR_INFO_BYTES, f"{n_tensors} tensor infos")
        tensors: list[GgufTensorInfo] = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            raw_name, off = self.read_string(off, "a tensor name", MAX_KEY_BYTES)
            name = raw_name.decode("utf-8", "replace")
            self.need(off, 4, name)
            (n_dims,) = _U32(buf, off)
            off += 4
            if n_dims > MAX_DIMS:
                raise _fail(path, f"tensor {name}: {n_dims} dimensions (at most {MAX_DIMS})")
            self.need(off, 8 * n_dims + 12, name)
            shape = struct.unpack_from(f"<{n_dims}Q", buf, off)
            off += 8 * n_dims
            ggml_type, offset = _TYPE_AND_OFFSET(buf, off)
            off += 12
            if name in seen:
                raise _fail(path, f"duplicate tensor name {name}")
            seen.add(name)
            if offset % alignment:
                raise _fail(path, f"tensor {name}: offset {offset} is not {alignment}-aligned")
            n_elements = 1
            for d in shape:
                n_elements *= d
            n_bytes: int | None = None
            known = GGML_TYPES.get(ggml_type)
            if known is not None:
                _, block, type_size = known
                if shape and shape[0] % block:
                    raise _fail(
                        path,
                        f"tensor {name}: ne[0]={shape[0]} is not a multiple of the "
                        f"{known[0]} block size {block}",
                    )
                n_bytes = n_elements // block * type_size
            tensors.append(GgufTensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes))

        data_offset = -(-off // alignment) * alignment
        header = GgufHeader(path, version, self.file_size, alignment, data_offset, kv, tensors)
        unknown = sorted({t.ggml_type for t in tensors if t.n_bytes is None})
        if unknown:
            header.warnings.append(
                f"{path.name}: unknown ggml tensor types {unknown}; weight bytes are incomplete"
            )
        extent = max((t.offset + (t.n_bytes or 0) for t in tensors), default=0)
        expected = data_offset + extent
        if expected > self.file_size:
            raise _fail(
                path,
                f"truncated file: the header describes {expected} bytes "
                f"(data offset {data_offset} + tensor data {extent}), "
                f"the file has {self.file_size}",
            )
        return header


def read_gguf_header(path: pathlib.Path) -> GgufHeader:
    """Parse the header (KVs and tensor infos) of one GGUF file, bounded in time and memory."""
    try:
        file_size = path.stat().st_size
        if file_size < _PREAMBLE.size:
            with path.open("rb") as f:
                head = f.read(4)
            if head[:4] != GGUF_MAGIC[: len(head)] or not head:
                raise _fail(path, f"not a GGUF file (magic {head!r})")
            raise _fail(path, f"truncated header: {file_size} bytes, at least 24 needed")
        with (
            path.open("rb") as f,
            mmap.mmap(f.fileno(), min(file_size, MAX_HEADER_BYTES), access=mmap.ACCESS_READ) as mm,
        ):
            return _HeaderParser(path, mm, file_size).parse()
    except struct.error as exc:  # a bound check missed: still a bad file, never a crash
        raise _fail(path, f"malformed header ({exc})") from exc
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from exc


# --- from headers to ModelMetadata ------------------------------------------------------------


def _int(kv: dict[str, GgufValue], key: str) -> int | None:
    value = kv.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _str(kv: dict[str, GgufValue], key: str) -> str | None:
    value = kv.get(key)
    return value if isinstance(value, str) else None


def _int_or_per_layer(kv: dict[str, GgufValue], key: str) -> tuple[int | None, list[int] | None]:
    """A scalar, or a per-layer array (returned with its max)."""
    value = kv.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if (
        isinstance(value, GgufArray)
        and value.element_type in _INT_TYPES
        and value.values is not None
        and value.count > 0
    ):
        per_layer = [int(v) for v in value.values]
        return max(per_layer), per_layer
    return None, None


def quantization_label(file_type: int) -> tuple[str, list[str]]:
    """llama.cpp's label for a `general.file_type` value, and any warning about it."""
    warnings: list[str] = []
    ftype = file_type
    if ftype & FTYPE_GUESSED:
        ftype &= ~FTYPE_GUESSED
        warnings.append(
            f"general.file_type {file_type} carries the GUESSED flag (1024): "
            "the converter did not know the exact mix"
        )
    label = FTYPE_LABELS.get(ftype)
    if label is None:
        if ftype in REMOVED_FTYPES:
            warnings.append(f"general.file_type {ftype} was removed from llama.cpp")
        else:
            warnings.append(f"general.file_type {ftype} is unknown, the model may not work")
        return UNKNOWN_QUANTIZATION, warnings
    return label, warnings


def infer_quantization(tensors: Sequence[GgufTensorInfo], file_name: str) -> tuple[str, str]:
    """Label and explanation when `general.file_type` is missing.

    Rule: the ggml type holding the most elements among the 2-D (or more) weight tensors of
    the repeating blocks (all 2-D tensors when there are no `blk.*` ones). K-quant files mix
    types and the histogram cannot tell `_S`, `_M` and `_L` apart, so the base type is
    reported ("Q4_K"), unless the file name carries a finer label of the same base type
    ("...Q4_K_M.gguf" -> "Q4_K_M").
    """
    weights = [t for t in tensors if len(t.shape) >= 2 and t.name.endswith(".weight")]
    blocks = [t for t in weights if t.name.startswith("blk.")]
    counts: dict[int, int] = {}
    for t in blocks or weights:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.n_elements
    if not counts:
        return UNKNOWN_QUANTIZATION, "no 2-D weight tensors to infer the quantization from"
    dominant = max(counts, key=lambda k: counts[k])
    base = GGML_TYPES[dominant][0] if dominant in GGML_TYPES else UNKNOWN_QUANTIZATION
    match = _FILENAME_QUANT.search(file_name)
    if match:
        named = match.group(1).upper()
        if re.sub(r"_[SML]$", "", named) == base and named != base:
            return named, (
                f"general.file_type is missing: dominant weight type {base}, "
                f"refined to {named} from the file name"
            )
    return base, f"general.file_type is missing: quantization inferred from weight type {base}"


def _split_siblings(path: pathlib.Path, count: int) -> list[pathlib.Path] | None:
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return None
    prefix = match.group("prefix")
    return [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _weights_breakdown(
    tensors: Sequence[GgufTensorInfo], block_count: int | None
) -> WeightsBreakdown:
    layers: dict[int, int] = {}
    input_bytes = output_bytes = other_bytes = 0
    for t in tensors:
        n = t.n_bytes or 0
        name = t.name
        if name.startswith("blk."):
            idx_text = name[4 : name.find(".", 4)] if name.find(".", 4) > 0 else ""
            if idx_text.isdigit() and int(idx_text) < MAX_LAYERS:
                idx = int(idx_text)
                layers[idx] = layers.get(idx, 0) + n
                continue
            other_bytes += n
        elif name.startswith("token_embd"):
            input_bytes += n
        elif name.startswith(("output.", "output_norm")):
            output_bytes += n
        else:
            other_bytes += n
    n_layers = max(block_count or 0, max(layers, default=-1) + 1)
    layer_bytes = [layers.get(i, 0) for i in range(n_layers)]
    total = input_bytes + output_bytes + other_bytes + sum(layer_bytes)
    return WeightsBreakdown(
        total_bytes=total,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        other_bytes=other_bytes,
        layer_bytes=layer_bytes,
    )


def inspect_gguf(path: pathlib.Path) -> ModelMetadata:
    """Inspect a GGUF file (and, for a split model, every shard found beside it)."""
    header = read_gguf_header(path)
    warnings = list(header.warnings)
    headers = [header]
    primary = header
    split: SplitInfo | None = None
    size_bytes = header.file_size

    split_count = _int(header.kv, "split.count")
    if split_count is not None and split_count > 1:
        if split_count > MAX_SPLIT_COUNT:
            raise _fail(path, f"split.count {split_count} exceeds {MAX_SPLIT_COUNT}")
        split_no = _int(header.kv, "split.no")
        index = (split_no + 1) if split_no is not None else 1
        siblings = _split_siblings(path, split_count)
        if siblings is None:
            warnings.append(
                f"{path.name} is shard {index} of {split_count} but its name does not follow "
                "<name>-00001-of-0000N.gguf, so the other shards cannot be found"
            )
            found = 1
        else:
            headers = []
            missing = []
            for sibling in siblings:
                if sibling == path:
                    headers.append(header)
                elif sibling.is_file():
                    shard = read_gguf_header(sibling)
                    warnings.extend(shard.warnings)
                    headers.append(shard)
                else:
                    missing.append(sibling.name)
            found = len(headers)
            if missing:
                warnings.append(
                    f"split model: {len(missing)} of {split_count} shards missing "
                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                )
            first = [h for h in headers if _int(h.kv, "split.no") == 0]
            if first:
                primary = first[0]
            elif index != 1:
                warnings.append("split model: shard 1 (with the model metadata) is missing")
            size_bytes = sum(h.file_size for h in headers)
        tensors_total = _int(primary.kv, "split.tensors.count")
        split = SplitInfo(
            index=index, count=split_count, files_found=found, tensors_total=tensors_total
        )
        n_found = sum(len(h.tensors) for h in headers)
        if tensors_total is not None and found == split_count and n_found != tensors_total:
            warnings.append(
                f"split.tensors.count is {tensors_total} but the shards hold {n_found} tensors"
            )

    tensors = [t for h in headers for t in h.tensors]
    return _metadata(primary, tensors, split, size_bytes, warnings)


def _metadata(
    header: GgufHeader,
    tensors: list[GgufTensorInfo],
    split: SplitInfo | None,
    size_bytes: int,
    warnings: list[str],
) -> ModelMetadata:
    kv = header.kv
    arch = _str(kv, "general.architecture")
    general_type = (_str(kv, "general.type") or "model").lower()
    if arch is None:
        model_type = ModelType.UNKNOWN
        warnings.append("general.architecture is missing")
    elif general_type == "adapter":
        model_type = ModelType.ADAPTER
    elif arch == "clip" or general_type == "mmproj":
        model_type = ModelType.PROJECTOR
    elif general_type == "model":
        model_type = ModelType.LLM
    else:
        model_type = ModelType.UNKNOWN
        warnings.append(f"general.type {general_type!r} is not a model")

    file_type = _int(kv, "general.file_type")
    if file_type is not None:
        quantization, q_warnings = quantization_label(file_type)
        warnings.extend(q_warnings)
    else:
        quantization, why = infer_quantization(tensors, header.path.name)
        warnings.append(why)

    p = f"{arch}." if arch else "\x00"  # no arch: no prefixed key can match
    block_count = _int(kv, p + "block_count")
    if block_count is not None and not 0 <= block_count <= MAX_LAYERS:
        raise _fail(header.path, f"{p}block_count {block_count} is not plausible")
    n_embd = _int(kv, p + "embedding_length")
    n_head, n_head_per_layer = _int_or_per_layer(kv, p + "attention.head_count")
    n_head_kv, n_head_kv_per_layer = _int_or_per_layer(kv, p + "attention.head_count_kv")
    if n_head_kv is None:
        n_head_kv, n_head_kv_per_layer = n_head, n_head_per_layer  # llama.cpp's default
    key_length = _int(kv, p + "attention.key_length")
    value_length = _int(kv, p + "attention.value_length")
    if n_embd and n_head:
        key_length = key_length if key_length is not None else n_embd // n_head
        value_length = value_length if value_length is not None else n_embd // n_head
    # MLA models (deepseek2...) cache the compressed K/V: use those dims when present.
    k_cache = _int(kv, p + "attention.key_length_mla") or key_length
    v_cache = _int(kv, p + "attention.value_length_mla") or value_length

    kv_per_token = None
    if model_type is ModelType.LLM and block_count and n_head_kv is not None and k_cache:
        per_layer = n_head_kv_per_layer or [n_head_kv] * block_count
        if len(per_layer) != block_count:
            warnings.append(
                f"{p}attention.head_count_kv has {len(per_layer)} entries for {block_count} layers"
            )
        kv_per_token = sum(per_layer[:block_count]) * (k_cache + (v_cache or 0)) * 2

    tokens = kv.get("tokenizer.ggml.tokens")
    vocab_size = tokens.count if isinstance(tokens, GgufArray) else _int(kv, p + "vocab_size")
    template = kv.get("tokenizer.chat_template")
    has_template = isinstance(template, str) and bool(template.strip())

    dtypes: dict[str, int] = {}
    for t in tensors:
        name = GGML_TYPES[t.ggml_type][0] if t.ggml_type in GGML_TYPES else f"TYPE_{t.ggml_type}"
        dtypes[name] = dtypes.get(name, 0) + 1

    hints: dict[str, str] = {}
    for key in HINT_KEYS:
        value = _str(kv, key)
        if value:
            hints[key] = value[:HINT_MAX_CHARS]
    if model_type is ModelType.ADAPTER:
        adapter_type = _str(kv, "adapter.type")
        if adapter_type:
            hints["adapter.type"] = adapter_type[:HINT_MAX_CHARS]

    model_name = _str(kv, "general.name")
    return ModelMetadata(
        format=ModelFormat.GGUF,
        model_type=model_type,
        name=model_name[:HINT_MAX_CHARS] if model_name else None,
        architecture=arch,
        quantization=quantization,
        file_type=file_type,
        parameter_count=sum(t.n_elements for t in tensors),
        context_length=_int(kv, p + "context_length"),
        block_count=block_count,
        embedding_length=n_embd,
        feed_forward_length=_int_or_per_layer(kv, p + "feed_forward_length")[0],
        head_count=n_head,
        head_count_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        expert_count=_int(kv, p + "expert_count"),
        expert_used_count=_int(kv, p + "expert_used_count"),
        vocab_size=vocab_size,
        sliding_window=_int(kv, p + "attention.sliding_window"),
        tokenizer_model=_str(kv, "tokenizer.ggml.model"),
        has_chat_template=has_template,
        kv_cache_bytes_per_token=kv_per_token,
        dtypes=dtypes,
        tensor_count=len(tensors),
        split=split,
        weights=_weights_breakdown(tensors, block_count),
        size_bytes=size_bytes,
        hints=hints,
        warnings=warnings,
    )
