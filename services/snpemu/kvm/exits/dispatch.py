"""A full-GHCB VMGEXIT: the GHCB read, the exit-code dispatch, and the GHCB written back.

KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit() (the switch below is its),
sev_es_validate_vmgexit() (nae.validate()), sev_es_sync_to_ghcb() (nae.write_back()). The
events are in the modules of this package; the host accesses that go with the GHCB write are
explained in outcome.py (ExitState) and psc.py (the speculation).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from snpemu.abi import ghcb as g
from snpemu.abi import msr_protocol as msr
from snpemu.abi.addr import PAGE_SIZE, Spa
from snpemu.errors import InvalidArgument, WrongState
from snpemu.kvm.exits import ap, map_gpa, nae
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.exits.cpuid import cpuid_exit
from snpemu.kvm.exits.guest_request import GuestRequests
from snpemu.kvm.exits.outcome import ExitResult, ExitState, Handler, Outcome, malformed
from snpemu.kvm.exits.psc import PageStateChanges
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.exits.scratch import GuestMemory, ioio, mmio
from snpemu.kvm.exits.vcpus import terminate
from snpemu.kvm.faultin import faultin
from snpemu.kvm.host_access import HostAccess, kernel_write
from snpemu.kvm.ports import BatchResult, HostOp
from snpemu.kvm.vm import Vcpu, Vm

U64 = 2**64 - 1


class GhcbExits:
    def __init__(
        self,
        ctx: ExitContext,
        host: HostAccess,
        psc: PageStateChanges,
        requests: GuestRequests,
        tsc: Callable[[], int],
    ) -> None:
        self.ctx = ctx
        self.host = host
        self.psc = psc
        self.tsc = tsc  # the guest's TSC (RDMSR of MSR_IA32_TSC)
        # sev_handle_vmgexit()'s switch; the SVM exits KVM emulates itself are in nae.simple()
        self.events: dict[int, Handler] = {
            g.EXIT_CPUID: cpuid_exit,
            g.EXIT_IOIO: self._ioio,
            g.EXIT_MMIO_READ: self._mmio,
            g.EXIT_MMIO_WRITE: self._mmio,
            g.EXIT_AP_HLT_LOOP: ap.ap_hlt_loop,
            g.EXIT_AP_JUMP_TABLE: ap.ap_jump_table,
            g.EXIT_HV_FEATURES: _hv_features,
            g.EXIT_TERM_REQUEST: _term_request,
            g.EXIT_PSC: psc.exit,
            g.EXIT_AP_CREATION: ap.ap_creation,
            g.EXIT_GUEST_REQUEST: requests.exit,
            g.EXIT_EXT_GUEST_REQUEST: requests.exit,
            g.EXIT_UNSUPPORTED_EVENT: _unsupported_event,
        }

    async def exit(self, vm: Vm, vcpu: Vcpu, inline: bytes) -> tuple[ExitResult, bytes]:
        """Handle a VMGEXIT; returns the result and the GHCB page as written back. `inline` is
        the GHCB page carried with the exit (kvm.proto VmgexitRequest.ghcb) instead of read
        from guest memory."""
        if vcpu.ghcb_gpa is None:
            # KVM fails the vCPU run: an SNP guest must register its GHCB first.
            raise WrongState(
                "no GHCB registered (GHCB MSR protocol REG_GPA first)",
                reason=ExitReason.GHCB_NOT_REGISTERED,
            )
        spa = vm.memslots.translate(vcpu.ghcb_gpa)
        if spa is None:
            # kvm_vcpu_map() faults the page in the first time
            await faultin(self.ctx, vm, vcpu.ghcb_gpa, PAGE_SIZE)
            spa = vm.memslots.translate(vcpu.ghcb_gpa)
        if spa is None:
            # UNVERIFIED(ghcb-not-mapped): KVM's sev_handle_vmgexit() resumes the guest with nothing
            # written when kvm_vcpu_map() of the GHCB fails; an exit here has no "resume unchanged"
            # answer.
            raise WrongState(
                f"the registered GHCB GPA {vcpu.ghcb_gpa:#x} is outside guest memory",
                reason=ExitReason.GHCB_NOT_MAPPED,
            )
        page = inline or await self.host.read(spa)
        ghcb = g.Ghcb.decode(page)
        code = ghcb.get("sw_exit_code")
        name = g.EXIT_NAMES.get(code, "unknown")
        self.ctx.counters.vmgexits[name] += 1
        self.ctx.trace.emit(
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
        if state.forward is not None:
            # KVM_RUN returns to the VMM; the GHCB stays as it is until RunVcpu completes it
            state.forward.page, state.forward.spa, state.forward.inline = page, spa, bool(inline)
            vcpu.pending = state.forward
            return result, b""
        return self._exited(vm, vcpu, code, result, out)

    async def resume(
        self, vm: Vm, vcpu: Vcpu, pending: map_gpa.GhcbPending, ret: int
    ) -> tuple[ExitResult, bytes]:
        """The VMM's KVM_RUN after a forwarded PSC (vcpu.pending already taken): the next range
        to the VMM, or the GHCB written back with the answer."""
        desc = pending.descriptor()
        state = ExitState(speculate=False)
        step = map_gpa.resume(vm, desc, pending.idx, pending.inflight, ret)
        outcome = self.psc.step(pending, desc, step, state)
        if state.forward is not None:
            vcpu.pending = pending
            return outcome[0], b""
        ghcb = g.Ghcb.decode(pending.page)
        result, out = await self._write_back(ghcb, pending.page, pending.spa, state, outcome)
        result, out = self._exited(vm, vcpu, g.EXIT_PSC, result, out)
        return result, out if pending.inline else b""  # as Vmgexit answers

    def _exited(
        self, vm: Vm, vcpu: Vcpu, code: int, result: ExitResult, out: bytes
    ) -> tuple[ExitResult, bytes]:
        self.ctx.trace.emit(
            "kvm_vmgexit_exit",
            vm,
            vcpu.vcpu_id,
            exit_code=code,
            info1=result.sw_exit_info_1,
            info2=result.sw_exit_info_2,
        )
        return result, b"" if result.terminated else out

    async def _handle(
        self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, page: bytes, spa: Spa, state: ExitState
    ) -> tuple[ExitResult, bytes]:
        """Dispatch the exit, then write the GHCB back after the accesses that precede it."""
        outcome = await self._dispatch(vm, vcpu, ghcb, state)
        if state.forward is not None:
            return outcome[0], b""  # to the VMM: nothing written back yet
        return await self._write_back(ghcb, page, spa, state, outcome)

    async def _write_back(
        self, ghcb: g.Ghcb, page: bytes, spa: Spa, state: ExitState, outcome: Outcome
    ) -> tuple[ExitResult, bytes]:
        result, regs, shared = outcome
        out = bytearray(page)
        valid, regs = nae.write_back(ghcb, regs)
        out[g.VALID_BITMAP : g.VALID_BITMAP + 16] = valid.to_bytes(16, "little")
        struct.pack_into(
            "<QQ",
            out,
            g.OFFSETS["sw_exit_info_1"],
            result.sw_exit_info_1 & U64,
            result.sw_exit_info_2 & U64,
        )
        for reg, value in regs.items():
            struct.pack_into("<Q", out, g.OFFSETS[reg], value & U64)
        if shared is not None:
            out[g.SHARED_BUFFER : g.SHARED_BUFFER + len(shared)] = shared
        ops: list[HostOp] = list(state.tail)
        if state.batch is not None:
            ops.append(state.batch)
        if not result.terminated:
            ops.append(kernel_write(spa, bytes(out)))
        if ops:
            # the first op that failed raises (an in-band session error, as a unary call would)
            done = await self.ctx.rmp.sequence(ops)
            if state.batch is not None:
                batch = done[len(state.tail)]
                assert isinstance(batch, BatchResult)  # INVARIANT: answered in order, in kind
                state.codes = batch.codes
                if any(state.codes):
                    return result, bytes(out)  # speculated wrong: counted on the second pass
        self.ctx.counters.psc_pages.update(state.psc_pages)
        self.ctx.counters.psc_requests.update(state.psc_requests)
        return result, bytes(out)

    async def _dispatch(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: sev.c sev_handle_vmgexit(): sev_es_validate_vmgexit(), then the event."""
        reason = nae.validate(ghcb)
        code = ghcb.get("sw_exit_code")
        if reason or code != g.EXIT_AP_HLT_LOOP:
            ap.leave_hold(vcpu)
        if reason:
            return malformed(reason)
        handler = self.events.get(code)
        if handler is not None:
            return await handler(vm, vcpu, ghcb, state)
        reply = nae.simple(code, vcpu, ghcb, self.tsc)
        assert reply is not None  # INVARIANT: validate() knows only the events handled here
        return _reply(reply)

    # --- IO and MMIO: no device claims a port or an MMIO address (scratch.py) -------------

    async def _ioio(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        guest = GuestMemory(vm.memslots.translate, self.host.write, self._backer(vm))
        return _reply(await ioio(guest, vcpu.ghcb_gpa or 0, ghcb))

    async def _mmio(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        guest = GuestMemory(vm.memslots.translate, self.host.write, self._backer(vm))
        return _reply(await mmio(guest, vcpu.ghcb_gpa or 0, ghcb))

    def _backer(self, vm: Vm) -> Callable[[int, int], Awaitable[None]]:
        return lambda gpa, size: faultin(self.ctx, vm, gpa, size)


def _reply(reply: nae.Reply) -> Outcome:
    return ExitResult(reply.info1, reply.info2), reply.regs, reply.shared


# --- events answered from the GHCB ----------------------------------------------------------


async def _hv_features(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    return ExitResult(0, msr.HV_FEATURES), {}, None


async def _term_request(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    info1 = ghcb.get("sw_exit_info_1")
    terminate(vm, info1 & 0xF, info1 >> 4 & 0xFF)
    return ExitResult(terminated=True), {}, None


async def _unsupported_event(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    raise WrongState("the guest reported an unsupported event", reason=ExitReason.UNSUPPORTED_EVENT)


def check_inline(inline: bytes) -> None:
    if inline and len(inline) != PAGE_SIZE:
        raise InvalidArgument(f"ghcb is the whole {PAGE_SIZE}-byte page, not {len(inline)} bytes")
