"""rmp settings from the environment, checked at start.

SNPEMU_RMP_MEMORY          host memory, e.g. 8G, 64GiB, 512M (default 8G; 2 MiB multiple)
SNPEMU_RMP_IOMMU           translated | passthrough | off (default translated; SNP needs translated)
SNPEMU_RMP_POLICY          sigbus | convert | convert-kill | gmem (default gmem, what merged)
SNPEMU_RMP_INSN_HOLD_US    microseconds a guest PVALIDATE/RMPADJUST holds its entry (default 0)
SNPEMU_RMP_KICK_TIMEOUT_S  how long a conversion waits for kvm to acknowledge a kick (default 2)
SNPEMU_RMP_MAP_LEAK_S      a host map held longer than this is reported stale (default 30)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from snpemu.errors import InvalidArgument
from snpemu.hostconfig import ConfigError, number
from snpemu.rmp.machine import IommuMode
from snpemu.rmp.violations import Policy

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_MEMORY = 1 << 40


def parse_size(name: str, raw: str) -> int:
    m = _SIZE.match(raw)
    if not m:
        raise ConfigError(f"{name}={raw!r}: expected a size such as 8G or 512MiB")
    value = int(m[1]) * _UNITS[m[2].upper()]
    if value <= 0 or value % (2 << 20) or value > MAX_MEMORY:
        raise ConfigError(f"{name}={raw!r}: must be a multiple of 2 MiB, at most 1 TiB")
    return value


@dataclass(frozen=True)
class RmpOptions:
    memory_bytes: int
    iommu: IommuMode
    policy: Policy
    hold_s: float
    kick_timeout_s: float
    map_leak_s: float
    # Not from the environment: the clock of the instruction holds and of the host-map ages
    # (seconds, monotonic). An in-process caller (a test) may hand rmp a clock it drives itself.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    # ... and the timer of the kick timeout (awaits that many seconds)
    sleep: Callable[[float], Awaitable[None]] = field(
        default=asyncio.sleep, repr=False, compare=False
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RmpOptions:
        iommu_raw = env.get("SNPEMU_RMP_IOMMU", "translated")
        try:
            iommu = IommuMode[iommu_raw.upper()]
        except KeyError:
            raise ConfigError(
                f"SNPEMU_RMP_IOMMU={iommu_raw!r}: one of translated, passthrough, off"
            ) from None
        try:
            policy = Policy.parse(env.get("SNPEMU_RMP_POLICY", "gmem"))
        except InvalidArgument as e:
            raise ConfigError(f"SNPEMU_RMP_POLICY: {e.message}") from None
        return cls(
            memory_bytes=parse_size("SNPEMU_RMP_MEMORY", env.get("SNPEMU_RMP_MEMORY", "8G")),
            iommu=iommu,
            policy=policy,
            hold_s=number(env, "SNPEMU_RMP_INSN_HOLD_US", "0", 1e6) / 1e6,
            kick_timeout_s=number(env, "SNPEMU_RMP_KICK_TIMEOUT_S", "2", 60),
            map_leak_s=number(env, "SNPEMU_RMP_MAP_LEAK_S", "30", 86400),
        )
