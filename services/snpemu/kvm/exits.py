"""What kvm does when a vCPU leaves guest mode: VMGEXIT (MSR protocol or GHCB) and #NPF.

KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit(), sev_handle_vmgexit_msr_protocol(),
sev_es_validate_vmgexit(), sev_snp_ap_creation(), sev_handle_rmp_fault();
arch/x86/kvm/svm/svm.c npf_interception(). The events live beside it: page state changes in
page_state.py, guest requests in guest_request.py, the validity table and the small
instruction events in nae.py, scratch areas (IO, MMIO) in scratch.py.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from snp.rmp.v1 import rmp_pb2

from snpemu.abi import ghcb as g
from snpemu.abi import msr_protocol as msr
from snpemu.errors import InvalidArgument, PermissionDenied, WrongState
from snpemu.kvm import nae
from snpemu.kvm.exit_state import ExitResult, ExitState, Handler, Outcome, malformed
from snpemu.kvm.guest_request import GuestRequests
from snpemu.kvm.host_access import HostAccess, kernel_write
from snpemu.kvm.machine import CBIT, Kvm
from snpemu.kvm.page_state import PageStateChanges
from snpemu.kvm.scratch import GuestMemory, ioio, mmio
from snpemu.kvm.vm import PAGE, Vcpu, Vm, VmState
from snpemu.runtime.peers import session_error

log = logging.getLogger(__name__)

PFERR_GUEST_RMP, PFERR_GUEST_ENC, PFERR_GUEST_SIZEM = 1 << 31, 1 << 34, 1 << 35
AP_CREATE_ON_INIT, AP_CREATE, AP_DESTROY = 0, 1, 2
# Reason recorded when kvm terminates a guest on rmp's request (convert-kill). Not a GHCB code:
# set 0xF is outside the GHCB spec's sets (0 general, 1 Linux).
TERM_SET_HOST, TERM_HOST_CONVERTED = 0xF, 1


class Exits:
    def __init__(self, kvm: Kvm, tsc: Callable[[], int] = time.monotonic_ns) -> None:
        self.kvm = kvm
        self.tsc = tsc  # the guest's TSC (RDMSR of MSR_IA32_TSC): a 1 GHz count by default
        self.host = HostAccess(kvm)
        self.psc = PageStateChanges(kvm, self.host)
        self.requests = GuestRequests(kvm, self.host)
        # sev_handle_vmgexit()'s switch; the SVM exits KVM emulates itself are in nae.simple()
        self.events: dict[int, Handler] = {
            g.EXIT_CPUID: self._cpuid,
            g.EXIT_IOIO: self._ioio,
            g.EXIT_MMIO_READ: self._mmio,
            g.EXIT_MMIO_WRITE: self._mmio,
            g.EXIT_AP_HLT_LOOP: self._ap_hlt_loop,
            g.EXIT_AP_JUMP_TABLE: self._ap_jump_table,
            g.EXIT_HV_FEATURES: self._hv_features,
            g.EXIT_TERM_REQUEST: self._term_request,
            g.EXIT_PSC: self.psc.exit,
            g.EXIT_AP_CREATION: self._ap_creation,
            g.EXIT_GUEST_REQUEST: self.requests.exit,
            g.EXIT_EXT_GUEST_REQUEST: self.requests.exit,
            g.EXIT_UNSUPPORTED_EVENT: self._unsupported_event,
        }

    # --- who is exiting ------------------------------------------------------------------------

    def vcpu(self, ident: Any) -> tuple[Vm, Vcpu]:
        vm = self.kvm.vm(ident.vcpu.vm.id)
        vcpu = vm.vcpus.get(ident.vcpu.vcpu_id)
        if vcpu is None or vcpu.token != ident.token or ident.asid != vm.asid:
            raise PermissionDenied(
                "exits need the vCPU identity kvm issued", reason="BAD_VCPU_IDENTITY"
            )
        if vm.state == VmState.TERMINATED:
            raise WrongState(f"{vm.vm_id} has terminated", reason="VM_TERMINATED")
        if vm.state != VmState.RUNNING:
            raise WrongState(f"{vm.vm_id} is {vm.state.name}: launch it first", reason="VM_STATE")
        return vm, vcpu

    # --- MSR protocol ---------------------------------------------------------------------------

    async def msr_exit(self, ident: Any, value: int) -> tuple[int, bool]:
        vm, vcpu = self.vcpu(ident)
        info = value & msr.INFO_MASK
        self.kvm.counters.vmgexits["msr_protocol"] += 1
        self.kvm.trace.emit("kvm_vmgexit_msr_protocol_enter", vm, vcpu.vcpu_id, ghcb_msr=value)
        if info != msr.AP_RESET_HOLD_REQ:
            nae.leave_hold(vcpu)
        out, terminated = await self._msr(vm, vcpu, info, value)
        self.kvm.trace.emit("kvm_vmgexit_msr_protocol_exit", vm, vcpu.vcpu_id, ghcb_msr=out)
        return out, terminated

    async def _msr(self, vm: Vm, vcpu: Vcpu, info: int, value: int) -> tuple[int, bool]:
        if info == msr.SEV_INFO_REQ:
            return msr.sev_info(CBIT), False
        if info == msr.CPUID_REQ:
            fn, reg = msr.cpuid_request(value)
            regs = cpuid(vm, fn, 0)
            return msr.cpuid_response(reg, regs[reg]), False
        if info == msr.AP_RESET_HOLD_REQ:
            # KERNEL: sev.c sev_handle_vmgexit_msr_protocol(): result bits 63:12 preset to 0,
            # set to 1 by the wake-up (nae.reset_hold())
            result = nae.reset_hold(vcpu, nae.AP_RESET_HOLD_MSR_PROTO)
            return result << 12 | msr.AP_RESET_HOLD_RESP, False
        if info == msr.PREF_GPA_REQ:
            return msr.PREF_GPA_NONE << 12 | msr.PREF_GPA_RESP, False
        if info == msr.REG_GPA_REQ:
            # KERNEL: sev.c sev_handle_vmgexit_msr_protocol() GHCB_MSR_REG_GPA_REQ: any GFN is
            # recorded and echoed; a GHCB exit then fails if it cannot be mapped (ghcb_exit)
            gfn = msr.gfn_of(value)
            vcpu.ghcb_gpa = gfn << 12
            return gfn << 12 | msr.REG_GPA_RESP, False
        if info == msr.PSC_REQ:
            gfn, op = msr.psc_request(value)
            ok = await self.psc.msr(vm, gfn, op)
            self.kvm.counters.psc_requests[("msr", "success" if ok else "generic")] += 1
            return (msr.PSC_RESP if ok else msr.PSC_GENERIC_ERROR), False
        if info == msr.HV_FT_REQ:
            return msr.HV_FEATURES << 12 | msr.HV_FT_RESP, False
        if info == msr.TERM_REQ:
            self._terminate(vm, *msr.term_reason(value))
            return value, True
        # Unknown requests (VMPL_REQ included: only VMPL0 runs here): KVM leaves the MSR as is.
        return value, False

    def _terminate(self, vm: Vm, reason_set: int, code: int) -> None:
        vm.state = VmState.TERMINATED
        vm.term_reason = (reason_set, code)
        log.warning(
            "%s terminated: reason set %d code %d",
            vm.vm_id,
            reason_set,
            code,
            extra={"event": "vm_terminated"},
        )

    # --- full GHCB ------------------------------------------------------------------------------

    async def ghcb_exit(self, ident: Any, inline: bytes = b"") -> tuple[ExitResult, bytes]:
        """Handle a VMGEXIT; returns the result and the GHCB page as written back. `inline` is
        the GHCB page carried with the exit (kvm.proto VmgexitRequest.ghcb) instead of read
        from guest memory."""
        if inline and len(inline) != PAGE:
            raise InvalidArgument(f"ghcb is the whole {PAGE}-byte page, not {len(inline)} bytes")
        vm, vcpu = self.vcpu(ident)
        if vcpu.ghcb_gpa is None:
            # KVM fails the vCPU run: an SNP guest must register its GHCB first.
            raise WrongState(
                "no GHCB registered (GHCB MSR protocol REG_GPA first)", reason="GHCB_NOT_REGISTERED"
            )
        spa = vm.memslots.translate(vcpu.ghcb_gpa)
        if spa is None:
            # UNVERIFIED(ghcb-not-mapped): KVM's sev_handle_vmgexit() resumes the guest with nothing
            # written when kvm_vcpu_map() of the GHCB fails; an exit here has no "resume unchanged"
            # answer.
            raise WrongState(
                f"the registered GHCB GPA {vcpu.ghcb_gpa:#x} is outside guest memory",
                reason="GHCB_NOT_MAPPED",
            )
        page = inline or await self.host.read(spa)
        ghcb = g.Ghcb.decode(page)
        code = ghcb.get("sw_exit_code")
        name = g.EXIT_NAMES.get(code, "unknown")
        self.kvm.counters.vmgexits[name] += 1
        self.kvm.trace.emit(
            "kvm_vmgexit_enter",
            vm,
            vcpu.vcpu_id,
            exit_code=code,
            info1=ghcb.get("sw_exit_info_1"),
            info2=ghcb.get("sw_exit_info_2"),
        )
        state = ExitState()
        async with state.held:
            result, out = await self._handle(vm, vcpu, ghcb, page, spa, state)
            if state.codes is not None and any(state.codes):
                # a page of the PSC failed: the GHCB write did not run; answer with the truth
                state = ExitState(speculate=False, codes=state.codes, held=state.held)
                result, out = await self._handle(vm, vcpu, ghcb, page, spa, state)
        self.kvm.trace.emit(
            "kvm_vmgexit_exit",
            vm,
            vcpu.vcpu_id,
            exit_code=code,
            info1=result.sw_exit_info_1,
            info2=result.sw_exit_info_2,
        )
        return result, b"" if result.terminated else out

    async def _handle(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, page: bytes, spa: int, state: ExitState
    ) -> tuple[ExitResult, bytes]:
        """Dispatch the exit, then write the GHCB back after the accesses that precede it."""
        result, regs, shared = await self._dispatch(vm, vcpu, ghcb, state)
        out = bytearray(page)
        valid, regs = nae.write_back(ghcb, regs)
        out[g.VALID_BITMAP : g.VALID_BITMAP + 16] = valid.to_bytes(16, "little")
        struct.pack_into(
            "<QQ",
            out,
            g.OFFSETS["sw_exit_info_1"],
            result.sw_exit_info_1 & (2**64 - 1),
            result.sw_exit_info_2 & (2**64 - 1),
        )
        for reg, value in regs.items():
            struct.pack_into("<Q", out, g.OFFSETS[reg], value & (2**64 - 1))
        if shared is not None:
            out[g.SHARED_BUFFER : g.SHARED_BUFFER + len(shared)] = shared
        ops = list(state.tail)
        if state.batch is not None:
            ops.append(rmp_pb2.HostSessionRequest(rmp_update_batch=state.batch))
        if not result.terminated:
            ops.append(rmp_pb2.HostSessionRequest(write=kernel_write(spa, bytes(out))))
        if ops:
            done = await self.kvm.host.call("sequence", rmp_pb2.HostSequenceRequest(ops=ops))
            for r in done.results:
                if r.WhichOneof("result") == "error":
                    raise session_error(r.error)
            if state.batch is not None:
                state.codes = bytes(done.results[len(state.tail)].rmp_update_batch.codes)
                if any(state.codes):
                    return result, bytes(out)  # speculated wrong: counted on the second pass
        self.kvm.counters.psc_pages.update(state.psc_pages)
        self.kvm.counters.psc_requests.update(state.psc_requests)
        return result, bytes(out)

    async def _dispatch(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: sev.c sev_handle_vmgexit(): sev_es_validate_vmgexit(), then the event."""
        reason = nae.validate(ghcb)
        code = ghcb.get("sw_exit_code")
        if reason or code != g.EXIT_AP_HLT_LOOP:
            nae.leave_hold(vcpu)
        if reason:
            return malformed(reason)
        handler = self.events.get(code)
        if handler is not None:
            return await handler(vm, vcpu, ghcb, state)
        reply = nae.simple(code, vcpu, ghcb, self.tsc)
        assert reply is not None  # INVARIANT: validate() knows only the events handled here
        return self._reply(reply)

    # --- events answered from the GHCB ----------------------------------------------------------

    async def _cpuid(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        eax, ebx, ecx, edx = cpuid(vm, ghcb.get("rax") & 0xFFFFFFFF, ghcb.get("rcx") & 0xFFFFFFFF)
        return ExitResult(), {"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx}, None

    async def _ap_jump_table(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        info1 = ghcb.get("sw_exit_info_1")
        if info1 == 0:
            vm.ap_jump_table = ghcb.get("sw_exit_info_2")
            return ExitResult(), {}, None
        if info1 == 1:
            return ExitResult(0, vm.ap_jump_table), {}, None
        return malformed(g.ERR_INVALID_INPUT)

    async def _hv_features(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        return ExitResult(0, msr.HV_FEATURES), {}, None

    async def _term_request(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        info1 = ghcb.get("sw_exit_info_1")
        self._terminate(vm, info1 & 0xF, info1 >> 4 & 0xFF)
        return ExitResult(terminated=True), {}, None

    async def _unsupported_event(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState
    ) -> Outcome:
        raise WrongState("the guest reported an unsupported event", reason="UNSUPPORTED_EVENT")

    async def _ap_hlt_loop(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        # KERNEL: sev.c sev_handle_vmgexit() SVM_VMGEXIT_AP_HLT_LOOP: SW_EXIT_INFO_2 preset to
        # 0, set to 1 by the wake-up (sev_vcpu_deliver_sipi_vector())
        return ExitResult(0, nae.reset_hold(vcpu, nae.AP_RESET_HOLD_NAE_EVENT)), {}, None

    # --- IO and MMIO: no device claims a port or an MMIO address (kvm/scratch.py) -------------

    async def _ioio(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        guest = GuestMemory(vm.memslots.translate, self.host.write)
        return self._reply(await ioio(guest, vcpu.ghcb_gpa or 0, ghcb))

    async def _mmio(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        guest = GuestMemory(vm.memslots.translate, self.host.write)
        return self._reply(await mmio(guest, vcpu.ghcb_gpa or 0, ghcb))

    @staticmethod
    def _reply(reply: nae.Reply) -> Outcome:
        return ExitResult(reply.info1, reply.info2), reply.regs, reply.shared

    # --- AP creation ----------------------------------------------------------------------------

    async def _ap_creation(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: sev.c sev_snp_ap_creation(), then, for any request but CREATE_ON_INIT, the
        target's reset (KVM_REQ_UPDATE_PROTECTED_GUEST_STATE: sev_snp_init_protected_guest_state).
        RAX was checked valid already for every request but DESTROY (nae.validate())."""
        info1, vmsa_gpa = ghcb.get("sw_exit_info_1"), ghcb.get("sw_exit_info_2")
        op, apic_id = info1 & 0xFFFFFFFF, info1 >> 32 & 0xFFFFFFFF
        target = vm.vcpus.get(apic_id)
        if target is None:
            return malformed(g.ERR_INVALID_INPUT)  # the APIC ID first
        if op in (AP_CREATE_ON_INIT, AP_CREATE):
            if ghcb.get("rax") != vm.sev_features:
                return malformed(g.ERR_INVALID_INPUT)  # SEV_FEATURES must match the VM's
            # Only page_address_valid(): the VMSA needs no memslot to be accepted
            if not nae.page_address_valid(vmsa_gpa):
                return malformed(g.ERR_INVALID_INPUT)
            # A 2M-aligned VMSA can take a spurious RMP #PF (erratum): KVM refuses it.
            if vmsa_gpa % (2 << 20) == 0:
                return malformed(g.ERR_INVALID_INPUT)
            target.vmsa_gpa = vmsa_gpa
        elif op == AP_DESTROY:
            target.vmsa_gpa = None
        else:
            return malformed(g.ERR_INVALID_INPUT)
        if op != AP_CREATE_ON_INIT:
            # the reset: runnable with the new VMSA if a memslot backs it, else offline
            gpa = target.vmsa_gpa
            target.runnable = gpa is not None and vm.memslots.translate(gpa) is not None
            if target.runnable:
                # UNVERIFIED(ap-hold-wake): KVM's reset starts the AP afresh at its new VMSA, so
                # nothing reads the hold's result; snpemu has no AP context to restart and instead
                # answers a held AP's next hold request 1, as sev_vcpu_deliver_sipi_vector() does a
                # SIPI.
                nae.wake(target)
        return ExitResult(), {}, None

    # --- nested page faults -----------------------------------------------------------------------

    async def npf(self, ident: Any, gpa: int, error_code: int) -> tuple[str, bool]:
        vm, vcpu = self.vcpu(ident)
        self.kvm.trace.emit("kvm_page_fault", vm, vcpu.vcpu_id, gpa=gpa, error_code=error_code)
        nae.leave_hold(vcpu)  # the vCPU was running
        spa = vm.memslots.translate(gpa & ~0xFFF)
        if spa is None:
            return "no_memslot", False
        if error_code & PFERR_GUEST_SIZEM:
            head = spa & ~((2 << 20) - 1)
            for _ in range(8):
                r = await self.kvm.rmp.call("Psmash", rmp_pb2.PsmashRequest(spa=head))
                if r.eax != 3:
                    break
            return "psmash", True
        if error_code & PFERR_GUEST_RMP:
            entry = (
                await self.kvm.rmp.call("ReadRmpEntry", rmp_pb2.ReadRmpEntryRequest(pfn=spa >> 12))
            ).entry
            private = bool(error_code & PFERR_GUEST_ENC)
            if private and not entry.assigned:
                # KVM_EXIT_MEMORY_FAULT: the VMM makes the GPA private (guest-invalid); the
                # guest's retry then takes #VC, as the page is not validated.
                await self.host.rmpupdate(spa, private=True, vm=vm, gpa=gpa & ~0xFFF)
                return "convert_private", True
            if not private and entry.assigned and entry.asid == vm.asid:
                await self.host.rmpupdate(spa, private=False, vm=vm, gpa=0)
                return "convert_shared", True
        return "spurious", True

    # --- kicks from rmp ------------------------------------------------------------------------

    def kick(self, asid: int, terminate: bool, reason: str) -> bool:
        for vm in self.kvm.vms.values():
            if vm.asid != asid:
                continue
            for vcpu in vm.vcpus.values():
                vcpu.kicks += 1
            if terminate and vm.state == VmState.RUNNING:
                self._terminate(vm, TERM_SET_HOST, TERM_HOST_CONVERTED)
            log.info("kicked the vCPUs of %s: %s", vm.vm_id, reason, extra={"event": "kick"})
            return True
        return False


def cpuid(vm: Vm, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The few CPUID leaves a booting SNP guest asks the hypervisor for (the rest are zero)."""
    sig = vm.cpuid_signature  # vmsa.vcpu_signature(), fixed at creation: the VMSA's RDX
    if leaf == 0x0:
        return 0x10, 0x68747541, 0x444D4163, 0x69746E65  # max leaf, "AuthenticAMD"
    if leaf == 0x1:
        return sig, len(vm.vcpus) << 16, 1 << 31, 0x178BFBFF  # ECX bit 31: hypervisor present
    if leaf == 0x8000_0000:
        return 0x8000_001F, 0x68747541, 0x444D4163, 0x69746E65
    if leaf == 0x8000_001F:
        # SEV, SEV-ES, SNP, VMPL supported; C-bit 51, 1 bit of address reduction, 4 VMPLs
        return 0x0001_003A | 0x2, CBIT | 1 << 6 | 4 << 12, 99, 100
    return 0, 0, 0, 0


def sev_status(vm: Vm) -> int:
    """MSR_AMD64_SEV (0xC0010131): SEV | SEV-ES | SNP, then SEV_FEATURES bits shifted by 2."""
    return 0b111 | (vm.sev_features >> 1) << 3
