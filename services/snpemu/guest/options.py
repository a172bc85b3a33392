"""Guest agent settings from the environment, checked at start.

SNPEMU_GUEST_MEMORY         guest RAM, e.g. 256M (default 256M, at most 512G; 2 MiB multiple)
SNPEMU_GUEST_VCPUS          vCPUs (default 2)
SNPEMU_GUEST_VCPU_TYPE      EPYC | EPYC-Rome | EPYC-Milan | EPYC-Genoa | EPYC-Turin (EPYC-Milan)
SNPEMU_GUEST_POLICY         guest policy (default 0x30000)
SNPEMU_GUEST_FIRMWARE       firmware image (default: kvm's, Debian's OVMF)
SNPEMU_GUEST_KERNEL / _INITRD / _CMDLINE   measured direct boot (kernel hashes)
SNPEMU_GUEST_HOST_DATA      32 bytes as 64 hex digits (default zeros)
SNPEMU_GUEST_THROTTLE_MS / _BURST          this VM's guest-request throttle (0: kvm's default)
SNPEMU_GUEST_ACCEPT         eager | lazy: validate all memory at boot, or on first touch (lazy)
SNPEMU_GUEST_ON_VC          terminate | log: what a #VC for an unvalidated page does (terminate)
SNPEMU_GUEST_BOOT           1 | 0: launch and boot at start (1)
SNPEMU_GUEST_MEMORY_MODEL   v5 | gmem: the kind of SNP VM (kvm.proto MemoryModel; v5)
SNPEMU_GUEST_RETRY_DELAY_S / _RETRY_TIMEOUT_S  VMM BUSY retry delay and give-up time (2, 60)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snpemu.abi.vcpu_type import VCPU_TYPES, vcpu_type_of
from snpemu.hostconfig import ConfigError, count, number
from snpemu.rmp.options import parse_size

# kvm.proto MemoryModel by name; the first is the default
MEMORY_MODELS = {"v5": 2, "gmem": 1}


@dataclass(frozen=True)
class GuestOptions:
    memory_bytes: int
    vcpus: int
    vcpu_type: int
    policy: int
    firmware: str
    kernel: str
    initrd: str
    cmdline: str
    host_data: bytes
    throttle_ms: int
    throttle_burst: int
    eager: bool
    terminate_on_vc: bool
    boot: bool
    retry_delay_s: float
    retry_timeout_s: float
    memory_model: int = 0  # kvm.proto MemoryModel

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GuestOptions:
        d = {
            "SNPEMU_GUEST_VCPUS": "2",
            "SNPEMU_GUEST_THROTTLE_MS": "0",
            "SNPEMU_GUEST_THROTTLE_BURST": "1",
            **env,
        }
        vtype = d.get("SNPEMU_GUEST_VCPU_TYPE", "EPYC-Milan")
        if vtype not in VCPU_TYPES.values():
            raise ConfigError(
                f"SNPEMU_GUEST_VCPU_TYPE={vtype!r}: one of {', '.join(VCPU_TYPES.values())}"
            )
        try:
            policy = int(d.get("SNPEMU_GUEST_POLICY", "0x30000"), 0)
        except ValueError:
            raise ConfigError(
                f"SNPEMU_GUEST_POLICY={d['SNPEMU_GUEST_POLICY']!r}: not a number"
            ) from None
        host_hex = d.get("SNPEMU_GUEST_HOST_DATA", "")
        try:
            host_data = bytes.fromhex(host_hex) if host_hex else b""
        except ValueError:
            host_data = b"x"
        if host_data and len(host_data) != 32:
            raise ConfigError("SNPEMU_GUEST_HOST_DATA: 64 hex digits (32 bytes)")
        choices = {
            "SNPEMU_GUEST_ACCEPT": ("lazy", "eager"),
            "SNPEMU_GUEST_ON_VC": ("terminate", "log"),
            "SNPEMU_GUEST_BOOT": ("1", "0"),
            "SNPEMU_GUEST_MEMORY_MODEL": tuple(MEMORY_MODELS),
        }
        for name, allowed in choices.items():
            if d.get(name, allowed[0]) not in allowed:
                raise ConfigError(f"{name}={d[name]!r}: one of {', '.join(allowed)}")
        memory = parse_size("SNPEMU_GUEST_MEMORY", d.get("SNPEMU_GUEST_MEMORY", "256M"))
        if not 16 << 20 <= memory <= 512 << 30 or memory % (2 << 20):
            raise ConfigError("SNPEMU_GUEST_MEMORY: a multiple of 2 MiB in 16 MiB .. 512 GiB")
        return cls(
            memory_bytes=memory,
            vcpus=count(d, "SNPEMU_GUEST_VCPUS", 1, 64),
            vcpu_type=vcpu_type_of(vtype),
            policy=policy,
            firmware=d.get("SNPEMU_GUEST_FIRMWARE", ""),
            kernel=d.get("SNPEMU_GUEST_KERNEL", ""),
            initrd=d.get("SNPEMU_GUEST_INITRD", ""),
            cmdline=d.get("SNPEMU_GUEST_CMDLINE", ""),
            host_data=host_data,
            throttle_ms=count(d, "SNPEMU_GUEST_THROTTLE_MS", 0, 3_600_000),
            throttle_burst=count(d, "SNPEMU_GUEST_THROTTLE_BURST", 1, 1000),
            eager=d.get("SNPEMU_GUEST_ACCEPT", "lazy") == "eager",
            terminate_on_vc=d.get("SNPEMU_GUEST_ON_VC", "terminate") == "terminate",
            boot=d.get("SNPEMU_GUEST_BOOT", "1") == "1",
            retry_delay_s=number(d, "SNPEMU_GUEST_RETRY_DELAY_S", "2", 60),
            retry_timeout_s=number(d, "SNPEMU_GUEST_RETRY_TIMEOUT_S", "60", 3600),
            memory_model=MEMORY_MODELS[d.get("SNPEMU_GUEST_MEMORY_MODEL", "v5")],
        )
