"""kvm settings from the environment, checked at start.

SNPEMU_KVM_SNP             1 | 0: enable SNP (like kvm_amd's sev_snp parameter; default 1)
SNPEMU_KVM_FIRMWARE        default guest firmware (Debian ovmf: /usr/share/OVMF/OVMF_CODE.fd)
SNPEMU_KVM_IMAGE_DIR       the only directory a VmConfig's *_path may name files in (absolute;
                           default: the default firmware's directory)
SNPEMU_KVM_MAX_FIRMWARE_MIB / _MAX_KERNEL_MIB / _MAX_INITRD_MIB
                           the largest image of each kind kvm takes (default 16 / 64 / 256)
SNPEMU_KVM_THROTTLE_MS     default per-VM guest-request interval in ms, 0 = none (default 0)
SNPEMU_KVM_THROTTLE_BURST  default burst (default 1)
SNPEMU_KVM_PEER_WAIT_S     how long start-up waits for rmp and psp before coming up with SNP
                           off, as kvm_amd does when the firmware is unavailable (default 30)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from snpemu.hostconfig import ConfigError, count, number
from snpemu.kvm.images import MIB, ImageLimits, ImageStore
from snpemu.kvm.machine import DEFAULT_FIRMWARE


@dataclass(frozen=True)
class KvmOptions:
    snp: bool
    firmware: str
    throttle_ms: int
    throttle_burst: int
    peer_wait_s: float
    image_dir: str = os.path.dirname(DEFAULT_FIRMWARE)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # seconds between asking the firmware for its state (kvm/firmware_watch.py); 0: kvm does
    # not follow its firmware (a reset goes unnoticed, as before the watch existed)
    firmware_poll_s: float = 0.5
    # Not from the environment: the clock of the throttles and of the start-up wait (seconds,
    # monotonic). An in-process caller (a test) may hand kvm a clock it drives itself.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KvmOptions:
        env = {
            "SNPEMU_KVM_THROTTLE_MS": "0",
            "SNPEMU_KVM_THROTTLE_BURST": "1",
            "SNPEMU_KVM_MAX_FIRMWARE_MIB": "16",
            "SNPEMU_KVM_MAX_KERNEL_MIB": "64",
            "SNPEMU_KVM_MAX_INITRD_MIB": "256",
            **env,
        }
        snp = env.get("SNPEMU_KVM_SNP", "1")
        if snp not in ("0", "1"):
            raise ConfigError(f"SNPEMU_KVM_SNP={snp!r}: 1 or 0")
        firmware = env.get("SNPEMU_KVM_FIRMWARE", DEFAULT_FIRMWARE)
        if not os.path.isabs(firmware):
            raise ConfigError(f"SNPEMU_KVM_FIRMWARE={firmware[:64]!r}: an absolute path")
        image_dir = env.get("SNPEMU_KVM_IMAGE_DIR") or os.path.dirname(firmware)
        if not os.path.isabs(image_dir):
            raise ConfigError(f"SNPEMU_KVM_IMAGE_DIR={image_dir[:64]!r}: an absolute path")
        limits = ImageLimits(
            firmware=count(env, "SNPEMU_KVM_MAX_FIRMWARE_MIB", 1, 256) * MIB,
            kernel=count(env, "SNPEMU_KVM_MAX_KERNEL_MIB", 1, 1024) * MIB,
            initrd=count(env, "SNPEMU_KVM_MAX_INITRD_MIB", 1, 2048) * MIB,
        )
        return cls(
            snp=snp == "1",
            firmware=firmware,
            throttle_ms=count(env, "SNPEMU_KVM_THROTTLE_MS", 0, 3_600_000),
            throttle_burst=count(env, "SNPEMU_KVM_THROTTLE_BURST", 1, 1000),
            peer_wait_s=number(env, "SNPEMU_KVM_PEER_WAIT_S", "30", 3600),
            image_dir=image_dir,
            image_limits=limits,
            firmware_poll_s=number(env, "SNPEMU_KVM_FIRMWARE_POLL_S", "0.5", 60),
        )

    def images(self) -> ImageStore:
        """Where kvm reads the images a VmConfig names (the Kvm's `images`)."""
        return ImageStore(self.image_dir, self.firmware, self.image_limits)
