"""Reports and derived keys as the guest's users ask for them through the driver, counted by
result, and the attestation misbehaviours (a tampered sequence number, a report flood)."""

from __future__ import annotations

from typing import Any

from snpemu.abi import guest_message as gm
from snpemu.abi.guest_payload import key_from_response, report_from_response, status_of
from snpemu.errors import InvalidArgument
from snpemu.guest.driver import Driver, Reply, RequestFailed, key_request, report_request
from snpemu.guest.errors import GuestReason
from snpemu.guest.kernel import GuestKernel


class Attestation:
    def __init__(self, kernel: GuestKernel, driver: Driver) -> None:
        self.k, self.driver = kernel, driver
        # guest messages sent, by (report | key, success | firmware_status | error)
        self.requests: dict[tuple[str, str], int] = {}

    def _count(self, kind: str, result: str) -> None:
        self.requests[(kind, result)] = self.requests.get((kind, result), 0) + 1

    async def _exchange(
        self, kind: str, msg_type: int, payload: bytes, status_reason: GuestReason, **kw: Any
    ) -> Reply:
        """One guest message, its result counted; a firmware status in the response (MSG_*_RSP
        status field) is INVALID_ARGUMENT with reason REPORT_STATUS or KEY_STATUS."""
        try:
            reply = await self.driver.request(msg_type, payload, **kw)
        except Exception:
            self._count(kind, "error")
            raise
        status = status_of(reply.payload)
        if status:
            self._count(kind, "firmware_status")
            raise InvalidArgument(
                f"the firmware refused the {kind}: status {status:#x}",
                reason=status_reason,
                metadata={"status": hex(status)},
            )
        self._count(kind, "success")
        return reply

    async def report(
        self, report_data: bytes, vmpl: int, *, ext: bool, certs_pages: int = 0
    ) -> tuple[bytes, bytes]:
        """The signed report and (extended) the certificate table."""
        reply = await self._exchange(
            "report",
            gm.MsgType.REPORT_REQ,
            report_request(report_data, vmpl),
            GuestReason.REPORT_STATUS,
            ext=ext,
            certs_pages=certs_pages,
        )
        _, report = report_from_response(reply.payload)
        return report, reply.certs

    async def derived_key(
        self, root_vmrk: bool, field_select: int, vmpl: int, svn: int, tcb: int
    ) -> bytes:
        req = key_request(root_vmrk, field_select, vmpl, svn, tcb)
        reply = await self._exchange("key", gm.MsgType.KEY_REQ, req, GuestReason.KEY_STATUS)
        return key_from_response(reply.payload)[1]

    # --- Misbehaviour on purpose (docs/design.md#misbehaviour) ----------------------------------

    async def tamper_sequence_number(self, offset: int) -> str:
        """A report request sealed with a replayed or skipped sequence number. The IV is the
        sequence number, so the firmware must refuse it; the driver then wipes VMPCK0, as
        snp_send_guest_request() does on any unexpected host error."""
        k = self.k
        k.check_running()
        if offset == 0:
            raise InvalidArgument("offset 0 is an honest request: use GetReport")
        if offset < 0 and k.counters[0] + 1 + offset < 1:
            raise InvalidArgument(
                f"no earlier sequence number to replay {-offset} back (the next is "
                f"{k.counters[0] + 1})"
            )
        seqno = k.counters[0] + 1 + offset
        try:
            await self.driver.request(
                gm.MsgType.REPORT_REQ, report_request(b"", 0), seqno_offset=offset
            )
        except RequestFailed as e:
            self._count("report", "error")
            wiped = "; VMPCK0 wiped" if 0 in k.disabled else ""
            return f"sequence number {seqno} refused: {e}{wiped}"
        self._count("report", "success")
        # a firmware that accepted it would be reusing an IV: say so loudly
        return f"sequence number {seqno} ACCEPTED by the host (AES-GCM IV reuse)"

    async def flood(self, duration_ms: int) -> tuple[int, int]:
        """Report requests back to back for `duration_ms`; the host's answer to a flood is VMM
        BUSY (kvm's per-VM throttle), which the driver retries after its delay. Returns the
        requests completed and the BUSY retries they took."""
        self.k.check_running()
        busy_before = self.k.event_counts.get("busy_retry", 0)
        completed = 0
        # the guest's clock, the one its driver's retry loop counts on (a test sets its own)
        deadline = self.k.clock() + duration_ms / 1000
        while self.k.clock() < deadline:
            await self.report(b"", 0, ext=False)
            completed += 1
        return completed, self.k.event_counts.get("busy_retry", 0) - busy_before
