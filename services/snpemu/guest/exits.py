"""The guest kernel's state and how its vCPU leaves guest mode: VMGEXIT (MSR protocol and
GHCB) and #NPF to kvm, with the identity kvm issued, and TERM_REQUEST.

KERNEL: arch/x86/coco/sev/core.c, arch/x86/boot/compressed/sev.c (sev_es_terminate).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from snpemu.abi import ghcb as g
from snpemu.abi import msr_protocol as msr
from snpemu.abi.addr import Gpa, pages
from snpemu.errors import WrongState
from snpemu.guest import vmm_exits
from snpemu.guest.errors import GuestReason, Terminated
from snpemu.guest.options import MEMORY_MODELS, GuestOptions
from snpemu.guest.ports import (
    Exits,
    Fault,
    GhcbReply,
    GuestRmp,
    Hold,
    MsrReply,
    NpfReply,
    VmHandle,
    Vmm,
)
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.identity import VcpuIdentity
from snpemu.runtime.peers import PeerError
from snpemu.vmm import memory_layout

log = logging.getLogger(__name__)
T = TypeVar("T")

# GHCB termination reasons (arch/x86/include/asm/sev-common.h)
TERM_GEN, TERM_LINUX = 0, 1
GEN_REQ, GEN_PROT_UNSUPPORTED, GEN_SNP_UNSUPPORTED = 0, 1, 2
LINUX_REGISTER, LINUX_PSC, LINUX_PVALIDATE, LINUX_SECRETS_PAGE = 0, 1, 2, 6


class BootState(enum.IntEnum):
    """Values match snp.guest.v1.BootState."""

    CREATED = 1
    LAUNCHING = 2
    BOOTING = 3
    RUNNING = 4
    TERMINATED = 5


@dataclass
class Event:
    kind: str
    gpa: int = 0
    detail: str = ""
    timestamp_ns: int = field(default_factory=time.time_ns)


class VcpuExits:
    def __init__(
        self,
        name: str,
        opts: GuestOptions,
        *,
        exits: Exits,
        vmm: Vmm,
        rmp: GuestRmp,
        default_firmware: str,
    ) -> None:
        self.name, self.opts = name, opts
        self.exits, self.vmm, self.rmp = exits, vmm, rmp
        # the guest's clock and delay (jiffies, schedule_timeout_killable()) for the
        # guest-request retry loop and the report flood; a test sets its own so nothing waits
        # for real
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.firmware = opts.firmware or default_firmware
        self.events: list[Event] = []
        self.exit_lock = asyncio.Lock()  # _one_exit()
        # totals survive the trimming of `events` (Prometheus counters never go down)
        self.event_counts: dict[str, int] = {}
        self.forget_vm()

    def forget_vm(self) -> None:
        """The state of a VM that is gone, dropped before the next one boots: the keys and
        sequence numbers of its secrets page, its accepted memory, its vCPUs."""
        opts = self.opts
        self.state = BootState.CREATED
        self.term_reason = (0, 0)
        self.vm: VmHandle | None = None
        self.hold: Hold | None = None  # the VM held, as a VMM holds its VM fd
        self.vcpus: list[VcpuIdentity] = []
        self.measurement = b""
        self.secrets_gpa = Gpa(0)
        # guest RAM as the VMM's e820 table gives it (RAM below the PCI hole, the rest from 4 GiB)
        self.ram = memory_layout.e820(opts.memory_bytes)
        npages = pages(memory_layout.ram_end(opts.memory_bytes))
        self.accepted = np.zeros(npages, dtype=bool)  # validated by this guest
        # Never touched yet (Linux's unaccepted-memory bitmap): only these are accepted on first
        # touch; a page the guest converted to shared stays shared until converted back.
        self.unaccepted = np.zeros(npages, dtype=bool)
        for e in self.ram:
            self.unaccepted[pages(e.addr) : pages(e.addr + e.size)] = True
        self.vmpcks: list[bytes] = [bytes(32)] * 4
        self.disabled: set[int] = set()
        self.counters = [0, 0, 0, 0]  # last sequence number used per VMPCK (the OS area's copy)

    @property
    def ident(self) -> VcpuIdentity:
        """The BSP's identity. A call that began while the guest ran may get here after its VM
        was lost (the vCPUs go with it, and a new boot makes new ones): it is refused as one
        made while the guest is not running."""
        if not self.vcpus:
            raise WrongState(
                "the guest's VM is gone (it is booting again): not running",
                reason=GuestReason.GUEST_NOT_RUNNING,
            )
        return self.vcpus[0]

    def event(self, kind: str, gpa: int = 0, detail: str = "") -> None:
        self.events.append(Event(kind, gpa, detail))
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        del self.events[:-1000]
        log.info(
            "%s: %s %s", kind, hex(gpa) if gpa else "", detail, extra={"event": f"guest_{kind}"}
        )

    def check_running(self) -> None:
        if self.state == BootState.TERMINATED:
            rs, code = self.term_reason
            raise Terminated(f"the guest terminated (reason set {rs}, code {code})")
        if self.state != BootState.RUNNING:
            raise WrongState(
                f"the guest is {self.state.name.lower()}, not running",
                reason=GuestReason.GUEST_NOT_RUNNING,
            )

    def in_ram(self, gpa: int, size: int) -> bool:
        """[gpa, gpa+size) is non-empty and lies in one e820 RAM range."""
        return size > 0 and any(e.addr <= gpa and gpa + size <= e.addr + e.size for e in self.ram)

    async def vmexit(self, exit: Awaitable[T]) -> T:
        """A VMGEXIT or #NPF exit. A VM the host terminated (convert-kill) never runs again:
        note why, and answer as a terminated guest does."""
        try:
            return await exit
        except PeerError as e:
            if e.reason == ExitReason.VM_TERMINATED and self.state != BootState.TERMINATED:
                with contextlib.suppress(Exception):
                    assert self.vm is not None
                    info = await self.vmm.get_vm(self.vm)
                    self.term_reason = (info.term_reason_set, info.term_reason_code)
                self.state = BootState.TERMINATED
                self.event("terminated", detail=f"by the host: {e.message}")
            if e.reason == ExitReason.VM_TERMINATED:
                rs, code = self.term_reason
                raise Terminated(
                    f"the host terminated this guest (reason set {rs}, code {code})"
                ) from None
            raise

    def _one_exit(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The BSP's exits one at a time in a gmem VM: an exit may stay out in the VMM over
        several calls, and a vCPU takes no other exit meanwhile (this agent runs many callers
        on the one vCPU; a v5 VM's exits never leave kvm, and run as they come)."""
        if self.opts.memory_model == MEMORY_MODELS["gmem"]:
            return self.exit_lock
        return contextlib.nullcontext()

    async def msr_exit(self, value: int) -> int:
        async with self._one_exit():
            ident = self.ident
            r = await self.vmexit(self.exits.vmgexit_msr(ident, value))
            if r.exit is not None:
                done = await self.vmexit(self._in_vmm(ident, r))
                assert isinstance(done, MsrReply)  # INVARIANT: completed in the exit's own kind
                r = done
            return r.ghcb_msr

    async def _in_vmm(
        self, ident: VcpuIdentity, reply: MsrReply | GhcbReply
    ) -> MsrReply | GhcbReply:
        """The exits kvm handed the VMM handled, as this agent's VMM (guest/vmm_exits.py)."""
        assert self.vm is not None  # INVARIANT: a vCPU that exits has a VM
        return await vmm_exits.complete(self.vmm, self.vm, ident.vcpu_id, reply)

    async def npf(self, fault: Fault, vcpu: VcpuIdentity | None = None) -> NpfReply:
        """The #NPF exit of a faulted access (as `vcpu`, by default this guest's BSP)."""
        async with self._one_exit():
            return await self.vmexit(
                self.exits.nested_page_fault(vcpu or self.ident, fault.gpa, fault.error_code)
            )

    async def terminate(self, reason_set: int, code: int, why: str) -> None:
        """GHCB MSR TERM_REQUEST: the guest stops with its reason."""
        self.event("terminated", detail=f"set {reason_set} code {code}: {why}")
        self.state, self.term_reason = BootState.TERMINATED, (reason_set, code)
        if self.vcpus:
            with contextlib.suppress(Exception):  # the host may already have stopped the VM
                await self.msr_exit(msr.term_request(reason_set, code))

    async def ghcb_exit(self, ghcb: g.Ghcb) -> tuple[GhcbReply, g.Ghcb]:
        """Fill the GHCB and VMGEXIT. The page goes with the exit and comes back in the reply
        (kvm.proto VmgexitRequest.ghcb): the guest's write to its shared GHCB page and its read
        after the exit, without a round trip to memory each."""
        async with self._one_exit():
            ident = self.ident
            r = await self.vmexit(self.exits.vmgexit(ident, ghcb.encode()))
            if r.exit is not None:
                done = await self.vmexit(self._in_vmm(ident, r))
                assert isinstance(done, GhcbReply)  # INVARIANT: completed in the exit's own kind
                r = done
        if r.terminated:
            self.state = BootState.TERMINATED
            return r, ghcb
        return r, g.Ghcb.decode(r.ghcb)
