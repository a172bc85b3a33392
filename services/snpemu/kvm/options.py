"""kvm settings from the environment, checked at start.

SNPEMU_KVM_SNP             1 | 0: enable SNP (like kvm_amd's sev_snp parameter; default 1)
SNPEMU_KVM_FIRMWARE        default guest firmware (Debian ovmf: /usr/share/OVMF/OVMF_CODE.fd)
SNPEMU_KVM_THROTTLE_MS     default per-VM guest-request interval in ms, 0 = none (default 0)
SNPEMU_KVM_THROTTLE_BURST  default burst (default 1)
SNPEMU_KVM_PEER_WAIT_S     how long start-up waits for rmp and psp before coming up with SNP
                           off, as kvm_amd does when the firmware is unavailable (default 30)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from snpemu.hostconfig import ConfigError, count, number
from snpemu.kvm.machine import DEFAULT_FIRMWARE


@dataclass(frozen=True)
class KvmOptions:
    snp: bool
    firmware: str
    throttle_ms: int
    throttle_burst: int
    peer_wait_s: float
    # Not from the environment: the clock of the throttles and of the start-up wait (seconds,
    # monotonic). An in-process caller (a test) may hand kvm a clock it drives itself.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KvmOptions:
        env = {"SNPEMU_KVM_THROTTLE_MS": "0", "SNPEMU_KVM_THROTTLE_BURST": "1", **env}
        snp = env.get("SNPEMU_KVM_SNP", "1")
        if snp not in ("0", "1"):
            raise ConfigError(f"SNPEMU_KVM_SNP={snp!r}: 1 or 0")
        return cls(
            snp=snp == "1",
            firmware=env.get("SNPEMU_KVM_FIRMWARE", DEFAULT_FIRMWARE),
            throttle_ms=count(env, "SNPEMU_KVM_THROTTLE_MS", 0, 3_600_000),
            throttle_burst=count(env, "SNPEMU_KVM_THROTTLE_BURST", 1, 1000),
            peer_wait_s=number(env, "SNPEMU_KVM_PEER_WAIT_S", "30", 3600),
        )
