"""The device a worker binds to: parse `--device`, and bind the process to it.

Accepted spellings (case-insensitive): `cpu`; `cuda` (= `cuda:0`), `cuda:N`, `cuda-N`; `mps`,
`metal`, `metal:0`, `metal-0` (Apple has one GPU). The resource id of a device is a slug:
`cpu`, `cuda-0`, `metal-0` (rbee.common.v1.Device).

Binding happens once, in the entry point, BEFORE the engine module is imported: CUDA reads
CUDA_VISIBLE_DEVICES when it initialises, so a later change has no effect. A `cuda:N` worker
sees only GPU N (inside the process it is CUDA device 0); a `cpu` worker hides every GPU, so a
CUDA build of llama.cpp cannot offload layers behind the user's back.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping

from pydantic import BaseModel, ConfigDict, Field

from services.catalog.domain import DeviceKind

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

_CUDA = re.compile(r"cuda(?:[:\-](\d{1,3}))?")
_METAL = re.compile(r"(?:mps|metal)(?:[:\-](\d{1,3}))?")
ACCEPTED = "cpu, cuda:N (e.g. cuda:0), mps"


class DeviceSpecError(ValueError):
    """`--device` names no device this worker can bind to."""


class DeviceSpec(BaseModel):
    """A parsed device: its kind and its index among devices of that kind."""

    model_config = ConfigDict(frozen=True)

    kind: DeviceKind
    index: int = Field(default=0, ge=0)

    @property
    def slug(self) -> str:
        """The device id: "cpu", "cuda-0", "metal-0"."""
        return "cpu" if self.kind is DeviceKind.CPU else f"{self.kind.value}-{self.index}"

    @property
    def resource_name(self) -> str:
        """`devices/{device}`."""
        return f"devices/{self.slug}"

    def __str__(self) -> str:
        if self.kind is DeviceKind.CPU:
            return "cpu"
        if self.kind is DeviceKind.METAL:
            return "mps"
        return f"cuda:{self.index}"


def parse_device(text: str) -> DeviceSpec:
    """Parse a `--device` value; raises DeviceSpecError saying what is accepted."""
    value = text.strip().lower()
    if value == "cpu":
        return DeviceSpec(kind=DeviceKind.CPU)
    if match := _CUDA.fullmatch(value):
        return DeviceSpec(kind=DeviceKind.CUDA, index=int(match.group(1) or 0))
    if match := _METAL.fullmatch(value):
        index = int(match.group(1) or 0)
        if index != 0:
            raise DeviceSpecError(f"Apple GPUs have one Metal device (mps), got {text!r}")
        return DeviceSpec(kind=DeviceKind.METAL)
    raise DeviceSpecError(f"unknown device {text!r}; expected one of: {ACCEPTED}")


def bind_device(device: DeviceSpec, environ: MutableMapping[str, str]) -> None:
    """Restrict the process to `device` through `environ` (pass os.environ in the entry point).

    Call before the engine (llama_cpp, torch) is imported. Metal needs nothing: one GPU.
    """
    if device.kind is DeviceKind.CUDA:
        environ[CUDA_VISIBLE_DEVICES] = str(device.index)
    elif device.kind is DeviceKind.CPU:
        # An empty list hides all GPUs (a CUDA build then runs on the CPU only).
        environ[CUDA_VISIBLE_DEVICES] = ""
