"""File-level decisions shared by the resolvers, pure functions (no I/O).

- `quantization_from_name`, `format_from_name`: what a file name says about a model file.
- `choose_gguf`: which GGUF of a repo to pull when no FILE is named (a documented preference
  list; split sets `-00001-of-0000N` are pulled whole, in order; mmproj/imatrix files skipped).
- `select_folder_files`: every file a diffusers or transformers repo needs, without duplicate
  weights in other formats or precision variants.
- `sanitize_filename`, `model_slug`: safe local names and readable catalog id hints.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.catalog.domain import ModelFormat
from services.catalog.ids import slugify

_QUANT = re.compile(
    r"(?i)(?<![A-Za-z0-9])"
    r"(IQ\d_[A-Z]+|TQ\d_\d|Q\d_K_XL|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32|MXFP4|FP8|FP16|FP32)"
    r"(?![A-Za-z0-9])"
)
_QUANT_ALIASES = {"FP16": "F16", "FP32": "F32"}
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)

# Weight formats we never pull when safetensors of the same weights exist (or at all).
_OTHER_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5")
_NEVER_SUFFIXES = (".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5", ".pb")
_SKIPPED_FOLDERS = frozenset({"flax", "tf", "onnx", "openvino", "coreml", "original"})
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".spm")
_PRECISION_VARIANTS = frozenset({"fp16", "bf16", "fp32", "fp8", "ema", "non_ema", "non-ema"})
_VARIANT_PREFERENCE = ("fp16", "bf16", "fp32", "fp8", "non_ema", "non-ema", "ema")


def quantization_from_name(name: str) -> str | None:
    """The quantization label in a file name (Q4_K_M, IQ4_XS, F16, ...), upper-case, or None."""
    matches = _QUANT.findall(posixpath.basename(name))
    if not matches:
        return None
    label = str(matches[-1]).upper()  # the label usually sits last, before the extension
    return _QUANT_ALIASES.get(label, label)


def format_from_name(name: str) -> ModelFormat | None:
    """The model format a file name implies (GGUF, safetensors), or None."""
    lower = name.lower()
    if lower.endswith(".gguf"):
        return ModelFormat.GGUF
    if lower.endswith(".safetensors"):
        return ModelFormat.SAFETENSORS
    if posixpath.basename(lower) == "model_index.json":
        return ModelFormat.DIFFUSERS
    return None


def split_part(name: str) -> tuple[str, int, int] | None:
    """(prefix, index, count) for a split GGUF shard name `<prefix>-0000i-of-0000N.gguf`."""
    match = _SPLIT.match(name)
    if match is None:
        return None
    index, count = int(match.group("index")), int(match.group("count"))
    if not 1 <= index <= count:
        return None
    return match.group("prefix"), index, count


def is_auxiliary_gguf(name: str) -> bool:
    """mmproj projectors and imatrix files are not the model a bare repo pull means."""
    base = posixpath.basename(name).lower()
    return base.startswith("mmproj") or "imatrix" in base


@dataclass(frozen=True)
class GgufCandidate:
    """One pullable GGUF model in a repo: a single file or a complete split set."""

    paths: tuple[str, ...]  # in shard order
    quantization: str | None

    @property
    def first(self) -> str:
        return self.paths[0]


def gguf_candidates(paths: Iterable[str]) -> list[GgufCandidate]:
    """Group a repo's GGUF files into models (incomplete split sets are left out)."""
    singles: list[GgufCandidate] = []
    sets: dict[tuple[str, int], dict[int, str]] = {}
    for path in sorted(paths):
        if not path.lower().endswith(".gguf") or is_auxiliary_gguf(path):
            continue
        part = split_part(path)
        if part is None:
            singles.append(GgufCandidate((path,), quantization_from_name(path)))
            continue
        prefix, index, count = part
        sets.setdefault((prefix, count), {})[index] = path
    for (prefix, count), shards in sets.items():
        if len(shards) == count:
            ordered = tuple(shards[i] for i in range(1, count + 1))
            singles.append(GgufCandidate(ordered, quantization_from_name(prefix + ".gguf")))
    return sorted(singles, key=lambda c: c.first)


def split_set_for(path: str, paths: Iterable[str]) -> list[str]:
    """All shards of the split set `path` belongs to (just `[path]` when it is not a shard)."""
    part = split_part(path)
    if part is None:
        return [path]
    prefix, _, count = part
    shards = {}
    for other in paths:
        other_part = split_part(other)
        if other_part is not None and other_part[0] == prefix and other_part[2] == count:
            shards[other_part[1]] = other
    return [shards[i] for i in sorted(shards)]


@dataclass(frozen=True)
class GgufChoice:
    candidate: GgufCandidate
    reason: str


def choose_gguf(paths: Sequence[str], preference: Sequence[str]) -> GgufChoice | None:
    """Pick the GGUF model to pull from a repo listing, by `preference`; None if no GGUF.

    The only candidate is taken whatever its quantization; among several, the first
    preference label that some candidate carries wins (ties: the first path in sort order).
    Several candidates and no match: None is NOT returned; a `LookupError` lists them.
    """
    candidates = gguf_candidates(paths)
    if not candidates:
        return None
    shown = "[" + ", ".join(preference) + "]"
    if len(candidates) == 1:
        only = candidates[0]
        label = only.quantization or "unknown quantization"
        return GgufChoice(only, f"{label}: the only GGUF model in the repo")
    wanted = [p.upper() for p in preference]
    for rank, label in enumerate(wanted):
        matching = [c for c in candidates if c.quantization == label]
        if matching:
            chosen = matching[0]
            why = "first match" if rank == 0 else f"match #{rank + 1}"
            reason = f"{label}: {why} of the preference list {shown}"
            if len(chosen.paths) > 1:
                reason += f"; split into {len(chosen.paths)} parts, all pulled"
            return GgufChoice(chosen, reason)
    available = sorted({c.quantization or "?" for c in candidates})
    raise LookupError(
        f"no GGUF file matches the quantization preference {shown} (available: "
        + ", ".join(available)
        + ")"
    )


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """fnmatch `path` against glob patterns (a pattern without '/' also matches the basename)."""
    base = posixpath.basename(path)
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern):
            return True
        if "/" not in pattern and fnmatch.fnmatchcase(base, pattern):
            return True
    return False


def _weight_stem(name: str) -> tuple[str, str | None, str]:
    """Split a weight file name into (stem without variant, variant, suffix).

    `diffusion_pytorch_model.fp16.safetensors` -> ("diffusion_pytorch_model", "fp16",
    ".safetensors"); shard suffixes `-00001-of-00002` stay on the stem.
    """
    stem, suffix = posixpath.splitext(name)
    variant: str | None = None
    shard = ""
    shard_match = re.search(r"-\d{5}-of-\d{5}$", stem)
    if shard_match:
        shard = shard_match.group(0)
        stem = stem[: shard_match.start()]
    head, dot, tail = stem.rpartition(".")
    if dot and tail.lower() in _PRECISION_VARIANTS:
        stem, variant = head, tail.lower()
    return stem + shard, variant, suffix.lower()


def _index_variant(name: str) -> tuple[str, str | None] | None:
    """`x.safetensors.index.fp16.json` -> ("x.safetensors.index.json", "fp16")."""
    match = re.fullmatch(r"(.+\.(?:safetensors|bin)\.index)(?:\.([A-Za-z0-9_-]+))?\.json", name)
    if match is None:
        return None
    variant = match.group(2)
    if variant is not None and variant.lower() not in _PRECISION_VARIANTS:
        return None
    return match.group(1) + ".json", variant.lower() if variant else None


def _pick_weights(names: Sequence[str]) -> set[str]:
    """From the files of ONE folder, the weight files (and weight indexes) to pull."""
    safetensors = [n for n in names if n.lower().endswith(".safetensors")]
    bins = [n for n in names if n.lower().endswith(".bin")]
    pool = safetensors or bins  # other formats only when no safetensors exist at all
    by_variant: dict[str | None, list[str]] = {}
    for name in pool:
        _, variant, _ = _weight_stem(name)
        by_variant.setdefault(variant, []).append(name)
    if None in by_variant:
        variant_kept: str | None = None
    else:
        variant_kept = next((v for v in _VARIANT_PREFERENCE if v in by_variant), None)
        if variant_kept is None and by_variant:
            variant_kept = sorted(v or "" for v in by_variant)[0]
    chosen = set(by_variant.get(variant_kept, []))
    weight_suffix = ".safetensors" if safetensors else ".bin"
    for name in names:
        index = _index_variant(name)
        if index is None:
            continue
        base, variant = index
        if variant == variant_kept and base.endswith(f"{weight_suffix}.index.json"):
            chosen.add(name)
    return chosen


def _by_folder(paths: Iterable[str]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for path in paths:
        folders.setdefault(posixpath.dirname(path), []).append(posixpath.basename(path))
    return folders


def _is_config(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_CONFIG_SUFFIXES) and _index_variant(name) is None


def select_diffusers_files(paths: Sequence[str], components: Iterable[str] | None) -> list[str]:
    """The files of a diffusers repo a pipeline needs: model_index.json plus, in each
    component folder, its configs/tokenizer files and ONE set of weights.

    `components` are the folder names model_index.json lists (None: every top-level folder).
    Root-level single-file checkpoints and flax/onnx/openvino copies are left out.
    """
    wanted = None if components is None else set(components)
    selected = ["model_index.json"] if "model_index.json" in paths else []
    for folder, names in sorted(_by_folder(paths).items()):
        if not folder or "/" in folder:  # root files (single-file checkpoints) and nested dirs
            continue
        if folder in _SKIPPED_FOLDERS or (wanted is not None and folder not in wanted):
            continue
        weights = _pick_weights(names)
        for name in sorted(names):
            if name in weights or (_is_config(name) and not name.lower().endswith("readme.md")):
                selected.append(f"{folder}/{name}")
    return selected


def select_transformers_files(paths: Sequence[str]) -> list[str]:
    """The root files of a transformers checkpoint: configs, tokenizer, ONE set of weights.

    Subfolders (original/ consolidated checkpoints, onnx/ exports) and code are left out.
    """
    names = [p for p in paths if "/" not in p]
    weights = _pick_weights(names)
    selected = []
    for name in sorted(names):
        lower = name.lower()
        if name in weights or (
            _is_config(name) and not lower.startswith(("readme", "license", "notice"))
        ):
            selected.append(name)
    return selected


def is_weight_file(name: str) -> bool:
    lower = name.lower()
    return lower.endswith((".safetensors", ".gguf", *_OTHER_WEIGHT_SUFFIXES))


def model_files_hint(paths: Iterable[str], limit: int = 5) -> str:
    """A few of a repo's GGUF/safetensors files, for "not found" and "ambiguous" messages."""
    models = [p for p in sorted(paths) if p.lower().endswith((".gguf", ".safetensors"))]
    if not models:
        return "the repo holds no GGUF or safetensors files"
    shown = ", ".join(models[:limit])
    more = f" and {len(models) - limit} more" if len(models) > limit else ""
    return f"model files in the repo: {shown}{more}"


_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")
MAX_LOCAL_NAME = 200


def sanitize_filename(name: str, default: str = "download") -> str:
    """A safe single path component from an upstream-provided name (never '..', never empty)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip().lstrip(".")
    if len(base) > MAX_LOCAL_NAME:
        stem, ext = posixpath.splitext(base)
        base = stem[: MAX_LOCAL_NAME - len(ext[:20])] + ext[:20]
    return base or default


def model_slug(*parts: str | None, max_length: int = 63) -> str:
    """A readable lower-case [a-z0-9-] slug of at most `max_length` characters."""
    text = "-".join(p for p in parts if p)
    slug = slugify(text)[:max_length].strip("-")
    return slug or "model"


def drop_model_suffix(name: str) -> str:
    """`TinyLlama-1.1B-Chat-GGUF` -> `TinyLlama-1.1B-Chat`; `x.Q4_K_M.gguf` -> `x`."""
    stem = posixpath.basename(name)
    for suffix in (".gguf", ".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    part = split_part(stem + ".gguf")
    if part is not None:
        stem = part[0]
    stem = re.sub(r"(?i)[-_.]gguf$", "", stem)
    label = quantization_from_name(stem)
    if label:
        stem = re.sub(rf"(?i)[-_.]?{re.escape(label)}$", "", stem) or stem
    return stem
