"""gRPC adapter of the guest agent (what a user drives with grpcurl)."""

from __future__ import annotations

import struct
from typing import Any

from snp.guest.v1 import guest_pb2 as pb

from snpemu.abi import cert_table, report
from snpemu.abi import guest_message as gm
from snpemu.abi.addr import Gpa, page_aligned, page_bytes
from snpemu.errors import InvalidArgument
from snpemu.guest import probes
from snpemu.guest.driver import Driver, RequestFailed, key_request, report_request
from snpemu.guest.errors import GuestReason
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.net_rpcs import NetRpcs

GUID_NAMES = {
    cert_table.VCEK: "vcek",
    cert_table.VLEK: "vlek",
    cert_table.ASK: "ask",
    cert_table.ARK: "ark",
}


def fields_pb(raw: bytes) -> pb.ReportFields:
    return pb.ReportFields(**report.parse(raw))


class GuestServicer:
    def __init__(self, kernel: GuestKernel, driver: Driver, net: NetRpcs | None = None) -> None:
        self.k, self.driver, self.net = kernel, driver, net
        self.requests: dict[tuple[str, str], int] = {}

    def _count(self, kind: str, result: str) -> None:
        self.requests[(kind, result)] = self.requests.get((kind, result), 0) + 1

    async def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        k = self.k
        dev = self.net.dev if self.net is not None else None
        return pb.GetStatusResponse(
            net_sent=dev.stats.sent if dev else {},
            net_received=dev.stats.received if dev else {},
            net_reconnects=dev.stats.reconnects if dev else 0,
            vm_id=k.vm.id if k.vm is not None else "",
            name=k.name,
            state=pb.BootState.ValueType(int(k.state)),
            term_reason_set=k.term_reason[0],
            term_reason_code=k.term_reason[1],
            vcpus=len(k.vcpus) or k.opts.vcpus,
            memory_bytes=k.opts.memory_bytes,
            accepted_bytes=page_bytes(int(k.accepted.sum())),
            disabled_vmpcks=sorted(k.disabled),
            events=[
                pb.GuestEvent(timestamp_ns=e.timestamp_ns, kind=e.kind, gpa=e.gpa, detail=e.detail)
                for e in k.events[-200:]
            ],
        )

    def _report_args(self, request: Any) -> tuple[bytes, int]:
        if len(request.report_data) > 64:
            raise InvalidArgument("report_data is at most 64 bytes")
        if request.vmpl > 3:
            raise InvalidArgument("vmpl is 0..3")
        return bytes(request.report_data), int(request.vmpl)

    async def _exchange(
        self, kind: str, msg_type: int, payload: bytes, status_reason: GuestReason, **kw: Any
    ) -> Any:
        """One guest message, its result counted; a firmware status in the response (MSG_*_RSP
        status field) is INVALID_ARGUMENT with reason REPORT_STATUS or KEY_STATUS."""
        try:
            reply = await self.driver.request(msg_type, payload, **kw)
        except Exception:
            self._count(kind, "error")
            raise
        status = struct.unpack_from("<I", reply.payload, 0)[0]
        if status:
            self._count(kind, "firmware_status")
            raise InvalidArgument(
                f"the firmware refused the {kind}: status {status:#x}",
                reason=status_reason,
                metadata={"status": hex(status)},
            )
        self._count(kind, "success")
        return reply

    async def _report(self, request: Any, ext: bool, pages: int = 0) -> tuple[bytes, bytes]:
        data, vmpl = self._report_args(request)
        reply = await self._exchange(
            "report",
            gm.MsgType.REPORT_REQ,
            report_request(data, vmpl),
            GuestReason.REPORT_STATUS,
            ext=ext,
            certs_pages=pages,
        )
        size = struct.unpack_from("<I", reply.payload, 4)[0]
        return reply.payload[0x20 : 0x20 + size], reply.certs

    async def GetReport(self, request: Any, context: Any) -> pb.GetReportResponse:
        raw, _ = await self._report(request, ext=False)
        return pb.GetReportResponse(report=raw, fields=fields_pb(raw))

    async def GetExtendedReport(self, request: Any, context: Any) -> pb.GetExtendedReportResponse:
        pages = request.certs_pages or 16
        if pages > 16:
            raise InvalidArgument("certs_pages is at most 16")
        raw, certs = await self._report(request, ext=True, pages=pages)
        entries = cert_table.parse(certs)
        return pb.GetExtendedReportResponse(
            report=raw,
            fields=fields_pb(raw),
            certs_blob=certs,
            certificates=[
                pb.CertificateEntry(guid=GUID_NAMES.get(g, str(g)), der=der) for g, der in entries
            ],
        )

    async def GetDerivedKey(self, request: Any, context: Any) -> pb.GetDerivedKeyResponse:
        if request.vmpl > 3 or request.guest_field_select >> 7:
            raise InvalidArgument("vmpl is 0..3 and guest_field_select uses bits 0..6")
        req = key_request(
            request.root_key_vmrk,
            request.guest_field_select,
            request.vmpl,
            request.guest_svn,
            request.tcb_version,
        )
        reply = await self._exchange("key", gm.MsgType.KEY_REQ, req, GuestReason.KEY_STATUS)
        return pb.GetDerivedKeyResponse(key=reply.payload[0x20:0x40])

    async def ConvertMemory(self, request: Any, context: Any) -> pb.ConvertMemoryResponse:
        self.k.check_running()
        if request.conversion == pb.CONVERSION_UNSPECIFIED or request.page_size == 0:
            raise InvalidArgument("conversion and page_size are required")
        n = await self.k.convert(
            request.gpa,
            request.size,
            request.conversion == pb.CONVERSION_TO_PRIVATE,
            request.page_size == 2,
        )
        return pb.ConvertMemoryResponse(pages_changed=n)

    async def AcceptMemory(self, request: Any, context: Any) -> pb.AcceptMemoryResponse:
        self.k.check_running()
        return pb.AcceptMemoryResponse(
            pages_accepted=await self.k.accept(request.gpa, request.size)
        )

    async def WriteMemory(self, request: Any, context: Any) -> pb.WriteMemoryResponse:
        self.k.check_running()
        if not request.data:
            raise InvalidArgument("data is required")
        await self.k.write(request.gpa, bytes(request.data), request.shared)
        return pb.WriteMemoryResponse()

    async def ReadMemory(self, request: Any, context: Any) -> pb.ReadMemoryResponse:
        self.k.check_running()
        if not 0 < request.length <= 1 << 20:
            raise InvalidArgument("length is 1..1048576")
        return pb.ReadMemoryResponse(
            data=await self.k.read(request.gpa, request.length, request.shared)
        )

    # --- Misbehaviour on purpose (docs/design.md#misbehaviour) ----------------------------------

    async def TamperSequenceNumber(
        self, request: Any, context: Any
    ) -> pb.TamperSequenceNumberResponse:
        """A report request sealed with a replayed or skipped sequence number. The IV is the
        sequence number, so the firmware must refuse it; the driver then wipes VMPCK0, as
        snp_send_guest_request() does on any unexpected host error."""
        k = self.k
        k.check_running()
        offset = int(request.offset)
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
            return pb.TamperSequenceNumberResponse(
                outcome=f"sequence number {seqno} refused: {e}{wiped}"
            )
        self._count("report", "success")
        # a firmware that accepted it would be reusing an IV: say so loudly
        return pb.TamperSequenceNumberResponse(
            outcome=f"sequence number {seqno} ACCEPTED by the host (AES-GCM IV reuse)"
        )

    async def FloodReportRequests(
        self, request: Any, context: Any
    ) -> pb.FloodReportRequestsResponse:
        """Report requests back to back for `duration_ms`; the host's answer to a flood is VMM
        BUSY (kvm's per-VM throttle), which the driver retries after its delay."""
        if not 0 < request.duration_ms <= 60_000:
            raise InvalidArgument("duration_ms is 1..60000")
        self.k.check_running()
        busy_before = self.k.event_counts.get("busy_retry", 0)
        completed = 0
        # the guest's clock, the one its driver's retry loop counts on (a test sets its own)
        deadline = self.k.clock() + request.duration_ms / 1000
        while self.k.clock() < deadline:
            await self._report(pb.GetReportRequest(), ext=False)
            completed += 1
        return pb.FloodReportRequestsResponse(
            completed=completed, busy=self.k.event_counts.get("busy_retry", 0) - busy_before
        )

    async def AccessForeignMemory(
        self, request: Any, context: Any
    ) -> pb.AccessForeignMemoryResponse:
        """Reach for another guest's frame the only ways a guest has: the frame's address as a
        GPA through its own nested page table, and the other guest's ASID presented with a
        guessed vCPU token. Neither may reach the frame; the answer says what stopped each."""
        op = request.operation
        if op not in probes.FOREIGN_OPS:
            raise InvalidArgument('operation is "read", "validate" or "adjust"')
        if op != "read" and not page_aligned(request.spa):
            raise InvalidArgument("validate and adjust take a page-aligned address")
        self.k.check_running()
        outcomes = await probes.access_foreign(self.k, op, int(request.spa), int(request.asid))
        return pb.AccessForeignMemoryResponse(outcome="; ".join(outcomes))

    async def RaceRmpAdjust(self, request: Any, context: Any) -> pb.RaceRmpAdjustResponse:
        """RMPADJUST in a loop on a private page while the host converts it (drive the host
        side with rmp's RmpUpdate or a HostWrite under the convert policies)."""
        k = self.k
        if not page_aligned(request.gpa) or request.gpa >= k.opts.memory_bytes:
            raise InvalidArgument("gpa is a page-aligned address in guest RAM")
        if not 0 < request.iterations <= 100_000:
            raise InvalidArgument("iterations is 1..100000")
        k.check_running()
        outcomes = await probes.race_rmpadjust(k, Gpa(request.gpa), request.iterations)
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(outcomes.items()))
        return pb.RaceRmpAdjustResponse(
            inuse_failures=outcomes.get("FAIL_INUSE", 0),
            outcome=f"{sum(outcomes.values())} RMPADJUSTs: {summary}",
        )
