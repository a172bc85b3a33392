"""A VM's configuration as kvm's model takes it: decoded from snp.kvm.v1.VmConfig once, by the
servicer, which encodes it back for GetVm as it came, but for the images' bytes: CreateVm keeps
what it read of them (`images`) instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snpemu.kvm.images import LaunchImages


@dataclass(frozen=True)
class ThrottleConfig:
    interval_ms: int = 0  # 0: the host's default throttle
    burst: int = 0


@dataclass(frozen=True)
class VmConfig:
    memory_bytes: int
    vcpus: int
    vcpu_type: int = 0  # snp.kvm.v1.VcpuType; 0: EPYC-Milan
    policy: int = 0  # 0: the default policy (abi/policy.py DEFAULT)
    firmware_path: str = ""
    kernel_path: str = ""
    initrd_path: str = ""
    cmdline: str = ""
    id_block: bytes = b""
    id_auth: bytes = b""
    author_key_en: bool = False
    vcek_disabled: bool = False
    host_data: bytes = b""
    guest_features: int = 0
    throttle: ThrottleConfig | None = None  # None: not given (kept so GetVm echoes it)
    # the images themselves, instead of a path (kvm/images.py)
    firmware: bytes = field(default=b"", repr=False)
    kernel: bytes = field(default=b"", repr=False)
    initrd: bytes = field(default=b"", repr=False)
    # Never on the wire: what CreateVm read of the images, for LaunchVm.
    images: LaunchImages | None = field(default=None, repr=False, compare=False)
