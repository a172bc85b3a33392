"""What kvm does when a vCPU leaves guest mode: VMGEXIT (MSR protocol or GHCB) and #NPF.

KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit(), sev_handle_vmgexit_msr_protocol(),
sev_es_validate_vmgexit(), sev_snp_ap_creation(), sev_handle_rmp_fault();
arch/x86/kvm/svm/svm.c npf_interception().

    __init__.py       Exits: the servicer's entry points, and the wiring
    context.py        ExitContext: what handlers may touch of kvm
    vcpus.py          the vCPU identity check, termination, rmp's kicks
    dispatch.py       the full-GHCB exit: GHCB read, exit-code dispatch, write-back
    outcome.py        ExitResult / ExitState: an exit's answer and what goes with its write
    nae.py            which GHCB fields each event needs; the small SVM exits KVM emulates
    msr.py            the GHCB MSR protocol
    map_gpa.py        a gmem VM's PSC, forwarded to the VMM (KVM_HC_MAP_GPA_RANGE)
    psc.py            Page State Change: the loop, the 4K plan, the speculation
    guest_request.py  SNP guest requests and extended requests
    ap.py             AP creation, the AP jump table, the AP reset hold
    npf.py            nested page faults
    cpuid.py          CPUID and MSR_AMD64_SEV
    scratch.py        the scratch area (setup_vmgexit_scratch()), IOIO and MMIO
    reasons.py        ExitReason: why an exit is refused

The peers are called from few places: the GHCB read and the write-back sequence
(dispatch.py), the unbatched PSC RMPUPDATEs (psc.py), PSMASH and the RMP entry read (npf.py),
the firmware's guest request (guest_request.py), kvm/host_access.py's HostAccess, and
kvm/faultin.py, which backs and maps a page the first time it is used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from snpemu.errors import NotFound, WrongState
from snpemu.kvm.exits import map_gpa
from snpemu.kvm.exits.cpuid import cpuid, sev_status
from snpemu.kvm.exits.dispatch import GhcbExits, check_inline
from snpemu.kvm.exits.guest_request import GuestRequests
from snpemu.kvm.exits.msr import MsrOutcome, MsrProtocol
from snpemu.kvm.exits.npf import NestedPageFaults
from snpemu.kvm.exits.outcome import ExitResult
from snpemu.kvm.exits.psc import PageStateChanges
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.exits.vcpus import check_running, kick, running_vcpu
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.machine import Kvm
from snpemu.kvm.vm import MemoryModel, Vcpu, Vm

__all__ = ["ExitReason", "ExitResult", "Exits", "cpuid", "sev_status"]

Done = TypeVar("Done", MsrOutcome, tuple[ExitResult, bytes])


class Exits:
    def __init__(self, kvm: Kvm, tsc: Callable[[], int] = time.monotonic_ns) -> None:
        self.kvm = kvm
        self.host = HostAccess(kvm.rmp)
        self.psc = PageStateChanges(kvm, self.host)
        self.requests = GuestRequests(kvm, self.host)
        self.msr = MsrProtocol(kvm, self.psc)
        self.ghcb = GhcbExits(kvm, self.host, self.psc, self.requests, tsc)
        self.npfs = NestedPageFaults(kvm, self.host)

    @property
    def tsc(self) -> Callable[[], int]:
        """The guest's TSC (RDMSR of MSR_IA32_TSC): a 1 GHz count by default."""
        return self.ghcb.tsc

    @tsc.setter
    def tsc(self, tsc: Callable[[], int]) -> None:
        self.ghcb.tsc = tsc

    def vcpu(self, ident: VcpuIdentity) -> tuple[Vm, Vcpu]:
        return running_vcpu(self.kvm, ident)

    @contextlib.asynccontextmanager
    async def _running(self, ident: VcpuIdentity) -> AsyncIterator[tuple[Vm, Vcpu]]:
        """The vCPU an exit comes from, one exit at a time in a gmem VM, whose exits may go on
        to the VMM (KERNEL: virt/kvm/kvm_main.c kvm_vcpu_ioctl(): vcpu->mutex held across
        KVM_RUN); a v5 VM's exits never leave kvm and run as they come."""
        vm, vcpu = self.vcpu(ident)
        if vm.memory_model != MemoryModel.GMEM:
            yield vm, vcpu
            return
        async with vcpu.mutex:
            yield self.vcpu(ident)  # checked again: an exit before it may have gone to the VMM

    async def msr_exit(self, ident: VcpuIdentity, value: int) -> MsrOutcome:
        async with self._running(ident) as (vm, vcpu):
            return self._counted(await self.msr.exit(vm, vcpu, value))

    async def run_vcpu(
        self, vm: Vm, vcpu_id: int, ret: int
    ) -> MsrOutcome | tuple[ExitResult, bytes]:
        """KVM_RUN by the VMM after an exit it was handed: the exit completed
        (complete_userspace_io), answered as the VMGEXIT it came from, or the next exit."""
        vcpu = vm.vcpus.get(vcpu_id)
        if vcpu is None:
            raise NotFound(f"{vm.vm_id} has no vCPU {vcpu_id}")
        async with vcpu.mutex:
            check_running(vm)
            pending, vcpu.pending = vcpu.pending, None
            if isinstance(pending, map_gpa.MsrPending):
                return self._counted(self.msr.resume(vm, vcpu, pending, ret))
            if isinstance(pending, map_gpa.GhcbPending):
                return self._counted(await self.ghcb.resume(vm, vcpu, pending, ret))
        raise WrongState(
            f"vCPU {vcpu_id} of {vm.vm_id} has no exit out in the VMM to complete",
            reason=ExitReason.NO_PENDING_EXIT,
        )

    async def ghcb_exit(self, ident: VcpuIdentity, inline: bytes = b"") -> tuple[ExitResult, bytes]:
        """Handle a VMGEXIT; returns the result and the GHCB page as written back. `inline` is
        the GHCB page carried with the exit instead of read from guest memory."""
        check_inline(inline)
        async with self._running(ident) as (vm, vcpu):
            return self._counted(await self.ghcb.exit(vm, vcpu, inline))

    def _counted(self, done: Done) -> Done:
        """`done`, an exit handed to the VMM counted (snp_kvm_exits_to_vmm_total)."""
        hc = done.hypercall if isinstance(done, MsrOutcome) else done[0].hypercall
        if hc is not None:
            self.kvm.counters.vmm_exits["hypercall"] += 1
        return done

    async def npf(self, ident: VcpuIdentity, gpa: int, error_code: int) -> tuple[str, bool]:
        async with self._running(ident) as (vm, vcpu):
            return await self.npfs.fault(vm, vcpu, gpa, error_code)

    def kick(self, asid: int, terminate: bool, reason: str) -> bool:
        return kick(self.kvm, asid, terminate, reason)
