"""The sev-guest driver's rules for guest messages (docs/abi.md#sequence-numbers).

KERNEL: arch/x86/coco/sev/core.c snp_send_guest_request(), __handle_guest_request(),
snp_issue_guest_request(), verify_and_dec_payload(); drivers/virt/coco/sev-guest/sev-guest.c.
Sequence numbers are never reused: once the sealed message is in shared memory with the host
the sequence number is consumed (snp_inc_msg_seqno(), +2: the firmware counts the response
too), whatever the host answers. VMM BUSY is retried, the same message, after a delay until a
timeout; INVALID_LEN on an extended request re-sends the message as a plain request (through
the same BUSY loop) and then reports the needed size; INVALID_LEN on a plain request fails it
and keeps the VMPCK. Any other host error, a timeout, or a response with the wrong sequence
number, type, version or size or a failed authentication wipes the VMPCK (the secrets page copy
too), and later requests under it are refused. So does an exit that never comes back (it
raised, the caller was cancelled, or the host terminated the guest): the outcome is unknown,
so the sequence number is consumed and the VMPCK wiped, both before the first await, and the
error goes on as it was (Terminated for a terminated guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi.addr import PAGE_SIZE, page_bytes
from snpemu.abi.guest_payload import KeyRequest, ReportRequest
from snpemu.abi.guest_request import VMM_ERR_BUSY, VMM_ERR_INVALID_LEN, vmm_error
from snpemu.abi.secrets import vmpck_offset
from snpemu.errors import WrongState
from snpemu.guest.errors import GuestReason, Terminated
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.layout import CERTS_GPA, CERTS_PAGES, REQ_GPA, RESP_GPA

# KERNEL: include/uapi/linux/psp-sev.h SEV_RET_NO_FW_CALL (-1 in the u64 exitinfo2)
SEV_RET_NO_FW_CALL = 2**64 - 1
SEQNO_MAX = 2**32 - 1  # the OS area keeps u32 counters


class VmpckDisabled(WrongState):
    default_reason = GuestReason.VMPCK_DISABLED


class RequestFailed(WrongState):
    default_reason = GuestReason.GUEST_REQUEST_FAILED


class Issued(enum.Enum):
    """What one VMGEXIT of a guest request came back with: snp_issue_guest_request()'s return
    (0, -EAGAIN, -ENOSPC, -EIO, or sev_es_ghcb_hv_call()'s failure), and -ETIMEDOUT, which
    __handle_guest_request() makes of a BUSY past the retry timeout."""

    OK = "ok"
    EAGAIN = "busy"
    ENOSPC = "certificate buffer too small"
    EIO = "host or firmware error"
    HV_CALL = "GHCB call failed"
    ETIMEDOUT = "busy past the retry timeout"


@dataclass
class Reply:
    payload: bytes
    certs: bytes = b""


class Driver:
    def __init__(self, kernel: GuestKernel) -> None:
        self.k = kernel
        self.lock = asyncio.Lock()
        # secrets-page wipes still being written (the loop keeps only weak references to tasks)
        self.wiping: set[asyncio.Task[None]] = set()

    def _consume(self, vmpck: int) -> None:
        """snp_inc_msg_seqno(): +2, the firmware counts the response too."""
        # UNVERIFIED(guest-seqno-store): snp_inc_msg_seqno() adds 2 in the secrets page's OS
        # area itself; here the counters are read from it at boot and kept in the agent (a
        # restarted agent re-boots)
        self.k.counters[vmpck] += 2

    async def disable(self, vmpck: int, why: str) -> None:
        """snp_disable_vmpck(): wipe the key (the secrets page copy too) so the IV can never be
        reused."""
        k = self.k
        # INVARIANT: the key is unusable before the first await, so a cancellation while the
        # secrets page is written cannot leave it usable
        k.vmpcks[vmpck] = bytes(32)
        k.disabled.add(vmpck)
        k.event("vmpck_disabled", detail=f"VMPCK{vmpck}: {why}")
        # the secrets page copy in a task of its own: a cancelled caller does not stop it
        wipe = asyncio.ensure_future(
            k.write_private(k.secrets_gpa + vmpck_offset(vmpck), bytes(32))
        )
        self.wiping.add(wipe)
        wipe.add_done_callback(self._wiped)
        await asyncio.shield(wipe)

    def _wiped(self, wipe: asyncio.Task[None]) -> None:
        self.wiping.discard(wipe)
        if not wipe.cancelled() and (e := wipe.exception()) is not None:
            self.k.event("vmpck_wipe_failed", detail=f"secrets page: {e}")

    async def request(
        self,
        msg_type: int,
        payload: bytes,
        *,
        vmpck: int = 0,
        ext: bool = False,
        certs_pages: int = CERTS_PAGES,
        seqno_offset: int = 0,
        after_clear: Callable[[], Awaitable[None]] | None = None,
    ) -> Reply:
        """`seqno_offset` and `after_clear` (run once the response page is cleared, before the
        message goes out) are for misbehaviour on purpose only."""
        async with self.lock:
            return await self._request(
                msg_type, payload, vmpck, ext, certs_pages, seqno_offset, after_clear
            )

    async def _request(
        self,
        msg_type: int,
        payload: bytes,
        vmpck: int,
        ext: bool,
        certs_pages: int,
        seqno_offset: int,
        after_clear: Callable[[], Awaitable[None]] | None = None,
    ) -> Reply:
        """snp_send_guest_request()."""
        k = self.k
        k.check_running()
        if vmpck in k.disabled or k.vmpcks[vmpck] == bytes(32):
            raise VmpckDisabled(f"VMPCK{vmpck} is disabled")
        seqno = k.counters[vmpck] + 1 + seqno_offset  # seqno_offset: misbehaviour only
        if not 0 < seqno < SEQNO_MAX:
            raise RequestFailed("request message sequence counter overflow")
        key = k.vmpcks[vmpck]
        hdr = gm.Header(
            seqno=seqno, msg_type=msg_type, msg_version=1, msg_sz=len(payload), vmpck=vmpck
        )
        sealed = gm.seal(key, hdr, payload)
        # KERNEL: __handle_guest_request(): "the encrypted message enters shared memory with
        # the host. So after this call the sequence number must be incremented or the VMPCK
        # must be deleted to prevent reuse of the IV."
        try:
            # KERNEL: snp_send_guest_request() clears the shared response page (memset of the
            # whole struct snp_guest_msg) and __handle_guest_request() copies the whole sealed
            # struct snp_guest_msg into the shared request page; the two pages are adjacent, so
            # one guest write does both
            await k.write(REQ_GPA, sealed.ljust(PAGE_SIZE, b"\0") + bytes(PAGE_SIZE), shared=True)
            if after_clear is not None:
                await after_clear()
            rc, info2, needed = await self._handle(seqno, ext, certs_pages)
            page = b""
            if rc is Issued.OK and needed is None:
                page = await k.read(RESP_GPA, PAGE_SIZE, shared=True)
        except BaseException as e:
            # UNVERIFIED(guest-request-lost-exit): upstream's VMGEXIT comes back with an
            # answer, or the guest never runs again; here an exit can raise (kvm unreachable,
            # Terminated) or its caller be cancelled (in the BUSY delay too). What the host or
            # the firmware saw is unknown, so both: the sequence number consumed and the VMPCK
            # wiped, before the first await.
            self._consume(vmpck)
            with contextlib.suppress(Exception):  # the caller is told the first error
                await self.disable(vmpck, f"the exit did not come back: {e!r}")
            raise
        # INVARIANT: the host has seen the message sealed under this sequence number; it is
        # never used again, whatever came back (snp_inc_msg_seqno() in __handle_guest_request())
        self._consume(vmpck)
        if needed is not None:
            # KERNEL: __handle_guest_request() override_err: exitinfo2 is INVALID_LEN whatever
            # the plain re-send answered, and a re-send that succeeded is -EIO
            info2 = vmm_error(VMM_ERR_INVALID_LEN)
            if rc is Issued.OK:
                rc = Issued.EIO
        if rc is Issued.EIO and info2 == vmm_error(VMM_ERR_INVALID_LEN):
            # KERNEL: snp_send_guest_request() returns -EIO with exitinfo2 INVALID_LEN before
            # snp_disable_vmpck(): an extended request's buffer too small (a firmware error on
            # the re-send included), or a plain request answered INVALID_LEN, which
            # snp_issue_guest_request() lets fall through to -EIO (no pages to tell)
            if needed is not None:
                raise RequestFailed(
                    f"certificate buffer too small: {needed} pages needed",
                    metadata={"needed_pages": str(needed)},
                )
            raise RequestFailed(
                f"the host answered exitinfo2={info2:#x} (INVALID_LEN) to a plain request",
                metadata={"fw_error": "0x0", "vmm_error": hex(VMM_ERR_INVALID_LEN)},
            )
        if rc is Issued.ETIMEDOUT:
            await self.disable(vmpck, "VMM BUSY past the retry timeout")
            raise RequestFailed("the host stayed busy: giving up (ETIMEDOUT)")
        if rc is not Issued.OK:
            await self.disable(vmpck, f"host error exitinfo2={info2:#x} ({rc.value})")
            raise RequestFailed(
                f"the host answered exitinfo2={info2:#x} ({rc.value})",
                metadata={"fw_error": hex(info2 & 0xFFFFFFFF), "vmm_error": hex(info2 >> 32)},
            )
        try:
            body = self._verify(key, hdr, page)
        except gm.MessageError as e:
            await self.disable(vmpck, str(e))
            raise RequestFailed(f"bad response: {e}") from None
        certs = b""
        if ext:
            certs = await k.read(CERTS_GPA, page_bytes(certs_pages), shared=True)
        return Reply(body, certs)

    async def _handle(
        self, seqno: int, ext: bool, certs_pages: int
    ) -> tuple[Issued, int, int | None]:
        """__handle_guest_request(): the VMGEXIT, retried on BUSY with the same message until
        the timeout (counted from the first exit, the plain re-send included); INVALID_LEN on
        an extended request becomes a plain request of the same message. Returns the outcome,
        SW_EXITINFO2 and, after INVALID_LEN, the pages the host asked for."""
        k = self.k
        started = k.clock()
        needed: int | None = None
        while True:
            rc, info2, rbx = await self._issue(ext, certs_pages)
            if rc is Issued.ENOSPC:
                needed, ext, certs_pages = rbx, False, 0
                continue
            if rc is Issued.EAGAIN:
                k.event("busy_retry", detail=f"seqno {seqno}")
                # KERNEL: jiffies - req_start > SNP_REQ_MAX_RETRY_DURATION (60 s; the delay,
                # SNP_REQ_RETRY_DELAY, is 2 s): arch/x86/include/asm/sev.h
                if k.clock() - started > k.opts.retry_timeout_s:
                    return Issued.ETIMEDOUT, info2, needed
                await k.sleep(k.opts.retry_delay_s)
                continue  # the same encrypted message, the same sequence number
            return rc, info2, needed

    async def _issue(self, ext: bool, certs_pages: int) -> tuple[Issued, int, int]:
        """snp_issue_guest_request(): one VMGEXIT; (outcome, SW_EXITINFO2, RBX)."""
        x = g.Ghcb()
        code = g.EXIT_EXT_GUEST_REQUEST if ext else g.EXIT_GUEST_REQUEST
        for name, value in (
            ("sw_exit_code", code),
            ("sw_exit_info_1", REQ_GPA),
            ("sw_exit_info_2", RESP_GPA),
        ):
            x.set(name, value)
        if ext:
            x.set("rax", CERTS_GPA)
            x.set("rbx", certs_pages)
        r, back = await self.k.ghcb_exit(x)
        if r.terminated:
            # the host terminated the VM at this exit (GuestKernel.ghcb_exit() notes it): the
            # reply's exit infos are zero and no response was written. The guest never runs
            # again; the caller consumes the seqno and wipes the VMPCK as for a lost exit.
            raise Terminated("the host terminated this guest during a guest request")
        if int(r.sw_exit_info_1) & 0xFFFFFFFF:
            # KERNEL: verify_exception_info(): sev_es_ghcb_hv_call() failed, no firmware call
            return Issued.HV_CALL, SEV_RET_NO_FW_CALL, 0
        info2 = int(r.sw_exit_info_2)
        if info2 == 0:
            return Issued.OK, 0, 0
        if info2 == vmm_error(VMM_ERR_BUSY):
            return Issued.EAGAIN, info2, 0
        if info2 == vmm_error(VMM_ERR_INVALID_LEN) and ext:
            return Issued.ENOSPC, info2, int(back.get("rbx"))
        return Issued.EIO, info2, 0  # INVALID_LEN on a plain request included (fallthrough)

    @staticmethod
    def _verify(key: bytes, hdr: gm.Header, page: bytes) -> bytes:
        """verify_and_dec_payload(); MessageError says what is wrong."""
        rh = gm.parse_header(page)
        if rh.seqno != hdr.seqno + 1:
            raise gm.MessageError(f"response sequence number {rh.seqno}, expected {hdr.seqno + 1}")
        if rh.msg_type != hdr.msg_type + 1 or rh.msg_version != hdr.msg_version:
            raise gm.MessageError("wrong response type or version")
        # UNVERIFIED(guest-resp-bound): verify_and_dec_payload() bounds msg_sz + authsize by
        # the caller's resp_sz (the MSG_*_RSP size plus the tag); here by the page's payload area
        if rh.msg_sz + gm.AUTHTAG_LEN > gm.MAX_PAYLOAD:
            raise gm.MessageError("response larger than the buffer")
        return gm.open_payload(key, rh, page)


def report_request(report_data: bytes, vmpl: int) -> bytes:
    """MSG_REPORT_REQ (abi/guest_payload.py)."""
    return ReportRequest(report_data, vmpl).pack()


def key_request(root_vmrk: bool, field_select: int, vmpl: int, svn: int, tcb: int) -> bytes:
    """MSG_KEY_REQ (abi/guest_payload.py)."""
    return KeyRequest(int(root_vmrk), field_select, vmpl, svn, tcb).pack()
