"""gRPC adapter of the guest agent (what a user drives with grpcurl)."""

from __future__ import annotations

from typing import Any

from snp.common.v1 import types_pb2
from snp.guest.v1 import guest_pb2 as pb

from snpemu.abi import cert_table, report
from snpemu.abi.addr import PAGE_SIZE, Gpa, page_aligned, page_bytes
from snpemu.errors import InvalidArgument, WrongState
from snpemu.guest import probes
from snpemu.guest.attestation import Attestation
from snpemu.guest.errors import GuestReason
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.network import Network

# the most a memory RPC moves in one call: ReadMemory's length and WriteMemory's data
MAX_TRANSFER = 1 << 20
# SPEC: SNP ABI, MSG_REPORT_REQ: REPORT_DATA is 64 bytes; VMPL 0..3
REPORT_DATA_MAX, VMPL_MAX = 64, 3
# the certificate buffer the agent offers an extended request, in pages
CERTS_PAGES_MAX = 16
# SPEC: SNP ABI, MSG_KEY_REQ GUEST_FIELD_SELECT: bits 0..5 select guest policy, image ID,
# family ID, measurement, guest SVN and TCB version, bit 6 the launch mitigation vector (in
# the revisions that define it); the bits above are reserved.
GUEST_FIELD_SELECT_BITS = 7
CONVERSIONS: dict[int, bool] = {pb.CONVERSION_TO_PRIVATE: True, pb.CONVERSION_TO_SHARED: False}
PAGE_SIZES: dict[int, bool] = {types_pb2.PAGE_SIZE_4K: False, types_pb2.PAGE_SIZE_2M: True}

GUID_NAMES = {
    cert_table.VCEK: "vcek",
    cert_table.VLEK: "vlek",
    cert_table.ASK: "ask",
    cert_table.ARK: "ark",
}


def fields_pb(raw: bytes) -> pb.ReportFields:
    return pb.ReportFields(**report.parse(raw))


def _vmpl(vmpl: int) -> None:
    if vmpl > VMPL_MAX:
        raise InvalidArgument(f"vmpl is 0..{VMPL_MAX}", reason=GuestReason.BAD_FIELD)


def _enum(name: str, value: int, meaning: dict[int, bool]) -> bool:
    """What a required enum field's value means; 0 (unset) and numbers the .proto does not
    define are refused (proto3 enums are open: any int32 arrives)."""
    if value not in meaning:
        raise InvalidArgument(
            f"{name} is required" if value == 0 else f"{name} {value} is not defined",
            reason=GuestReason.BAD_FIELD if value == 0 else GuestReason.BAD_ENUM,
        )
    return meaning[value]


class GuestServicer:
    def __init__(
        self, kernel: GuestKernel, attestation: Attestation, net: Network | None = None
    ) -> None:
        self.k, self.attestation, self.net = kernel, attestation, net
        self.driver = attestation.driver

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
        if len(request.report_data) > REPORT_DATA_MAX:
            raise InvalidArgument(
                f"report_data is at most {REPORT_DATA_MAX} bytes", reason=GuestReason.TOO_LARGE
            )
        _vmpl(request.vmpl)
        return bytes(request.report_data), int(request.vmpl)

    def _in_ram(self, gpa: int, length: int) -> None:
        """The range lies in guest RAM (as AcceptMemory and ConvertMemory require)."""
        if not self.k.in_ram(gpa, length):
            raise WrongState("range must be inside guest RAM", reason=GuestReason.BAD_RANGE)

    async def GetReport(self, request: Any, context: Any) -> pb.GetReportResponse:
        data, vmpl = self._report_args(request)
        raw, _ = await self.attestation.report(data, vmpl, ext=False)
        return pb.GetReportResponse(report=raw, fields=fields_pb(raw))

    async def GetExtendedReport(self, request: Any, context: Any) -> pb.GetExtendedReportResponse:
        pages = request.certs_pages or CERTS_PAGES_MAX
        if pages > CERTS_PAGES_MAX:
            raise InvalidArgument(
                f"certs_pages is at most {CERTS_PAGES_MAX}", reason=GuestReason.BAD_FIELD
            )
        data, vmpl = self._report_args(request)
        raw, certs = await self.attestation.report(data, vmpl, ext=True, certs_pages=pages)
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
        _vmpl(request.vmpl)
        if request.guest_field_select >> GUEST_FIELD_SELECT_BITS:
            raise InvalidArgument("guest_field_select uses bits 0..6", reason=GuestReason.BAD_FIELD)
        key = await self.attestation.derived_key(
            request.root_key_vmrk,
            request.guest_field_select,
            request.vmpl,
            request.guest_svn,
            request.tcb_version,
        )
        return pb.GetDerivedKeyResponse(key=key)

    async def ConvertMemory(self, request: Any, context: Any) -> pb.ConvertMemoryResponse:
        private = _enum("conversion", request.conversion, CONVERSIONS)
        size_2m = _enum("page_size", request.page_size, PAGE_SIZES)
        self.k.check_running()
        n = await self.k.convert(request.gpa, request.size, private, size_2m)
        return pb.ConvertMemoryResponse(pages_changed=n)

    async def AcceptMemory(self, request: Any, context: Any) -> pb.AcceptMemoryResponse:
        self.k.check_running()
        return pb.AcceptMemoryResponse(
            pages_accepted=await self.k.accept(request.gpa, request.size)
        )

    async def WriteMemory(self, request: Any, context: Any) -> pb.WriteMemoryResponse:
        if not 0 < len(request.data) <= MAX_TRANSFER:
            raise InvalidArgument(
                f"data is 1..{MAX_TRANSFER} bytes",
                reason=GuestReason.TOO_LARGE if request.data else GuestReason.BAD_FIELD,
            )
        self._in_ram(request.gpa, len(request.data))
        self.k.check_running()
        await self.k.write(request.gpa, bytes(request.data), request.shared)
        return pb.WriteMemoryResponse()

    async def ReadMemory(self, request: Any, context: Any) -> pb.ReadMemoryResponse:
        if not 0 < request.length <= MAX_TRANSFER:
            raise InvalidArgument(
                f"length is 1..{MAX_TRANSFER}",
                reason=GuestReason.TOO_LARGE if request.length else GuestReason.BAD_FIELD,
            )
        self._in_ram(request.gpa, request.length)
        self.k.check_running()
        return pb.ReadMemoryResponse(
            data=await self.k.read(request.gpa, request.length, request.shared)
        )

    # --- Misbehaviour on purpose (docs/design.md#misbehaviour) ----------------------------------

    async def TamperSequenceNumber(
        self, request: Any, context: Any
    ) -> pb.TamperSequenceNumberResponse:
        outcome = await self.attestation.tamper_sequence_number(int(request.offset))
        return pb.TamperSequenceNumberResponse(outcome=outcome)

    async def FloodReportRequests(
        self, request: Any, context: Any
    ) -> pb.FloodReportRequestsResponse:
        if not 0 < request.duration_ms <= 60_000:
            raise InvalidArgument("duration_ms is 1..60000", reason=GuestReason.BAD_FIELD)
        completed, busy = await self.attestation.flood(request.duration_ms)
        return pb.FloodReportRequestsResponse(completed=completed, busy=busy)

    async def AccessForeignMemory(
        self, request: Any, context: Any
    ) -> pb.AccessForeignMemoryResponse:
        op = request.operation
        if op not in probes.FOREIGN_OPS:
            raise InvalidArgument(
                'operation is "read", "validate" or "adjust"', reason=GuestReason.BAD_FIELD
            )
        if op != "read" and not page_aligned(request.spa):
            raise InvalidArgument(
                "validate and adjust take a page-aligned address", reason=GuestReason.BAD_FIELD
            )
        self.k.check_running()
        outcomes = await probes.access_foreign(self.k, op, int(request.spa), int(request.asid))
        return pb.AccessForeignMemoryResponse(outcome="; ".join(outcomes))

    async def RaceRmpAdjust(self, request: Any, context: Any) -> pb.RaceRmpAdjustResponse:
        """Drive the host side with rmp's RmpUpdate or a HostWrite under the convert policies."""
        k = self.k
        if not page_aligned(request.gpa) or not k.in_ram(request.gpa, PAGE_SIZE):
            raise InvalidArgument(
                "gpa is a page-aligned address in guest RAM", reason=GuestReason.BAD_RANGE
            )
        if not 0 < request.iterations <= 100_000:
            raise InvalidArgument("iterations is 1..100000", reason=GuestReason.BAD_FIELD)
        k.check_running()
        outcomes = await probes.race_rmpadjust(k, Gpa(request.gpa), request.iterations)
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(outcomes.items()))
        return pb.RaceRmpAdjustResponse(
            inuse_failures=outcomes.get("FAIL_INUSE", 0),
            outcome=f"{sum(outcomes.values())} RMPADJUSTs: {summary}",
        )
