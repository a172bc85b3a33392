"""The GHCB MSR protocol: a VMGEXIT with the request in the GHCB MSR instead of a GHCB page.

KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit_msr_protocol(); the encodings are in
abi/msr_protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.abi import msr_protocol as msr
from snpemu.abi.addr import gfn_to_gpa
from snpemu.kvm.exits import ap, map_gpa
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.exits.cpuid import cpuid
from snpemu.kvm.exits.psc import PageStateChanges
from snpemu.kvm.exits.vcpus import terminate
from snpemu.kvm.machine import CBIT
from snpemu.kvm.vm import MemoryModel, Vcpu, Vm


@dataclass(frozen=True)
class MsrOutcome:
    """The GHCB MSR as kvm writes it back and whether the guest terminated; or, with
    `hypercall`, the exit gone on to the VMM (the guest not resumed)."""

    ghcb_msr: int
    terminated: bool = False
    hypercall: map_gpa.Hypercall | None = None


class MsrProtocol:
    def __init__(self, ctx: ExitContext, psc: PageStateChanges) -> None:
        self.ctx = ctx
        self.psc = psc

    async def exit(self, vm: Vm, vcpu: Vcpu, value: int) -> MsrOutcome:
        info = value & msr.INFO_MASK
        self.ctx.counters.vmgexits["msr_protocol"] += 1
        self.ctx.trace.emit("kvm_vmgexit_msr_protocol_enter", vm, vcpu.vcpu_id, ghcb_msr=value)
        if info != msr.AP_RESET_HOLD_REQ:
            ap.leave_hold(vcpu)
        if info == msr.PSC_REQ and vm.memory_model == MemoryModel.GMEM:
            gfn, op = msr.psc_request(value)
            hc = map_gpa.begin_msr(vm, gfn, op)
            if hc is not None:
                vcpu.pending = map_gpa.MsrPending(hc)
                return MsrOutcome(value, hypercall=hc)
            return self._psc_done(vm, vcpu, msr.PSC_GENERIC_ERROR)
        out, terminated = await self._request(vm, vcpu, info, value)
        self.ctx.trace.emit("kvm_vmgexit_msr_protocol_exit", vm, vcpu.vcpu_id, ghcb_msr=out)
        return MsrOutcome(out, terminated)

    def resume(self, vm: Vm, vcpu: Vcpu, pending: map_gpa.MsrPending, ret: int) -> MsrOutcome:
        """The VMM's KVM_RUN after a forwarded PSC (vcpu.pending already taken)."""
        return self._psc_done(vm, vcpu, map_gpa.complete_msr(ret))

    def _psc_done(self, vm: Vm, vcpu: Vcpu, out: int) -> MsrOutcome:
        ok = out == msr.PSC_RESP
        self.ctx.counters.psc_requests[("msr", "success" if ok else "generic")] += 1
        self.ctx.trace.emit("kvm_vmgexit_msr_protocol_exit", vm, vcpu.vcpu_id, ghcb_msr=out)
        return MsrOutcome(out)

    async def _request(self, vm: Vm, vcpu: Vcpu, info: int, value: int) -> tuple[int, bool]:
        if info == msr.SEV_INFO_REQ:
            # KERNEL: sev.c: GHCB_MSR_SEV_INFO(sev->ghcb_version, GHCB_VERSION_MIN, sev_enc_bit)
            return msr.sev_info(CBIT, vm.ghcb_version), False
        if info == msr.CPUID_REQ:
            fn, reg = msr.cpuid_request(value)
            regs = cpuid(vm, fn, 0)
            return msr.cpuid_response(reg, regs[reg]), False
        if info == msr.AP_RESET_HOLD_REQ:
            # KERNEL: sev.c sev_handle_vmgexit_msr_protocol(): result bits 63:12 preset to 0,
            # set to 1 by the wake-up (ap.reset_hold())
            result = ap.reset_hold(vcpu, ap.AP_RESET_HOLD_MSR_PROTO)
            return msr.response(result, msr.AP_RESET_HOLD_RESP), False
        if info == msr.PREF_GPA_REQ:
            return msr.response(msr.PREF_GPA_NONE, msr.PREF_GPA_RESP), False
        if info == msr.REG_GPA_REQ:
            # KERNEL: sev.c sev_handle_vmgexit_msr_protocol() GHCB_MSR_REG_GPA_REQ: any GFN is
            # recorded and echoed; a GHCB exit then fails if it cannot be mapped (ghcb_exit)
            gfn = msr.gfn_of(value)
            vcpu.ghcb_gpa = gfn_to_gpa(gfn)
            return msr.response(gfn, msr.REG_GPA_RESP), False
        if info == msr.PSC_REQ:
            gfn, op = msr.psc_request(value)
            ok = await self.psc.msr(vm, gfn, op)
            self.ctx.counters.psc_requests[("msr", "success" if ok else "generic")] += 1
            return (msr.PSC_RESP if ok else msr.PSC_GENERIC_ERROR), False
        if info == msr.HV_FT_REQ:
            return msr.response(msr.HV_FEATURES, msr.HV_FT_RESP), False
        if info == msr.TERM_REQ:
            terminate(vm, *msr.term_reason(value))
            return value, True
        # Unknown requests (VMPL_REQ included: only VMPL0 runs here): KVM leaves the MSR as is.
        return value, False
