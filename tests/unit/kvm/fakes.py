"""In-memory rmp and psp behind kvm's ports, with a failure injectable at any call.

The fakes keep what kvm's rollback and teardown must give back: frames handed out, RMP entries
not in hypervisor state, NPT mappings, vCPU identities, guest contexts and activated ASIDs.
Their rules are the few the real services enforce that kvm depends on: an immutable page
refuses RMPUPDATE (FAIL_PERMISSION), SNP_PAGE_RECLAIM makes a firmware, context or pre-guest
page reclaimable, FreePages refuses a page not in hypervisor state, GCTX_CREATE takes a
firmware page, LAUNCH_FINISH makes the ASID's pre-guest pages guest-valid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from snpemu.abi.addr import PAGES_PER_2M, Pfn, Spa, pfn_to_spa, spa_to_pfn
from snpemu.abi.platform_status import PlatformState
from snpemu.abi.rmp import Code, PageState, Placement
from snpemu.abi.rmp_batch import BATCH_ENTRY
from snpemu.errors import SnpemuError, Unavailable, WrongState
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.ports import (
    Certificates,
    CopyResult,
    HostCopy,
    HostOp,
    HostRead,
    HostResult,
    HostWrite,
    LaunchFinish,
    MmuNotification,
    PlatformInfo,
    RmpEntry,
    RmpState,
    SevPlatformStatus,
    WriteResult,
)
from snpemu.kvm.vm import Run
from snpemu.runtime.peers import PeerError


def peer_error(reason: str, fw_status: int | None = None) -> PeerError:
    """The PeerError a real psp refusal decodes to."""
    e = PeerError.__new__(PeerError)
    metadata = {"fw_status": f"0x{fw_status:04x}"} if fw_status is not None else {}
    SnpemuError.__init__(e, f"psp: {reason}", reason=reason, metadata=metadata)
    e.code = grpc.StatusCode.FAILED_PRECONDITION
    e.fw_status = fw_status
    return e


class Faults:
    """Counts every port call (`rmp.allocate`, `psp.activate`, ...); the armed one raises."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.trace: list[tuple[str, int]] = []
        self.armed: tuple[str, int] | None = None
        self.error: Exception = Unavailable("injected")

    def arm(self, name: str, nth: int = 1, error: Exception | None = None) -> None:
        self.calls.clear()
        self.trace.clear()
        self.armed = (name, nth)
        self.error = error or Unavailable(f"injected failure of {name} #{nth}")

    def disarm(self) -> None:
        self.armed = None
        self.calls.clear()
        self.trace.clear()

    def hit(self, name: str) -> None:
        self.calls[name] += 1
        self.trace.append((name, self.calls[name]))
        if self.armed == (name, self.calls[name]):
            self.armed = None
            raise self.error


@dataclass
class Entry:
    state: PageState
    asid: int = 0
    immutable: bool = False
    size_2m: bool = False
    gpa: int = 0


@dataclass
class FakeRmp:
    faults: Faults
    next_pfn: int = 0x10000
    allocated: set[Pfn] = field(default_factory=set)
    leaked: set[Pfn] = field(default_factory=set)
    entries: dict[Pfn, Entry] = field(default_factory=dict)
    npt: dict[str, dict[int, Run]] = field(default_factory=dict)
    identities: set[VcpuIdentity] = field(default_factory=set)
    writes: int = 0
    host: Any = None  # TRANSITIONAL(exits-ports): kvm.host, not used by these tests

    async def call(self, method: str, request: Any, timeout: float = 30) -> Any:
        raise AssertionError(f"rmp called by name: {method}")

    def owned(self) -> set[Pfn]:
        """Frames handed out and neither freed nor leaked."""
        return self.allocated - self.leaked

    async def platform_info(self) -> PlatformInfo:
        self.faults.hit("rmp.platform_info")
        return PlatformInfo(snp_capable=True)

    async def wbinvd(self) -> None:
        self.faults.hit("rmp.wbinvd")

    async def allocate(self, count: int, placement: Placement) -> list[Pfn]:
        self.faults.hit("rmp.allocate")
        if placement == Placement.ALIGNED_2M:
            self.next_pfn += -self.next_pfn % PAGES_PER_2M
        elif placement == Placement.SNP_SAFE and self.next_pfn % PAGES_PER_2M == 0:
            self.next_pfn += 1
        pfns = [Pfn(p) for p in range(self.next_pfn, self.next_pfn + count)]
        self.next_pfn += count
        self.allocated.update(pfns)
        return pfns

    async def free(self, pfns: Sequence[Pfn]) -> None:
        self.faults.hit("rmp.free")
        for p in pfns:
            if p not in self.allocated or p in self.leaked:
                raise WrongState(f"free of PFN {p:#x}, not handed out")
            if p in self.entries:
                raise WrongState(f"free of PFN {p:#x} in state {self.entries[p].state.name}")
        self.allocated.difference_update(pfns)

    async def leak(self, pfns: Sequence[Pfn], reason: str) -> None:
        self.faults.hit("rmp.leak")
        self.leaked.update(pfns)

    def _update(self, pfn: Pfn, state: RmpState) -> Code:
        cur = self.entries.get(pfn)
        if cur is not None and cur.immutable:
            return Code.FAIL_PERMISSION
        if not state.assigned:
            self.entries.pop(pfn, None)
        elif state.immutable:
            ps = PageState.PRE_GUEST if state.asid else PageState.FIRMWARE
            self.entries[pfn] = Entry(ps, state.asid, True, state.size_2m, state.gpa)
        else:
            self.entries[pfn] = Entry(
                PageState.GUEST_INVALID, state.asid, False, state.size_2m, state.gpa
            )
        return Code.SUCCESS

    async def rmpupdate(self, spa: Spa, state: RmpState) -> Code:
        self.faults.hit("rmp.rmpupdate")
        return self._update(spa_to_pfn(spa), state)

    async def rmpupdate_batch(self, entries: bytes) -> bytes:
        self.faults.hit("rmp.rmpupdate_batch")
        batch = np.frombuffer(entries, dtype=BATCH_ENTRY)
        return bytes(
            int(
                self._update(
                    spa_to_pfn(int(e["spa"])),
                    RmpState(
                        assigned=bool(e["assigned"]),
                        gpa=int(e["gpa"]),  # type: ignore[arg-type]
                        asid=int(e["asid"]),
                        immutable=bool(e["immutable"]),
                    ),
                )
            )
            for e in batch
        )

    async def psmash(self, spa: Spa) -> Code:
        self.faults.hit("rmp.psmash")
        return Code.SUCCESS

    def _entry(self, pfn: Pfn) -> RmpEntry:
        e = self.entries.get(pfn)
        if e is None:
            return RmpEntry(pfn, PageState.HYPERVISOR, False)
        return RmpEntry(pfn, e.state, e.size_2m, True, e.asid, e.gpa, e.immutable)  # type: ignore[arg-type]

    async def read_entry(self, pfn: Pfn) -> RmpEntry:
        self.faults.hit("rmp.read_entry")
        return self._entry(pfn)

    async def read_entries(
        self, first: Pfn, count: int, *, non_default_only: bool = True
    ) -> list[RmpEntry]:
        self.faults.hit("rmp.read_entries")
        assert count <= 4096
        pfns = range(first, first + count)
        return [self._entry(Pfn(p)) for p in pfns if not non_default_only or p in self.entries]

    async def update_npt(
        self, vm_id: str, asid: int, *, map: Sequence[Run] = (), unmap: Sequence[Run] = ()
    ) -> None:
        self.faults.hit("rmp.update_npt")
        table = self.npt.setdefault(vm_id, {})
        for r in map:
            table[r.gpa] = r
        for r in unmap:
            table.pop(r.gpa, None)
        if not table:
            del self.npt[vm_id]

    async def register_identity(self, ident: VcpuIdentity) -> None:
        self.faults.hit("rmp.register_identity")
        self.identities.add(ident)

    async def revoke_identity(self, ident: VcpuIdentity) -> None:
        self.faults.hit("rmp.revoke_identity")
        self.identities.discard(ident)

    async def host_write(self, op: HostWrite) -> WriteResult:
        self.faults.hit("rmp.host_write")
        self.writes += 1
        return WriteResult(1)

    async def session_read(self, op: HostRead) -> bytes:
        raise AssertionError("the host session is the exits'")

    async def session_write(self, op: HostWrite) -> WriteResult:
        raise AssertionError("the host session is the exits'")

    async def session_copy(self, op: HostCopy) -> CopyResult:
        raise AssertionError("the host session is the exits'")

    async def session_rmpupdate_batch(self, entries: bytes) -> bytes:
        raise AssertionError("the host session is the exits'")

    async def sequence(self, ops: Sequence[HostOp]) -> list[HostResult]:
        raise AssertionError("the host session is the exits'")

    notes: list[MmuNotification | Exception] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)

    async def mmu_notifications(self) -> AsyncIterator[MmuNotification]:
        """One subscription: the queued notes up to (and raising) the first exception."""
        while self.notes:
            note = self.notes.pop(0)
            if isinstance(note, Exception):
                raise note
            yield note

    async def acknowledge(self, sequence: int) -> None:
        self.acked.append(sequence)


@dataclass
class Context:
    asid: int = 0
    started: bool = False


@dataclass
class FakePsp:
    faults: Faults
    rmp: FakeRmp
    state: PlatformState = PlatformState.UNINIT
    contexts: dict[Spa, Context] = field(default_factory=dict)
    active_asids: set[int] = field(default_factory=set)
    finished: int = 0

    async def call(self, method: str, request: Any, timeout: float = 30) -> Any:
        raise AssertionError(f"psp called by name: {method}")

    def _page(self, spa: Spa) -> Entry | None:
        return self.rmp.entries.get(spa_to_pfn(spa))

    async def platform_status(self) -> SevPlatformStatus:
        self.faults.hit("psp.platform_status")
        return SevPlatformStatus(1, 55, self.state)

    async def snp_init(self) -> None:
        self.faults.hit("psp.snp_init")

    async def snp_df_flush(self) -> None:
        self.faults.hit("psp.snp_df_flush")

    async def sev_init(self, tmr: Spa, tmr_len: int) -> None:
        self.faults.hit("psp.sev_init")
        self.state = PlatformState.INIT

    async def get_certificates(self) -> Certificates:
        self.faults.hit("psp.get_certificates")
        return Certificates(b"ark", b"ask", b"vcek", "Milan-B1")

    async def set_extended_config(self, certs_blob: bytes) -> None:
        self.faults.hit("psp.set_extended_config")

    async def gctx_create(self, gctx: Spa) -> None:
        self.faults.hit("psp.gctx_create")
        page = self._page(gctx)
        if page is None or page.state != PageState.FIRMWARE:
            raise peer_error("INVALID_PAGE_STATE", 0x0D)
        page.state = PageState.CONTEXT
        self.contexts[gctx] = Context()

    def _ctx(self, gctx: Spa) -> Context:
        ctx = self.contexts.get(gctx)
        if ctx is None:
            raise peer_error("INVALID_GUEST", 0x0A)
        return ctx

    async def launch_start(self, gctx: Spa, policy: int, gosvw: bytes = bytes(16)) -> None:
        self.faults.hit("psp.launch_start")
        self._ctx(gctx).started = True

    async def activate(self, gctx: Spa, asid: int) -> None:
        self.faults.hit("psp.activate")
        if asid in self.active_asids:
            raise peer_error("ASID_OWNED", 0x13)
        self._ctx(gctx).asid = asid
        self.active_asids.add(asid)

    async def launch_update(
        self, gctx: Spa, spa: Spa, page_type: int, *, size_2m: bool = False
    ) -> None:
        self.faults.hit("psp.launch_update")
        ctx = self._ctx(gctx)
        page = self._page(spa)
        if page is None or page.state != PageState.PRE_GUEST or page.asid != ctx.asid:
            raise peer_error("INVALID_PAGE_STATE", 0x0D)

    async def launch_finish(self, gctx: Spa, finish: LaunchFinish) -> bytes:
        self.faults.hit("psp.launch_finish")
        ctx = self._ctx(gctx)
        for e in self.rmp.entries.values():
            if e.state == PageState.PRE_GUEST and e.asid == ctx.asid:
                e.state, e.immutable = PageState.GUEST_VALID, False
        self.finished += 1
        return bytes(48)

    async def decommission(self, gctx: Spa) -> None:
        self.faults.hit("psp.decommission")
        ctx = self._ctx(gctx)
        del self.contexts[gctx]
        self.active_asids.discard(ctx.asid)
        page = self._page(gctx)
        assert page is not None and page.state == PageState.CONTEXT
        page.state = PageState.FIRMWARE

    async def page_reclaim(self, spa: Spa, *, size_2m: bool = False) -> None:
        self.faults.hit("psp.page_reclaim")
        page = self._page(spa)
        reclaimable = (PageState.FIRMWARE, PageState.PRE_GUEST)
        if page is None or page.state not in reclaimable:
            raise peer_error("INVALID_PAGE_STATE", 0x0D)
        page.state, page.immutable, page.asid = PageState.RECLAIM, False, 0

    async def guest_request(self, gctx: Spa, req: Spa, res: Spa) -> None:
        raise AssertionError("guest requests are the exits'")


def spas(pfns: Sequence[Pfn]) -> list[Spa]:
    return [pfn_to_spa(p) for p in pfns]
