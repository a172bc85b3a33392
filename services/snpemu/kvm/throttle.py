"""Per-VM guest-request rate limit (token bucket), with an injectable clock.

From "kvm: sev: Add SNP guest request throttling" v5 (KVM_SEV_SNP_SET_REQUEST_THROTTLE_RATE
{interval_ms, burst}): over the limit KVM answers VMM BUSY without calling the firmware. The
2021 SNP host series left this as a TODO (ratelimit_default_init on snp_guest_msg_rs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
