"""What kvm does when a vCPU leaves guest mode: VMGEXIT (MSR protocol or GHCB) and #NPF.

KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit(), sev_handle_vmgexit_msr_protocol(),
sev_es_validate_vmgexit(), snp_begin_psc(), snp_handle_guest_req(), sev_snp_ap_creation(),
sev_handle_rmp_fault(); arch/x86/kvm/svm/svm.c npf_interception().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2

from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi import msr_protocol as msr
from snpemu.abi import psc, rmp_batch
from snpemu.errors import InvalidArgument, PermissionDenied, Unavailable, WrongState
from snpemu.kvm import nae, psc_batch
from snpemu.kvm.machine import CBIT, Kvm
from snpemu.kvm.peers import PeerError, session_error
from snpemu.kvm.scratch import GuestMemory, ioio, mmio
from snpemu.kvm.vm import PAGE, Vcpu, Vm, VmState

log = logging.getLogger(__name__)

# exitinfo2 of a guest request: vmm_error << 32 | fw_error (KERNEL: include/uapi/linux/sev-guest.h)
VMM_ERR_INVALID_LEN = 1
VMM_ERR_BUSY = 2
VMM_ERR_GENERIC = 1 << 31
SNP_GUEST_FW_ERR_MASK = (1 << 32) - 1
MSG_TYPE_OFFSET = 0x34  # KERNEL: arch/x86/include/asm/sev.h struct snp_guest_msg_hdr msg_type
REQUEST_KINDS: dict[int, str] = {gm.MsgType.REPORT_REQ: "report", gm.MsgType.KEY_REQ: "key"}
PFERR_GUEST_RMP, PFERR_GUEST_ENC, PFERR_GUEST_SIZEM = 1 << 31, 1 << 34, 1 << 35
AP_CREATE_ON_INIT, AP_CREATE, AP_DESTROY = 0, 1, 2
# Reason recorded when kvm terminates a guest on rmp's request (convert-kill). Not a GHCB code:
# set 0xF is outside the GHCB spec's sets (0 general, 1 Linux).
TERM_SET_HOST, TERM_HOST_CONVERTED = 0xF, 1


@dataclass
class ExitResult:
    sw_exit_info_1: int = 0
    sw_exit_info_2: int = 0
    terminated: bool = False


@dataclass
class ExitState:
    """One GHCB exit on its way back to the guest. kvm's host accesses that must precede the
    GHCB write go with that write in one rmp HostSequence message: `tail` (accesses whose
    results the GHCB does not depend on, e.g. the response copy) and `batch` (a PSC's
    RMPUPDATEs, answered here as if every page succeeded; if one did not, the sequence stops
    before the write and the exit is handled again with the real codes in `codes`). `held`
    keeps locks taken by the handler (a VM's guest-request mutex) until the GHCB is written."""

    speculate: bool = True
    tail: list[rmp_pb2.HostSessionRequest] = field(default_factory=list)
    batch: rmp_pb2.RmpUpdateBatchRequest | None = None
    codes: bytes | None = None
    # page and request counts, added to kvm's counters once the GHCB is written
    psc_pages: Counter[tuple[str, str]] = field(default_factory=Counter)
    psc_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    held: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


Outcome = tuple[ExitResult, dict[str, int], bytearray | None]
Handler = Callable[[Vm, Vcpu, g.Ghcb, ExitState], Awaitable[Outcome]]


class Exits:
    def __init__(self, kvm: Kvm, tsc: Callable[[], int] = time.monotonic_ns) -> None:
        self.kvm = kvm
        self.tsc = tsc  # the guest's TSC (RDMSR of MSR_IA32_TSC): a 1 GHz count by default
        self.request_locks: dict[str, asyncio.Lock] = {}
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
            g.EXIT_PSC: self._psc,
            g.EXIT_AP_CREATION: self._ap_creation_exit,
            g.EXIT_GUEST_REQUEST: self._guest_request_exit,
            g.EXIT_EXT_GUEST_REQUEST: self._guest_request_exit,
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

    def _spa(self, vm: Vm, gpa: int) -> int | None:
        return vm.memslots.translate(gpa)

    async def _host_read(self, spa: int, length: int = PAGE) -> bytes:
        r = await self.kvm.host.call("read", rmp_pb2.HostReadRequest(spa=spa, length=length))
        return bytes(r.data)

    @staticmethod
    def _kernel_write(spa: int, data: bytes) -> rmp_pb2.HostWriteRequest:
        """A kernel write into guest memory: an RMP violation if the guest made it private."""
        return rmp_pb2.HostWriteRequest(
            spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_KERNEL, writer="kvm"
        )

    async def _host_write(self, spa: int, data: bytes) -> int:
        return int((await self.kvm.host.call("write", self._kernel_write(spa, data))).outcome)

    @staticmethod
    def _kernel_copy(src: int, dst: int, peek: int = 0) -> rmp_pb2.HostCopyRequest:
        """A kernel memcpy of one page (the write through the violation policy), answering the
        first `peek` bytes copied."""
        return rmp_pb2.HostCopyRequest(
            src_spa=src,
            dst_spa=dst,
            length=PAGE,
            origin=rmp_pb2.ACCESS_ORIGIN_KERNEL,
            writer="kvm",
            peek=peek,
        )

    async def _host_copy(self, src: int, dst: int, peek: int = 0) -> bytes:
        return bytes((await self.kvm.host.call("copy", self._kernel_copy(src, dst, peek))).head)

    async def _rmpupdate(
        self, spa: int, *, private: bool, vm: Vm, gpa: int, size_2m: bool = False
    ) -> int:
        r = await self.kvm.rmp.call(
            "RmpUpdate",
            rmp_pb2.RmpUpdateRequest(
                spa=spa,
                state=rmp_pb2.RmpState(
                    gpa=gpa if private else 0,
                    assigned=private,
                    asid=vm.asid if private else 0,
                    page_size=types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K,
                ),
            ),
        )
        return int(r.eax)

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
            ok = await self._psc_one(vm, gfn, op)
            self.kvm.counters.psc_requests[("msr", "success" if ok else "generic")] += 1
            return (msr.PSC_RESP if ok else msr.PSC_GENERIC_ERROR), False
        if info == msr.HV_FT_REQ:
            return msr.HV_FEATURES << 12 | msr.HV_FT_RESP, False
        if info == msr.TERM_REQ:
            self._terminate(vm, *msr.term_reason(value))
            return value, True
        # Unknown requests (VMPL_REQ included: only VMPL0 runs here): KVM leaves the MSR as is.
        return value, False

    async def _psc_one(self, vm: Vm, gfn: int, op: int) -> bool:
        spa = self._spa(vm, gfn << 12)
        if spa is None or op not in (psc.Op.PRIVATE, psc.Op.SHARED):
            return False
        eax = await self._rmpupdate(spa, private=op == psc.Op.PRIVATE, vm=vm, gpa=gfn << 12)
        if eax == 0:
            self.kvm.counters.psc_pages[(psc.Op(op).name.lower(), "4k")] += 1
        return eax == 0

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
        spa = self._spa(vm, vcpu.ghcb_gpa)
        if spa is None:
            # UNVERIFIED(ghcb-not-mapped): KVM's sev_handle_vmgexit() resumes the guest with nothing
            # written when kvm_vcpu_map() of the GHCB fails; an exit here has no "resume unchanged"
            # answer.
            raise WrongState(
                f"the registered GHCB GPA {vcpu.ghcb_gpa:#x} is outside guest memory",
                reason="GHCB_NOT_MAPPED",
            )
        page = inline or await self._host_read(spa)
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
            ops.append(rmp_pb2.HostSessionRequest(write=self._kernel_write(spa, bytes(out))))
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

    @staticmethod
    def _malformed(err: int) -> tuple[ExitResult, dict[str, int], None]:
        return ExitResult(g.RESP_MALFORMED_INPUT, err), {}, None

    async def _dispatch(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: sev.c sev_handle_vmgexit(): sev_es_validate_vmgexit(), then the event."""
        reason = nae.validate(ghcb)
        code = ghcb.get("sw_exit_code")
        if reason or code != g.EXIT_AP_HLT_LOOP:
            nae.leave_hold(vcpu)
        if reason:
            return self._malformed(reason)
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
        return self._malformed(g.ERR_INVALID_INPUT)

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
        guest = GuestMemory(vm.memslots.translate, self._host_write)
        return self._reply(await ioio(guest, vcpu.ghcb_gpa or 0, ghcb))

    async def _mmio(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        guest = GuestMemory(vm.memslots.translate, self._host_write)
        return self._reply(await mmio(guest, vcpu.ghcb_gpa or 0, ghcb))

    @staticmethod
    def _reply(reply: nae.Reply) -> Outcome:
        return ExitResult(reply.info1, reply.info2), reply.regs, reply.shared

    # --- adapters of the handlers below to the event table ---------------------------------------

    async def _ap_creation_exit(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState
    ) -> Outcome:
        return self._ap_creation(vm, ghcb, ghcb.get("sw_exit_info_1"), ghcb.get("sw_exit_info_2"))

    async def _guest_request_exit(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState
    ) -> Outcome:
        code, info1, info2 = (
            ghcb.get(f) for f in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
        )
        return await self._guest_request(vm, ghcb, code, info1, info2, state)

    # --- page state change ----------------------------------------------------------------------

    async def _psc(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState
    ) -> tuple[ExitResult, dict[str, int], bytearray | None]:
        if not ghcb.is_valid("sw_scratch"):
            return self._malformed(g.ERR_MISSING_INPUT)
        scratch = ghcb.get("sw_scratch")
        base = (vcpu.ghcb_gpa or 0) + g.SHARED_BUFFER
        if not base <= scratch < base + g.SHARED_BUFFER_SIZE - psc.HDR.size:
            # UNVERIFIED(psc-scratch-in-ghcb): the descriptor must lie in the GHCB's shared buffer
            # with room for its header, as in kernels where setup_vmgexit_scratch() takes a
            # min_len (sizeof(struct psc_hdr) for a PSC) and refuses a scratch area outside the
            # GHCB for GHCB v2; older mainline passes SW_EXIT_INFO_2 as the length and reads a
            # descriptor outside the GHCB too.
            return self._malformed(g.ERR_INVALID_SCRATCH_AREA)
        off = scratch - base
        buf = bytearray(ghcb.shared)
        if state.speculate:
            fast = psc_batch.plan_4k(bytes(buf[off:]), vm.memslots.translate_many, vm.asid)
            if fast is not None:
                # every page a 4K entry: the batch goes with the GHCB write (ExitState)
                if fast.entries:  # none when every entry is an operation KVM only completes
                    state.batch = rmp_pb2.RmpUpdateBatchRequest(entries=fast.entries)
                for op, n in (("private", fast.private), ("shared", fast.shared)):
                    if n:
                        state.psc_pages[(op, "4k")] += n
                state.psc_requests[("ghcb", _psc_result_name(0))] += 1
                buf[off:] = fast.descriptor[: len(buf) - off]
                return ExitResult(0, 0), {}, buf
        desc = psc.Descriptor.decode(bytes(buf[off:]))
        # 2M entries take RMPUPDATEs of their own first; handling the exit twice would repeat them
        state.speculate = state.speculate and not any(e.size_2m for e in desc.entries)
        result = await self.apply_psc(vm, desc, state)
        view = bytearray(buf[off:])
        desc.encode_into(view)
        buf[off:] = view[: len(buf) - off]
        state.psc_requests[("ghcb", _psc_result_name(result))] += 1
        return ExitResult(0, result), {}, buf

    async def apply_psc(self, vm: Vm, desc: psc.Descriptor, state: ExitState) -> int:
        """KVM's PSC loop over the entries; returns sw_exit_info_2 and advances the descriptor.

        KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(), __snp_complete_one_psc()."""
        if not psc.check_header(desc):
            return psc.PSC_ERROR_INVALID_HDR
        if desc.cur_entry > desc.end_entry:
            # KERNEL: snp_begin_psc(): the scan loop does not run (`idx > idx_end`) and
            # snp_complete_psc(svm, 0) answers without writing the buffer
            return 0
        last = min(desc.end_entry, len(desc.entries) - 1)
        first = desc.cur_entry
        work: list[tuple[int, int, int, int, bool]] = []  # (entry, page, spa, gpa, private)
        for idx in range(first, last + 1):
            e = desc.entries[idx]
            if not psc.check_entry(e):
                desc.cur_entry = idx
                return await self._run_psc(
                    vm, desc, work, (first, idx), psc.PSC_ERROR_INVALID_ENTRY, state
                )
            if e.op not in psc.STATE_CHANGES:
                # KERNEL: snp_begin_psc() `default:` (PSMASH, UNSMASH and every undefined
                # operation): __snp_complete_one_psc() marks the range complete without acting
                continue
            gpa = e.gfn << 12
            if e.size_2m and e.cur_page == 0:
                spa2m = vm.memslots.contiguous_2m(gpa)
                if spa2m is not None:
                    eax = await self._rmpupdate(
                        spa2m, private=e.op == psc.Op.PRIVATE, vm=vm, gpa=gpa, size_2m=True
                    )
                    if eax == 0:
                        e.cur_page = 512
                        state.psc_pages[(psc.Op(e.op).name.lower(), "2m")] += 1
                        continue
            for page in range(e.cur_page, e.npages):
                spa = vm.memslots.translate(gpa + page * PAGE)
                if spa is None:
                    desc.cur_entry = idx
                    return await self._run_psc(
                        vm, desc, work, (first, idx), psc.PSC_ERROR_GENERIC, state
                    )
                work.append((idx, page, spa, gpa + page * PAGE, e.op == psc.Op.PRIVATE))
        result = await self._run_psc(vm, desc, work, (first, last + 1), 0, state)
        if result == 0:
            desc.cur_entry = last + 1
        return result

    async def _run_psc(
        self,
        vm: Vm,
        desc: psc.Descriptor,
        work: list[tuple[int, int, int, int, bool]],
        span: tuple[int, int],
        stop_result: int,
        state: ExitState,
    ) -> int:
        """One batched RMPUPDATE for the 4K work, then progress up to the first failure. `span`
        is the entries the loop went through (first, end exclusive): those before the first
        failure are marked complete, as KVM does range by range; entries past it, or past
        end_entry, are left as the guest wrote them. When the exit may speculate, the batch
        goes with the GHCB write and every page is taken to have succeeded (see ExitState)."""
        first, bound = span
        result = stop_result
        codes: bytes = b""
        if state.codes is not None:
            codes = state.codes
        elif work:
            entries = rmp_batch.pack(
                spa=[spa for _, _, spa, _, _ in work],
                gpa=[gpa if priv else 0 for _, _, _, gpa, priv in work],
                assigned=[priv for *_, priv in work],
                asid=[vm.asid if priv else 0 for *_, priv in work],
            )
            batch = rmp_pb2.RmpUpdateBatchRequest(entries=entries)
            if state.speculate:
                state.batch, codes = batch, bytes(len(work))
            else:
                codes = bytes((await self.kvm.host.call("rmp_update_batch", batch)).codes)
        done_entries: set[int] = set()
        for (idx, page, _, _, priv), code in zip(work, codes, strict=True):
            e = desc.entries[idx]
            if code != 0:
                # Progress stops at the first page that failed; the guest resumes from here.
                # Later pages of this batch were changed too: redoing them is harmless.
                e.cur_page = page
                desc.cur_entry = bound = idx
                result = psc.PSC_ERROR_GENERIC
                break
            e.cur_page = page + 1
            done_entries.add(idx)
            state.psc_pages[("private" if priv else "shared", "4k")] += 1
        for idx in range(first, bound):
            e = desc.entries[idx]
            if idx in done_entries or e.op not in psc.STATE_CHANGES:
                e.cur_page = e.npages
        return result

    # --- guest requests --------------------------------------------------------------------------

    async def _guest_request(
        self, vm: Vm, ghcb: g.Ghcb, code: int, req_gpa: int, res_gpa: int, state: ExitState
    ) -> tuple[ExitResult, dict[str, int], None]:
        """KERNEL: arch/x86/kvm/svm/sev.c snp_handle_guest_req(), snp_handle_ext_guest_req()."""
        if req_gpa % PAGE or res_gpa % PAGE or req_gpa == res_gpa:
            return self._malformed(g.ERR_MISSING_INPUT)
        req_spa, res_spa = self._spa(vm, req_gpa), self._spa(vm, res_gpa)
        if req_spa is None or res_spa is None:
            return self._malformed(g.ERR_INVALID_INPUT)
        ext = code == g.EXIT_EXT_GUEST_REQUEST
        lock = self.request_locks.setdefault(vm.vm_id, asyncio.Lock())
        # one request in flight per VM, as KVM's mutex; held until the response is copied
        await state.held.enter_async_context(lock)
        started = time.perf_counter()
        # the request goes straight into the firmware's bounce page; kvm looks only at the
        # header's MSG_TYPE (struct snp_guest_msg_hdr msg_type, offset 0x34), the same byte
        # snp_handle_ext_guest_req() reads from the guest's page before taking the mutex
        header = await self._host_copy(req_spa, vm.bounce_req, peek=0x40)
        msg_type = header[MSG_TYPE_OFFSET]
        kind = REQUEST_KINDS.get(msg_type, "other")
        # KERNEL: snp_handle_ext_guest_req(): only an SNP_MSG_REPORT_REQ takes RAX/RBX (the
        # certificate pages); without both valid, or with RAX not page-aligned, it answers
        # GHCB_ERR_INVALID_INPUT. Any other message goes on as a plain request, RAX/RBX unread.
        certs = ext and msg_type == gm.MsgType.REPORT_REQ
        if certs and not (ghcb.is_valid("rax") and ghcb.is_valid("rbx")):
            return self._malformed(g.ERR_INVALID_INPUT)
        if certs and ghcb.get("rax") % PAGE:
            return self._malformed(g.ERR_INVALID_INPUT)
        regs: dict[str, int] = {}
        if certs:
            # UNVERIFIED(ext-req-certs): mainline snp_handle_ext_guest_req() only clears the 24-byte
            # table terminator at RAX when RBX is not 0 (an empty certificate table; a failed write
            # is -EIO to userspace). snpemu writes the table set with SNP_SET_EXT_CONFIG and answers
            # VMM_ERR_INVALID_LEN with the page count in RBX when it does not fit.
            certs_gpa, npages = ghcb.get("rax"), ghcb.get("rbx")
            blob = self.kvm.certs_blob or bytes(24)
            need = -(-len(blob) // PAGE)
            if npages < need:
                self.kvm.counters.guest_requests[(kind, "invalid_len")] += 1
                return ExitResult(0, VMM_ERR_INVALID_LEN << 32), {"rbx": need}, None
            spas = [self._spa(vm, certs_gpa + i * PAGE) for i in range(need)]
            if None in spas:
                return self._malformed(g.ERR_INVALID_INPUT)  # before any page is written
            for i, spa in enumerate(spas):
                assert spa is not None  # INVARIANT: checked above
                await self._host_write(spa, blob[i * PAGE : (i + 1) * PAGE])
        # Not mainline: "kvm: sev: Add SNP guest request throttling" v5 (throttle.py) checks
        # __ratelimit() in snp_handle_guest_req() right after mutex_lock(), i.e. after
        # snp_handle_ext_guest_req()'s checks and its certificate-page write.
        if not vm.throttle.allow():
            self.kvm.counters.throttled += 1
            self.kvm.counters.guest_requests[(kind, "busy")] += 1
            return ExitResult(0, VMM_ERR_BUSY << 32), regs, None
        try:
            await self.kvm.psp.call(
                "GuestRequest",
                psp_pb2.GuestRequestRequest(
                    gctx=handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx),
                    req_paddr=vm.bounce_req,
                    res_paddr=vm.bounce_res,
                ),
            )
        except PeerError as e:
            self.kvm.counters.guest_requests[(kind, "firmware_error")] += 1
            if not e.fw_status:
                # UNVERIFIED(guest-req-no-status): snp_handle_guest_req() returns a failure without
                # a firmware status to userspace (KVM_RUN fails); snpemu answers the guest
                # VMM_ERR_GENERIC
                return ExitResult(0, VMM_ERR_GENERIC << 32), regs, None
            # KERNEL: snp_handle_guest_req(): a firmware error still copies the response
            # bounce page to the guest, then answers SNP_GUEST_ERR(0, fw_err)
            state.tail.append(
                rmp_pb2.HostSessionRequest(copy=self._kernel_copy(vm.bounce_res, res_spa))
            )
            return ExitResult(0, e.fw_status & SNP_GUEST_FW_ERR_MASK), regs, None
        except Unavailable:
            # The firmware is unreachable: ask the guest to retry (THR v5, second patch).
            self.kvm.counters.guest_requests[(kind, "busy")] += 1
            return ExitResult(0, VMM_ERR_BUSY << 32), regs, None
        # the response copy goes with the GHCB write (ExitState)
        state.tail.append(
            rmp_pb2.HostSessionRequest(copy=self._kernel_copy(vm.bounce_res, res_spa))
        )
        self.kvm.counters.guest_requests[(kind, "success")] += 1
        self.kvm.counters.observe_request(time.perf_counter() - started)
        return ExitResult(0, 0), regs, None

    # --- AP creation ----------------------------------------------------------------------------

    def _ap_creation(
        self, vm: Vm, ghcb: g.Ghcb, info1: int, vmsa_gpa: int
    ) -> tuple[ExitResult, dict[str, int], None]:
        """KERNEL: sev.c sev_snp_ap_creation(), then, for any request but CREATE_ON_INIT, the
        target's reset (KVM_REQ_UPDATE_PROTECTED_GUEST_STATE: sev_snp_init_protected_guest_state).
        RAX was checked valid already for every request but DESTROY (nae.validate())."""
        op, apic_id = info1 & 0xFFFFFFFF, info1 >> 32 & 0xFFFFFFFF
        target = vm.vcpus.get(apic_id)
        if target is None:
            return self._malformed(g.ERR_INVALID_INPUT)  # the APIC ID first
        if op in (AP_CREATE_ON_INIT, AP_CREATE):
            if ghcb.get("rax") != vm.sev_features:
                return self._malformed(g.ERR_INVALID_INPUT)  # SEV_FEATURES must match the VM's
            # Only page_address_valid(): the VMSA needs no memslot to be accepted
            if not nae.page_address_valid(vmsa_gpa):
                return self._malformed(g.ERR_INVALID_INPUT)
            # A 2M-aligned VMSA can take a spurious RMP #PF (erratum): KVM refuses it.
            if vmsa_gpa % (2 << 20) == 0:
                return self._malformed(g.ERR_INVALID_INPUT)
            target.vmsa_gpa = vmsa_gpa
        elif op == AP_DESTROY:
            target.vmsa_gpa = None
        else:
            return self._malformed(g.ERR_INVALID_INPUT)
        if op != AP_CREATE_ON_INIT:
            # the reset: runnable with the new VMSA if a memslot backs it, else offline
            gpa = target.vmsa_gpa
            target.runnable = gpa is not None and self._spa(vm, gpa) is not None
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
        spa = self._spa(vm, gpa & ~0xFFF)
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
                await self._rmpupdate(spa, private=True, vm=vm, gpa=gpa & ~0xFFF)
                return "convert_private", True
            if not private and entry.assigned and entry.asid == vm.asid:
                await self._rmpupdate(spa, private=False, vm=vm, gpa=0)
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


def _psc_result_name(result: int) -> str:
    return {
        0: "success",
        psc.PSC_ERROR_INVALID_HDR: "invalid_hdr",
        psc.PSC_ERROR_INVALID_ENTRY: "invalid_entry",
    }.get(result, "generic")


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
