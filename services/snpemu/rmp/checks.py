"""The checks every rmp request field goes through before anything changes.

Each raises InvalidArgument with an RmpReason member and quotes at most a short prefix of what
the caller sent, so a megabyte of input never comes back in an error (or in its trailers).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import TypeVar

from snpemu.abi.addr import spa_to_pfn
from snpemu.errors import InvalidArgument
from snpemu.rmp.reasons import RmpReason

E = TypeVar("E", bound=enum.IntEnum)

# How much of a caller's string an error message repeats.
QUOTE_CHARS = 32
# Free-text fields (who wrote, who holds a map, why pages leak): what a log line takes.
MAX_TEXT = 256
# Handles and ids the caller echoes back (a VM id, a map id).
MAX_ID = 128
# the most one read answers: its reply must fit a gRPC message (4 MiB by default) whole
MAX_READ = 1 << 20


def quote(text: str | bytes) -> str:
    """repr() of at most QUOTE_CHARS of the caller's text, marked when cut."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text)} long)"


def member(enum_cls: type[E], value: int, field: str) -> E:
    """The enum member a wire value names; 0 (the proto's UNSPECIFIED) is a missing field and
    a value the proto does not define is refused, never passed on."""
    try:
        return enum_cls(value)
    except ValueError:
        pass
    names = ", ".join(m.name for m in enum_cls)
    if value == 0:
        raise InvalidArgument(
            f"{field} is unspecified (0): give one of {names}", reason=RmpReason.MISSING_FIELD
        ) from None
    raise InvalidArgument(
        f"{field} {value} is not one of {names}", reason=RmpReason.UNKNOWN_ENUM_VALUE
    ) from None


def members(enum_cls: type[E], values: Iterable[int], field: str) -> tuple[E, ...]:
    return tuple(member(enum_cls, v, field) for v in values)


def in_range(value: int, low: int, high: int, field: str) -> int:
    if not low <= value <= high:
        raise InvalidArgument(
            f"{field} {value:#x} is outside {low:#x}..{high:#x}", reason=RmpReason.OUT_OF_RANGE
        )
    return value


def text(value: str, field: str, *, limit: int = MAX_TEXT, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is required", reason=RmpReason.MISSING_FIELD)
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters, at most {limit}: {quote(value)}",
            reason=RmpReason.TOO_LONG,
        )
    return value


def count(n: int, limit: int, field: str) -> None:
    if n > limit:
        raise InvalidArgument(f"{field}: at most {limit}, got {n}", reason=RmpReason.TOO_LONG)


def pfn(value: int, npages: int, field: str = "PFN") -> int:
    if not 0 <= value < npages:
        raise InvalidArgument(
            f"{field} {value:#x} is beyond host memory (max {npages - 1:#x})",
            reason=RmpReason.BEYOND_MEMORY,
        )
    return value


def spa(value: int, npages: int, field: str = "SPA") -> int:
    """value, an address inside host memory."""
    pfn(spa_to_pfn(value), npages, field)
    return value


def distinct_pfns(values: Sequence[int], npages: int, field: str = "pfns") -> list[int]:
    """values as a list: every PFN inside memory, none of them twice."""
    seen: set[int] = set()
    for v in values:
        pfn(v, npages, field)
        if v in seen:
            raise InvalidArgument(
                f"{field} names PFN {v:#x} twice", reason=RmpReason.DUPLICATE_PAGE
            )
        seen.add(v)
    return list(values)
