"""What kvm needs from rmp (the host's memory, RMP and page allocator) and from psp (the
firmware), as typed ports.

kvm's model talks to its peers only through these; kvm/rmp_client.py and kvm/psp_client.py
implement them over gRPC, unit tests over in-memory fakes. Errors: a peer that cannot be
reached raises `Unavailable`; one that refuses raises `runtime.peers.PeerError` (with the
firmware's status in `fw_status` when it was a firmware command).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from snpemu.abi.addr import Gpa, Pfn, Spa
from snpemu.abi.platform_status import PlatformState
from snpemu.abi.rmp import AccessOrigin, Code, PageState, Placement
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.vm import Run

# --- rmp ------------------------------------------------------------------------------------

GPA_NONE = Gpa(0)  # the GPA of a page no guest has


@dataclass(frozen=True)
class RmpState:
    """struct rmp_state as RMPUPDATE takes it (KERNEL: arch/x86/include/asm/sev.h)."""

    assigned: bool
    gpa: Gpa = GPA_NONE
    asid: int = 0
    immutable: bool = False
    size_2m: bool = False


SHARED = RmpState(assigned=False)


@dataclass(frozen=True)
class RmpEntry:
    pfn: Pfn
    state: PageState
    size_2m: bool
    assigned: bool = False
    asid: int = 0
    gpa: Gpa = GPA_NONE
    immutable: bool = False
    vmsa: bool = False
    validated: bool = False


@dataclass(frozen=True)
class PlatformInfo:
    snp_capable: bool


@dataclass(frozen=True)
class MmuNotification:
    """rmp asks kvm to kick (or terminate) the vCPUs of an ASID, then to acknowledge."""

    sequence: int
    asid: int
    pfn: Pfn
    reason: str
    terminate: bool


# The host session's ops (rmp.proto HostSessionRequest): kvm's exit path sends several in one
# message (`sequence`), answered in order.


@dataclass(frozen=True)
class HostRead:
    spa: Spa
    length: int


@dataclass(frozen=True)
class HostWrite:
    spa: Spa
    data: bytes
    origin: AccessOrigin = AccessOrigin.KERNEL
    writer: str = "kvm"


@dataclass(frozen=True)
class HostCopy:
    """A memcpy from src to dst (the write through the violation policy), answering the first
    `peek` bytes copied."""

    src: Spa
    dst: Spa
    length: int
    origin: AccessOrigin = AccessOrigin.KERNEL
    writer: str = "kvm"
    peek: int = 0


@dataclass(frozen=True)
class RmpUpdateBatch:
    """Packed abi/rmp_batch.py entries."""

    entries: bytes


HostOp = HostRead | HostWrite | HostCopy | RmpUpdateBatch


@dataclass(frozen=True)
class ReadResult:
    data: bytes


@dataclass(frozen=True)
class WriteResult:
    outcome: int  # snp.rmp.v1.ViolationOutcome


@dataclass(frozen=True)
class CopyResult:
    outcome: int
    head: bytes


@dataclass(frozen=True)
class BatchResult:
    codes: bytes  # one Code per entry


HostResult = ReadResult | WriteResult | CopyResult | BatchResult


class RmpPort(Protocol):
    # host bring-up
    async def platform_info(self) -> PlatformInfo: ...
    async def wbinvd(self) -> None: ...

    # the frame allocator
    async def allocate(self, count: int, placement: Placement) -> list[Pfn]: ...
    async def free(self, pfns: Sequence[Pfn]) -> None: ...
    async def leak(self, pfns: Sequence[Pfn], reason: str) -> None: ...

    # the RMP
    async def rmpupdate(self, spa: Spa, state: RmpState) -> Code: ...
    async def rmpupdate_batch(self, entries: bytes) -> bytes:
        """RMPUPDATE of packed abi/rmp_batch.py entries (unary); one Code per entry."""
        ...

    async def psmash(self, spa: Spa) -> Code: ...
    async def read_entry(self, pfn: Pfn) -> RmpEntry: ...
    async def read_entries(
        self, first: Pfn, count: int, *, non_default_only: bool = True
    ) -> list[RmpEntry]:
        """The entries of count PFNs from first (at most 4096), only those not in their
        default state when non_default_only."""
        ...

    # the VM's nested page table and its vCPUs' identities
    async def update_npt(
        self, vm_id: str, asid: int, *, map: Sequence[Run] = (), unmap: Sequence[Run] = ()
    ) -> None: ...
    async def register_identity(self, ident: VcpuIdentity) -> None: ...
    async def revoke_identity(self, ident: VcpuIdentity) -> None: ...

    # host accesses to guest memory: a unary write (the VMM's launch) and the session
    async def host_write(self, op: HostWrite) -> WriteResult: ...
    async def session_read(self, op: HostRead) -> bytes: ...
    async def session_write(self, op: HostWrite) -> WriteResult: ...
    async def session_copy(self, op: HostCopy) -> CopyResult: ...
    async def session_rmpupdate_batch(self, entries: bytes) -> bytes: ...
    async def sequence(self, ops: Sequence[HostOp]) -> list[HostResult]:
        """The ops in one session message, answered in order; an op that failed raises."""
        ...

    # MMU notifications (kicks)
    def mmu_notifications(self) -> AsyncIterator[MmuNotification]: ...
    async def acknowledge(self, sequence: int) -> None: ...


# --- psp ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SevPlatformStatus:
    api_major: int
    api_minor: int
    state: PlatformState | int


@dataclass(frozen=True)
class Certificates:
    ark_der: bytes
    ask_der: bytes
    vcek_der: bytes
    product_name: str


@dataclass(frozen=True)
class LaunchFinish:
    """SNP_LAUNCH_FINISH's inputs besides the context."""

    id_block: bytes = b""
    id_auth: bytes = b""
    id_block_en: bool = False
    auth_key_en: bool = False
    vcek_disabled: bool = False
    host_data: bytes = b""


class PspPort(Protocol):
    # platform
    async def platform_status(self) -> SevPlatformStatus: ...
    async def snp_init(self) -> None: ...
    async def snp_df_flush(self) -> None: ...
    async def sev_init(self, tmr: Spa, tmr_len: int) -> None: ...
    async def get_certificates(self) -> Certificates: ...
    async def set_extended_config(self, certs_blob: bytes) -> None: ...

    # a guest's launch, keyed by its context page
    async def gctx_create(self, gctx: Spa) -> None: ...
    async def launch_start(self, gctx: Spa, policy: int, gosvw: bytes = bytes(16)) -> None: ...
    async def activate(self, gctx: Spa, asid: int) -> None: ...
    async def launch_update(
        self, gctx: Spa, spa: Spa, page_type: int, *, size_2m: bool = False
    ) -> None: ...
    async def launch_finish(self, gctx: Spa, finish: LaunchFinish) -> bytes:
        """The launch measurement."""
        ...

    async def decommission(self, gctx: Spa) -> None: ...
    async def page_reclaim(self, spa: Spa, *, size_2m: bool = False) -> None: ...

    # a running guest's messages to the firmware (SNP_GUEST_REQUEST)
    async def guest_request(self, gctx: Spa, req: Spa, res: Spa) -> None: ...
