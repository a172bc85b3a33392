"""The model's values as rmp.proto messages, and the few request fields that need decoding."""

from __future__ import annotations

from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2 as pb

from snpemu.errors import InvalidArgument, SnpemuError
from snpemu.rmp.entry import Entry
from snpemu.rmp.fault import Fault
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.violations import Kick
from snpemu.runtime.status import grpc_code


def result_pb(code: int) -> pb.RmpResult.ValueType:
    # Enum values are the hardware codes plus one (0 means "not given").
    return pb.RmpResult.ValueType(code + 1)


def size_2m(size: int, field: str = "page_size") -> bool:
    if size == types_pb2.PAGE_SIZE_4K:
        return False
    if size == types_pb2.PAGE_SIZE_2M:
        return True
    raise InvalidArgument(
        f"{field} must be PAGE_SIZE_4K or PAGE_SIZE_2M",
        reason=RmpReason.MISSING_FIELD if size == 0 else RmpReason.UNKNOWN_ENUM_VALUE,
    )


def entry_pb(e: Entry) -> pb.RmpEntry:
    return pb.RmpEntry(
        pfn=e.pfn,
        assigned=e.assigned,
        page_size=types_pb2.PAGE_SIZE_2M if e.page_size_2m else types_pb2.PAGE_SIZE_4K,
        immutable=e.immutable,
        gpa=e.gpa,
        asid=e.asid,
        vmsa=e.vmsa,
        validated=e.validated,
        vmpl1_perms=e.vmpl_perms[0],
        vmpl2_perms=e.vmpl_perms[1],
        vmpl3_perms=e.vmpl_perms[2],
        state=types_pb2.PageState.ValueType(int(e.state)),
        raw=e.raw,
        leaked=e.leaked,
    )


def fault_pb(f: Fault | None) -> pb.GuestFault | None:
    if f is None:
        return None
    return pb.GuestFault(vc=f.vc, npf=not f.vc, error_code=f.error_code, gpa=f.gpa, cause=f.cause)


def kick_pb(k: Kick) -> pb.WatchMmuNotificationsResponse:
    return pb.WatchMmuNotificationsResponse(
        sequence=k.sequence, asid=k.asid, pfn=k.pfn, reason=k.reason, terminate=k.terminate
    )


def session_error(e: SnpemuError) -> pb.SessionError:
    """What a unary call would carry as its status, in-band in a session reply."""
    return pb.SessionError(
        code=grpc_code(e).value[0], message=e.message, reason=e.reason, metadata=e.metadata
    )
