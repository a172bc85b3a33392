"""gRPC adapter of the guest agent (what a user drives with grpcurl)."""

from __future__ import annotations

import struct
from typing import Any

from snp.guest.v1 import guest_pb2 as pb

from snpemu.abi import cert_table, report
from snpemu.abi import guest_message as gm
from snpemu.errors import InvalidArgument
from snpemu.guest.driver import Driver, key_request, report_request
from snpemu.guest.kernel import GuestKernel

GUID_NAMES = {
    cert_table.VCEK: "vcek",
    cert_table.VLEK: "vlek",
    cert_table.ASK: "ask",
    cert_table.ARK: "ark",
}


def fields_pb(raw: bytes) -> pb.ReportFields:
    return pb.ReportFields(**report.parse(raw))


class GuestServicer:
    def __init__(self, kernel: GuestKernel, driver: Driver) -> None:
        self.k, self.driver = kernel, driver
        self.requests: dict[tuple[str, str], int] = {}

    def _count(self, kind: str, result: str) -> None:
        self.requests[(kind, result)] = self.requests.get((kind, result), 0) + 1

    async def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        k = self.k
        return pb.GetStatusResponse(
            name=k.name,
            state=pb.BootState.ValueType(int(k.state)),
            term_reason_set=k.term_reason[0],
            term_reason_code=k.term_reason[1],
            vcpus=len(k.vcpus) or k.opts.vcpus,
            memory_bytes=k.opts.memory_bytes,
            accepted_bytes=int(k.accepted.sum()) * 4096,
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

    async def _report(self, request: Any, ext: bool, pages: int = 0) -> tuple[bytes, bytes]:
        data, vmpl = self._report_args(request)
        try:
            reply = await self.driver.request(
                gm.MsgType.REPORT_REQ, report_request(data, vmpl), ext=ext, certs_pages=pages
            )
        except Exception:
            self._count("report", "error")
            raise
        status, size = struct.unpack_from("<II", reply.payload, 0)
        if status:
            self._count("report", "firmware_status")
            raise InvalidArgument(
                f"the firmware refused the report: status {status:#x}",
                reason="REPORT_STATUS",
                metadata={"status": hex(status)},
            )
        self._count("report", "success")
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
        reply = await self.driver.request(gm.MsgType.KEY_REQ, req)
        status = struct.unpack_from("<I", reply.payload, 0)[0]
        if status:
            self._count("key", "firmware_status")
            raise InvalidArgument(
                f"the firmware refused the key: status {status:#x}",
                reason="KEY_STATUS",
                metadata={"status": hex(status)},
            )
        self._count("key", "success")
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
