"""Per-VM guest-request rate limit (token bucket), with an injectable clock.

From "kvm: sev: Add SNP guest request throttling" v5 (KVM_SEV_SNP_SET_REQUEST_THROTTLE_RATE
{interval_ms, burst}): over the limit KVM answers VMM BUSY without calling the firmware. The
2021 SNP host series left this as a TODO (ratelimit_default_init on snp_guest_msg_rs).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from snpemu.errors import InvalidArgument

# UNVERIFIED(throttle-bounds): the v5 patch takes any u32 pair; these bounds (an hour, a
# thousand requests) are snpemu's, applied alike by CreateVm and SetGuestRequestThrottle.
MAX_INTERVAL_MS = 3_600_000
MAX_BURST = 1000


class ThrottleReason(enum.StrEnum):
    THROTTLE_OUT_OF_RANGE = "THROTTLE_OUT_OF_RANGE"


def check_throttle(interval_ms: int, burst: int) -> None:
    """The one rule both RPCs that set a throttle apply; interval 0 turns it off."""
    if interval_ms > MAX_INTERVAL_MS or (interval_ms and not 1 <= burst <= MAX_BURST):
        raise InvalidArgument(
            f"throttle interval_ms {interval_ms}, burst {burst}: interval_ms must be "
            f"0..{MAX_INTERVAL_MS} and, when not 0, burst 1..{MAX_BURST}",
            reason=ThrottleReason.THROTTLE_OUT_OF_RANGE,
        )


@dataclass
class Throttle:
    interval_ms: int = 0  # 0: no limit
    burst: int = 1
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(default=0.0, init=False)
    _last: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._last = self.clock()

    def allow(self) -> bool:
        if self.interval_ms == 0:
            return True
        now = self.clock()
        rate = 1000.0 / self.interval_ms  # tokens per second
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
