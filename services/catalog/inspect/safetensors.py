"""safetensors header reader and single-file inspector (reference §4.1).

Layout: u64 LE header length N, N bytes of JSON (`{"__metadata__": {...}, "<tensor>":
{"dtype", "shape", "data_offsets": [begin, end]}, ...}`), then the byte buffer. Only the
header is read: N is checked against the file size and `MAX_HEADER_BYTES` before it is read,
every entry is validated, and the tensor extent is checked against the file size.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.catalog.domain import ModelFormat, ModelMetadata, ModelType, WeightsBreakdown
from services.catalog.inspect import MODEL_FILE_INVALID, SAFETENSORS_MAX_HEADER_BYTES, InspectError
from services.catalog.inspect.sd_families import classify

MAX_HEADER_BYTES = SAFETENSORS_MAX_HEADER_BYTES  # the safetensors library's own limit
MAX_DIMS = 16
HINT_MAX_CHARS = 256
MAX_HINTS = 32
# __metadata__ keys kept as hints; modelspec.thumbnail is a base64 image and is dropped.
HINT_KEYS = frozenset(
    {
        "format",
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_sd_model_name",
        "ss_output_name",
    }
)
HINT_PREFIXES = ("modelspec.",)
HINT_DROPPED = frozenset({"modelspec.thumbnail"})

# dtype -> bits per element (sub-byte float formats pack several per byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

_LAYER_INDEX = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class SafetensorsTensor:
    """One header entry: dtype, shape (outermost first), byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: pathlib.Path
    file_size: int
    header_length: int
    tensors: dict[str, SafetensorsTensor]
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def _fail(path: pathlib.Path, message: str) -> InspectError:
    return InspectError(f"{path.name}: {message}", reason=MODEL_FILE_INVALID)


def read_safetensors_header(path: pathlib.Path) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file, never its tensor data."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated: {file_size} bytes, no safetensors header length")
            header_length = int.from_bytes(prefix, "little")
            if header_length > MAX_HEADER_BYTES:
                raise _fail(
                    path,
                    f"header length {header_length} exceeds the {MAX_HEADER_BYTES}-byte limit",
                )
            if header_length > file_size - 8:
                raise _fail(
                    path,
                    f"header length {header_length} exceeds the file size ({file_size} bytes)",
                )
            if header_length < 2:
                raise _fail(path, f"header length {header_length} is too small for a JSON object")
            raw = f.read(header_length)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) != header_length:
        raise _fail(path, "the file shrank while it was read")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(parsed, dict):
        raise _fail(path, "header is not a JSON object")

    metadata: dict[str, str] = {}
    tensors: dict[str, SafetensorsTensor] = {}
    warnings: list[str] = []
    for name, entry in parsed.items():
        if name == "__metadata__":
            if isinstance(entry, dict):
                metadata = {k: v for k, v in entry.items() if isinstance(v, str)}
            else:
                warnings.append("__metadata__ is not an object; ignored")
            continue
        tensors[name] = _tensor(path, name, entry, warnings)

    extent = max((t.end for t in tensors.values()), default=0)
    expected = 8 + header_length + extent
    if expected > file_size:
        raise _fail(
            path,
            f"truncated file: the header describes {expected} bytes "
            f"(8 + header {header_length} + data {extent}), the file has {file_size}",
        )
    return SafetensorsHeader(path, file_size, header_length, tensors, metadata, warnings)


def _tensor(path: pathlib.Path, name: str, entry: object, warnings: list[str]) -> SafetensorsTensor:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(path, f"tensor {name!r}: dtype missing")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _fail(path, f"tensor {name!r}: bad shape {str(shape)[:80]}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor {name!r}: bad data_offsets {str(offsets)[:80]}")
    tensor = SafetensorsTensor(dtype, tuple(shape), offsets[0], offsets[1])
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        warnings.append(f"tensor {name!r}: unknown dtype {dtype[:32]!r}")
    elif (tensor.n_elements * bits + 7) // 8 != tensor.end - tensor.begin:
        raise _fail(
            path,
            f"tensor {name!r}: {dtype} {list(shape)} needs "
            f"{(tensor.n_elements * bits + 7) // 8} bytes, data_offsets span "
            f"{tensor.end - tensor.begin}",
        )
    return tensor


@dataclass
class TensorSummary:
    """Totals over one or more safetensors headers."""

    parameter_count: int = 0
    total_bytes: int = 0
    tensor_count: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count
    dtype_elements: dict[str, int] = field(default_factory=dict)

    @property
    def dominant_dtype(self) -> str | None:
        """The dtype holding the most elements (the precision label)."""
        if not self.dtype_elements:
            return None
        return max(self.dtype_elements, key=lambda d: self.dtype_elements[d])


def summarize(headers: Iterable[SafetensorsHeader]) -> TensorSummary:
    """Parameter count, bytes and dtype mix over the tensors of these headers."""
    summary = TensorSummary()
    for header in headers:
        for tensor in header.tensors.values():
            n = tensor.n_elements
            summary.parameter_count += n
            summary.total_bytes += tensor.end - tensor.begin
            summary.tensor_count += 1
            summary.dtypes[tensor.dtype] = summary.dtypes.get(tensor.dtype, 0) + 1
            summary.dtype_elements[tensor.dtype] = summary.dtype_elements.get(tensor.dtype, 0) + n
    return summary


def metadata_hints(metadata: Mapping[str, str]) -> dict[str, str]:
    """The bounded subset of `__metadata__` kept as hints (values cut to 256 chars)."""
    hints: dict[str, str] = {}
    for key in sorted(metadata):
        if len(hints) >= MAX_HINTS:
            break
        if key in HINT_DROPPED or len(key) > HINT_MAX_CHARS:
            continue
        if key in HINT_KEYS or key.startswith(HINT_PREFIXES):
            hints[key] = metadata[key][:HINT_MAX_CHARS]
    return hints


def inspect_safetensors(path: pathlib.Path) -> ModelMetadata:
    """Inspect one safetensors file: dtype mix, parameters, and what kind of model it is."""
    header = read_safetensors_header(path)
    shapes = {name: t.shape for name, t in header.tensors.items()}
    found = classify(shapes, header.metadata, path.name)
    summary = summarize([header])
    hints = metadata_hints(header.metadata)
    hints.update(found.hints)

    block_count = embedding_length = vocab_size = None
    if found.model_type is ModelType.LLM:
        layers = [int(m.group(1)) for k in shapes if (m := _LAYER_INDEX.match(k))]
        block_count = max(layers) + 1 if layers else None
        embed = shapes.get("model.embed_tokens.weight") or shapes.get("lm_head.weight")
        if embed is not None and len(embed) == 2:
            vocab_size, embedding_length = embed
    title = header.metadata.get("modelspec.title")
    return ModelMetadata(
        format=ModelFormat.SAFETENSORS,
        model_type=found.model_type,
        name=title[:HINT_MAX_CHARS] if title else None,
        architecture=found.architecture,
        family=found.family,
        variant=found.variant,
        quantization=summary.dominant_dtype,
        parameter_count=summary.parameter_count,
        block_count=block_count,
        embedding_length=embedding_length,
        vocab_size=vocab_size,
        needs_components=found.needs_components,
        dtypes=summary.dtypes,
        tensor_count=summary.tensor_count,
        weights=WeightsBreakdown(total_bytes=summary.total_bytes),
        size_bytes=header.file_size,
        hints=hints,
        warnings=header.warnings[:20] + found.warnings,
    )
