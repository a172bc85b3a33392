"""Guest requests (SNP_GUEST_REQUEST and the extended request) through kvm's bounce pages.

KERNEL: arch/x86/kvm/svm/sev.c snp_handle_guest_req(), snp_handle_ext_guest_req(); the
throttle is from the unmerged "kvm: sev: Add SNP guest request throttling" v5 (throttle.py).
The answer's SW_EXITINFO2 (VMM_ERR_*, the firmware status) is laid out in abi/guest_request.py.
"""

from __future__ import annotations

import asyncio
import time

from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi.addr import PAGE_SIZE, page_aligned, pages
from snpemu.abi.guest_request import (
    VMM_ERR_BUSY,
    VMM_ERR_GENERIC,
    VMM_ERR_INVALID_LEN,
    fw_error,
    vmm_error,
)
from snpemu.errors import Unavailable
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.exits.outcome import ExitResult, ExitState, Outcome, malformed
from snpemu.kvm.faultin import faultin, faultin_ranges
from snpemu.kvm.host_access import HostAccess, kernel_copy
from snpemu.kvm.vm import Vcpu, Vm
from snpemu.runtime.peers import PeerError

MSG_TYPE_OFFSET = 0x34  # KERNEL: arch/x86/include/asm/sev.h struct snp_guest_msg_hdr msg_type
REQUEST_KINDS: dict[int, str] = {gm.MsgType.REPORT_REQ: "report", gm.MsgType.KEY_REQ: "key"}


class GuestRequests:
    def __init__(self, ctx: ExitContext, host: HostAccess) -> None:
        self.ctx = ctx
        self.host = host
        self.locks: dict[str, asyncio.Lock] = {}  # KVM's guest_req_mutex, one per VM

    async def exit(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: arch/x86/kvm/svm/sev.c snp_handle_guest_req(), snp_handle_ext_guest_req().
        sev_es_validate_vmgexit() checked the two GPAs page aligned and distinct (nae.py)."""
        code, req_gpa, res_gpa = (
            ghcb.get(f) for f in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
        )
        # kvm_read_guest()/kvm_write_guest() fault the pages in as any first use does
        await faultin_ranges(
            self.ctx, vm, [(req_gpa, req_gpa + PAGE_SIZE), (res_gpa, res_gpa + PAGE_SIZE)]
        )
        req_spa, res_spa = vm.memslots.translate(req_gpa), vm.memslots.translate(res_gpa)
        if req_spa is None or res_spa is None:
            # UNVERIFIED(guest-req-page-unmapped): kvm_read_guest()/kvm_write_guest() of a page
            # outside the memslots fail with -EIO to userspace (KVM_RUN fails); snpemu answers
            # the guest GHCB_ERR_INVALID_INPUT
            return malformed(g.ERR_INVALID_INPUT)
        ext = code == g.EXIT_EXT_GUEST_REQUEST
        lock = self.locks.setdefault(vm.vm_id, asyncio.Lock())
        # one request in flight per VM, as KVM's mutex; held until the response is copied
        await state.held.enter_async_context(lock)
        started = time.perf_counter()
        # the request goes straight into the firmware's bounce page; kvm looks only at the
        # header's MSG_TYPE (struct snp_guest_msg_hdr msg_type, offset 0x34), the same byte
        # snp_handle_ext_guest_req() reads from the guest's page before taking the mutex. A
        # request refused below leaves only this bounce page changed: kvm's own, read by nobody
        # before the next request overwrites it (one copy instead of a header read and a copy).
        header = await self.host.copy(req_spa, vm.bounce_req, peek=0x40)
        msg_type = header[MSG_TYPE_OFFSET]
        kind = REQUEST_KINDS.get(msg_type, "other")
        # KERNEL: snp_handle_ext_guest_req(): only an SNP_MSG_REPORT_REQ takes RAX/RBX (the
        # certificate pages); without both valid, or with RAX not page-aligned, it answers
        # GHCB_ERR_INVALID_INPUT. Any other message goes on as a plain request, RAX/RBX unread.
        certs = ext and msg_type == gm.MsgType.REPORT_REQ
        if certs and not (ghcb.is_valid("rax") and ghcb.is_valid("rbx")):
            return malformed(g.ERR_INVALID_INPUT)
        if certs and not page_aligned(ghcb.get("rax")):
            return malformed(g.ERR_INVALID_INPUT)
        regs: dict[str, int] = {}
        if certs:
            # UNVERIFIED(ext-req-certs): mainline snp_handle_ext_guest_req() only clears the 24-byte
            # table terminator at RAX when RBX is not 0 (an empty certificate table; a failed write
            # is -EIO to userspace). snpemu writes the table set with SNP_SET_EXT_CONFIG and answers
            # VMM_ERR_INVALID_LEN with the page count in RBX when it does not fit.
            certs_gpa, npages = ghcb.get("rax"), ghcb.get("rbx")
            blob = self.ctx.certs_blob or bytes(24)
            need = pages(len(blob))
            if npages < need:
                self.ctx.counters.guest_requests[(kind, "invalid_len")] += 1
                return ExitResult(0, vmm_error(VMM_ERR_INVALID_LEN)), {"rbx": need}, None
            await faultin(self.ctx, vm, certs_gpa, need * PAGE_SIZE)
            spas = [vm.memslots.translate(certs_gpa + i * PAGE_SIZE) for i in range(need)]
            if None in spas:
                return malformed(g.ERR_INVALID_INPUT)  # before any page is written
            for i, spa in enumerate(spas):
                assert spa is not None  # INVARIANT: checked above
                await self.host.write(spa, blob[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        # Not mainline: "kvm: sev: Add SNP guest request throttling" v5 (throttle.py) checks
        # __ratelimit() in snp_handle_guest_req() right after mutex_lock(), i.e. after
        # snp_handle_ext_guest_req()'s checks and its certificate-page write.
        if not vm.throttle.allow():
            self.ctx.counters.throttled += 1
            self.ctx.counters.guest_requests[(kind, "busy")] += 1
            return ExitResult(0, vmm_error(VMM_ERR_BUSY)), regs, None
        try:
            await self.ctx.psp.guest_request(vm.gctx, vm.bounce_req, vm.bounce_res)
        except PeerError as e:
            self.ctx.counters.guest_requests[(kind, "firmware_error")] += 1
            if not e.fw_status:
                # UNVERIFIED(guest-req-no-status): snp_handle_guest_req() returns a failure without
                # a firmware status to userspace (KVM_RUN fails); snpemu answers the guest
                # VMM_ERR_GENERIC
                return ExitResult(0, vmm_error(VMM_ERR_GENERIC)), regs, None
            # KERNEL: snp_handle_guest_req(): a firmware error still copies the response
            # bounce page to the guest, then answers SNP_GUEST_ERR(0, fw_err)
            state.tail.append(kernel_copy(vm.bounce_res, res_spa))
            return ExitResult(0, fw_error(e.fw_status)), regs, None
        except Unavailable:
            # The firmware is unreachable: ask the guest to retry (THR v5, second patch).
            self.ctx.counters.guest_requests[(kind, "busy")] += 1
            return ExitResult(0, vmm_error(VMM_ERR_BUSY)), regs, None
        # the response copy goes with the GHCB write (ExitState)
        state.tail.append(kernel_copy(vm.bounce_res, res_spa))
        self.ctx.counters.guest_requests[(kind, "success")] += 1
        self.ctx.counters.observe_request(time.perf_counter() - started)
        return ExitResult(0, 0), regs, None
