"""Enum tables between domain enums and protobuf enum numbers, shared by every convert.py.

Each convert module declares `X_TO_PB = {DomainEnum.A: pb.X_A, ...}` (unit tests check every
member is there) and derives the reverse table with `inverse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from services.common.errors import InvalidArgument

E = TypeVar("E")


def inverse(table: Mapping[E, int]) -> dict[int, E]:
    """The wire -> domain table of a domain -> wire table."""
    return {int(v): k for k, v in table.items()}


def enum_from_pb(table: Mapping[int, E], value: int, field: str, *, default: E | None = None) -> E:
    """The domain value of a wire enum number; `default` stands for 0 (unset) when given.
    Anything else unknown is INVALID_ARGUMENT on `field`."""
    if value == 0 and default is not None:
        return default
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument.for_field(
            field, f"unknown or unset value {value}; set one of the documented values"
        ) from None
