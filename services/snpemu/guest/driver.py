"""The sev-guest driver's rules for guest messages (reference 5.6).

KERNEL: arch/x86/coco/sev/core.c snp_send_guest_request(), verify_and_dec_payload();
drivers/virt/coco/sev-guest/sev-guest.c. Sequence numbers are never reused; the VMPCK is wiped
(and further requests refused) on a wrong response sequence number, type, version or size, a
failed authentication, or any host error other than VMM BUSY (retried after a delay, the same
message, until a timeout) and INVALID_LEN on an extended request (re-issued as a plain request
to consume the sequence number, then the needed size is reported).
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.errors import WrongState
from snpemu.guest.kernel import CERTS_GPA, CERTS_PAGES, PAGE, REQ_GPA, RESP_GPA, GuestKernel

VMM_ERR_INVALID_LEN, VMM_ERR_BUSY = 1, 2
SEQNO_MAX = 2**32 - 1  # the OS area keeps u32 counters


class VmpckDisabled(WrongState):
    default_reason = "VMPCK_DISABLED"


class RequestFailed(WrongState):
    default_reason = "GUEST_REQUEST_FAILED"


@dataclass
class Reply:
    payload: bytes
    certs: bytes = b""


class Driver:
    def __init__(self, kernel: GuestKernel) -> None:
        self.k = kernel
        self.lock = asyncio.Lock()

    async def disable(self, vmpck: int, why: str) -> None:
        """Wipe the key (the secrets page copy too) so the IV can never be reused."""
        k = self.k
        k.vmpcks[vmpck] = bytes(32)
        k.disabled.add(vmpck)
        k.event("vmpck_disabled", detail=f"VMPCK{vmpck}: {why}")
        await k.write_private(k.secrets_gpa + 0x20 + 32 * vmpck, bytes(32))

    async def request(
        self,
        msg_type: int,
        payload: bytes,
        *,
        vmpck: int = 0,
        ext: bool = False,
        certs_pages: int = CERTS_PAGES,
        seqno_offset: int = 0,
    ) -> Reply:
        async with self.lock:
            return await self._request(msg_type, payload, vmpck, ext, certs_pages, seqno_offset)

    async def _request(
        self,
        msg_type: int,
        payload: bytes,
        vmpck: int,
        ext: bool,
        certs_pages: int,
        seqno_offset: int,
    ) -> Reply:
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
        await k.write(REQ_GPA, gm.seal(key, hdr, payload), shared=True)
        started = time.monotonic()
        while True:
            info2, rbx = await self._exit(ext, certs_pages)
            if info2 >> 32 == VMM_ERR_BUSY:
                k.event("busy_retry", detail=f"seqno {seqno}")
                if time.monotonic() - started >= k.opts.retry_timeout_s:
                    await self.disable(vmpck, "VMM BUSY past the retry timeout")
                    raise RequestFailed("the host stayed busy: giving up (ETIMEDOUT)")
                await asyncio.sleep(k.opts.retry_delay_s)
                continue  # the same encrypted message, the same sequence number
            if ext and info2 >> 32 == VMM_ERR_INVALID_LEN:
                # Consume the sequence number with a plain request, then report the size.
                info2, _ = await self._exit(False, 0)
                if info2 == 0:
                    k.counters[vmpck] += 2
                raise RequestFailed(
                    f"certificate buffer too small: {rbx} pages needed",
                    metadata={"needed_pages": str(rbx)},
                )
            break
        if info2 != 0:
            await self.disable(vmpck, f"host error exitinfo2={info2:#x}")
            raise RequestFailed(
                f"the host answered exitinfo2={info2:#x}",
                metadata={"fw_error": hex(info2 & 0xFFFFFFFF), "vmm_error": hex(info2 >> 32)},
            )
        page = await k.read(RESP_GPA, PAGE, shared=True)
        rh = gm.parse_header(page)
        why = ""
        if rh.seqno != seqno + 1:
            why = f"response sequence number {rh.seqno}, expected {seqno + 1}"
        elif rh.msg_type != msg_type + 1 or rh.msg_version != hdr.msg_version:
            why = "wrong response type or version"
        elif rh.msg_sz + gm.AUTHTAG_LEN > gm.MAX_PAYLOAD:
            why = "response larger than the buffer"
        if not why:
            try:
                body = gm.open_payload(key, rh, page)
            except gm.MessageError as e:
                why = str(e)
        if why:
            await self.disable(vmpck, why)
            raise RequestFailed(f"bad response: {why}")
        k.counters[vmpck] += 2
        certs = b""
        if ext:
            certs = await k.read(CERTS_GPA, certs_pages * PAGE, shared=True)
        return Reply(body, certs)

    async def _exit(self, ext: bool, certs_pages: int) -> tuple[int, int]:
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
        if r.sw_exit_info_1:
            return (1 << 63) | r.sw_exit_info_2, 0
        return int(r.sw_exit_info_2), back.get("rbx")


def report_request(report_data: bytes, vmpl: int) -> bytes:
    """MSG_REPORT_REQ: user_data[64], u32 vmpl, rsvd[28]."""
    return report_data.ljust(64, b"\0") + struct.pack("<I", vmpl) + bytes(28)


def key_request(root_vmrk: bool, field_select: int, vmpl: int, svn: int, tcb: int) -> bytes:
    """MSG_KEY_REQ: u32 root_key_select, rsvd, u64 field_select, u32 vmpl, u32 svn, u64 tcb."""
    return struct.pack("<IIQIIQQ", int(root_vmrk), 0, field_select, vmpl, svn, tcb, 0)
