"""The host as the guest agent reaches it, in plain values: kvm's exits and the VMM's control of
its VM, rmp's guest-mode instructions and accesses, and netd's vhost-user side.

The guest kernel and its drivers hold these Protocols; guest/kvm_client.py, rmp_client.py and
netd_client.py implement them over gRPC. A vCPU is named by the `VcpuIdentity` kvm issued
(kvm/identity.py), which the adapters put on the wire with every exit and access.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from snpemu.abi.addr import Gpa
from snpemu.kvm.config import VmConfig
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.ports import LaunchFinish as LaunchFinish  # SnpLaunchFinish's inputs too

# --- kvm: the exits of a vCPU ---------------------------------------------------------------


@dataclass(frozen=True)
class VmmExit:
    """An exit kvm handed on to the VMM (kvm.proto KvmExit): KVM_EXIT_HYPERCALL's nr and args.
    The guest is not resumed until the VMM's run_vcpu() completes it."""

    exit_reason: int
    nr: int
    args: tuple[int, ...]


@dataclass(frozen=True)
class MsrReply:
    ghcb_msr: int
    terminated: bool = False
    exit: VmmExit | None = None


@dataclass(frozen=True)
class GhcbReply:
    """kvm's answer to a VMGEXIT: the exit infos it wrote back and the GHCB page as it left it
    (empty when the guest terminated)."""

    sw_exit_info_1: int
    sw_exit_info_2: int
    terminated: bool
    ghcb: bytes
    exit: VmmExit | None = None


@dataclass(frozen=True)
class NpfReply:
    action: str  # what kvm did: "psmash", "convert", "spurious", "terminate"
    retry: bool


class Exits(Protocol):
    async def vmgexit_msr(self, vcpu: VcpuIdentity, value: int) -> MsrReply: ...
    async def vmgexit(self, vcpu: VcpuIdentity, ghcb: bytes) -> GhcbReply: ...
    async def nested_page_fault(
        self, vcpu: VcpuIdentity, gpa: Gpa, error_code: int
    ) -> NpfReply: ...


# --- kvm: the VMM's side ------------------------------------------------------------------


@dataclass(frozen=True)
class VmHandle:
    """A VM as kvm's CreateVm named it: its id, and the token that is the VM fd (every call
    on the VM carries it; see kvm/handles.py)."""

    id: str
    token: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Launched:
    measurement: bytes
    vcpus: tuple[VcpuIdentity, ...]


@dataclass(frozen=True)
class VmStatus:
    term_reason_set: int
    term_reason_code: int


class Hold(Protocol):
    """A stream the holder keeps open (a VM fd, a vhost-user socket)."""

    async def wait(self) -> None:
        """Until the stream ends (the peer went away); raises when it broke."""
        ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class MemoryRegion:
    """struct kvm_userspace_memory_region2 (KERNEL: include/uapi/linux/kvm.h)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int
    guest_memfd_offset: int = 0


@dataclass(frozen=True)
class LaunchUpdate:
    """struct kvm_sev_snp_launch_update, with the bytes at uaddr (KERNEL:
    arch/x86/include/uapi/asm/kvm.h)."""

    gfn_start: int
    uaddr: int
    len: int
    type: int
    source: bytes = field(default=b"", repr=False)


class Vmm(Protocol):
    async def create_vm(self, config: VmConfig | None, memory_model: int = 0) -> VmHandle:
        """With a config, the VM built for it (LaunchVm launches it); without, the VM alone.
        memory_model: kvm.proto MemoryModel (0: kvm's default)."""
        ...

    async def hold_vm(self, vm: VmHandle) -> Hold:
        """The VM held as a VMM holds its VM fd (kvm destroys it when the hold goes), once kvm
        has confirmed the hold."""
        ...

    async def launch_vm(self, vm: VmHandle) -> Launched: ...

    # the ioctls QEMU makes, one RPC each (kvm.proto)
    async def snp_init2(self, vm: VmHandle, vmsa_features: int, ghcb_version: int) -> None: ...
    async def enable_cap(self, vm: VmHandle, cap: int, args: tuple[int, ...]) -> None: ...
    async def run_vcpu(self, vm: VmHandle, vcpu_id: int, ret: int) -> MsrReply | GhcbReply:
        """KVM_RUN after an exit handed to the VMM: the completed exit's answer, in the kind
        of the exit it came from (or the next exit)."""
        ...

    async def create_guest_memfd(self, vm: VmHandle, size: int) -> int: ...
    async def set_memory_region(self, vm: VmHandle, region: MemoryRegion) -> None: ...
    async def set_memory_attributes(
        self, vm: VmHandle, address: int, size: int, private: bool
    ) -> None: ...
    async def create_vcpu(
        self, vm: VmHandle, vcpu_id: int, reset_eip: int, vcpu_type: int
    ) -> VcpuIdentity: ...
    async def snp_launch_start(self, vm: VmHandle, policy: int) -> None: ...
    async def snp_launch_update(self, vm: VmHandle, update: LaunchUpdate) -> LaunchUpdate:
        """The update advanced past the pages done, as KVM writes it back."""
        ...

    async def snp_launch_finish(self, vm: VmHandle, finish: LaunchFinish) -> bytes:
        """The measurement."""
        ...

    async def set_guest_request_throttle(
        self, vm: VmHandle, interval_ms: int, burst: int
    ) -> None: ...
    async def get_vm(self, vm: VmHandle) -> VmStatus: ...
    async def destroy_vm(self, vm: VmHandle) -> None: ...


# --- rmp: guest-mode instructions and accesses --------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A guest access or instruction that did not complete: #VC to the guest, or #NPF to kvm
    with its EXITINFO1 error code."""

    vc: bool
    npf: bool
    error_code: int
    gpa: Gpa
    cause: str


@dataclass(frozen=True)
class Read:
    data: bytes
    fault: Fault | None


@dataclass(frozen=True)
class Instruction:
    """PVALIDATE or RMPADJUST: EAX (an abi.rmp.Code value) when it completed."""

    eax: int
    fault: Fault | None


@dataclass(frozen=True)
class Batch:
    codes: bytes  # one result code per page executed; fewer than asked when a page faulted
    fault: Fault | None


class GuestRmp(Protocol):
    async def read(self, vcpu: VcpuIdentity, gpa: Gpa, length: int, *, private: bool) -> Read:
        """On the vCPU's session stream; a refusal raises as an in-band session error."""
        ...

    async def write(
        self, vcpu: VcpuIdentity, gpa: Gpa, data: bytes, *, private: bool
    ) -> Fault | None: ...
    async def pvalidate_batch(
        self, vcpu: VcpuIdentity, gpas: Sequence[Gpa], *, validate: bool
    ) -> Batch: ...
    async def read_call(self, vcpu: VcpuIdentity, gpa: Gpa, length: int, *, private: bool) -> Read:
        """A read as a call of its own, off the session: a refusal raises PeerError."""
        ...

    async def pvalidate(
        self, vcpu: VcpuIdentity, gpa: Gpa, *, size_2m: bool, validate: bool
    ) -> Instruction: ...
    async def rmpadjust(
        self, vcpu: VcpuIdentity, gpa: Gpa, *, target_vmpl: int, perms: int, vmsa: bool
    ) -> Instruction:
        """A 4K RMPADJUST."""
        ...


# --- netd: the vhost-user backend ---------------------------------------------------------
# (the Netd port itself, on DeviceRef handles with their tokens, is in guest/netdev.py)


class Queue(enum.IntEnum):
    """Values match snp.netd.v1.Queue."""

    RX = 1
    TX = 2


class PacketResult(enum.StrEnum):
    """What netd did with one TX packet (snp.netd.v1.PacketResult, by name)."""

    UNSPECIFIED = "unspecified"
    DELIVERED = "delivered"
    CONVERTED = "converted"
    NO_ROUTE = "no_route"
    NO_BUFFER = "no_buffer"
    REFUSED = "refused"
    BAD_FRAME = "bad_frame"


@dataclass(frozen=True)
class Ring:
    ring_gpa: Gpa
    buffers_gpa: Gpa
    entries: int
    buffer_size: int


@dataclass(frozen=True)
class DeviceHold:
    hold: Hold
    daemon_boot_id: str  # changes each time netd starts
