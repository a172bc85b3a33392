"""The firmware's RMP port on the rmp service: unary calls on the typed stub, and the
FirmwareSession stream for memory accesses (one stream, reopened once if lost)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc

from snpemu import errors
from snpemu.abi.addr import spa_to_pfn
from snpemu.abi.rmp import FwOp, PageState
from snpemu.errors import SnpemuError, Unavailable
from snpemu.psp.rmp_port import Page, Platform
from snpemu.psp.status import SevStatus, fail
from snpemu.rmp.reasons import RmpReason
from snpemu.runtime.servicer import CREDENTIAL_HEADER
from snpemu.runtime.status import error_info

R = TypeVar("R")

# The classes a refusal from rmp keeps (the caller caused it: its code goes on to psp's caller).
_KEEPS: dict[grpc.StatusCode, type[SnpemuError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.WrongState,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def rmp_error(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]
) -> SnpemuError:
    """What rmp refused, as the firmware reports it: a page in the wrong state is
    INVALID_PAGE_STATE and an address beyond memory INVALID_ADDRESS (firmware statuses, as a
    DMA the AMD-SP refuses); any other refusal keeps its code and reason."""
    if reason == RmpReason.PAGE_STATE_MISMATCH:
        return fail(SevStatus.INVALID_PAGE_STATE, message or "page state")
    if reason == RmpReason.BEYOND_MEMORY:
        return fail(SevStatus.INVALID_ADDRESS, message or "beyond memory")
    cls = _KEEPS.get(code, SnpemuError)
    return cls(f"rmp: {message}", reason=reason or code.name, metadata=metadata)


def _states(expect: tuple[PageState, ...]) -> list[types_pb2.PageState.ValueType]:
    # entry.PageState values are snp.common.v1.PageState's
    return [types_pb2.PageState.ValueType(int(s)) for s in expect]


class GrpcRmp:
    def __init__(self, address: str, credential: str | None) -> None:
        self.address = address
        self.channel: grpc.aio.Channel | None = None  # made on first use, in the serving loop
        self.md = ((CREDENTIAL_HEADER, credential),) if credential else ()
        self._session: Any = None
        self._session_lock = asyncio.Lock()

    @property
    def _stub(self) -> rmp_pb2_grpc.RmpServiceStub:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address)
            self.stub = rmp_pb2_grpc.RmpServiceStub(self.channel)
        return self.stub

    async def _call(self, rpc: Callable[..., Awaitable[R]], request: object) -> R:
        try:
            return await rpc(request, metadata=self.md, timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"rmp is unreachable: {e.details()}") from None
            info = error_info(e)
            reason = info.reason if info is not None else ""
            metadata = dict(info.metadata) if info is not None else {}
            raise rmp_error(e.code(), e.details() or "", reason, metadata) from None

    async def platform(self) -> Platform:
        r = await self._call(self._stub.GetPlatformInfo, pb.GetPlatformInfoRequest())
        return Platform(r.memory_bytes, r.rmp_covered_bytes, r.snp_capable)

    async def page(self, spa: int) -> Page:
        r = await self._call(self._stub.ReadRmpEntry, pb.ReadRmpEntryRequest(pfn=spa_to_pfn(spa)))
        e = r.entry
        return Page(PageState(e.state), e.asid, e.gpa, e.page_size == 2, e.vmsa)

    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        r = await self._call(
            self._stub.FirmwareTransition,
            pb.FirmwareTransitionRequest(spas=spas, op=pb.FirmwareOp.ValueType(int(op)), asid=asid),
        )
        return list(r.changed)

    def _forget_session(self) -> None:
        if self._session is not None:
            self._session.cancel()
        self._session = None

    async def _session_call(self, op: pb.FirmwareSessionRequest) -> pb.FirmwareSessionResponse:
        """One access on the FirmwareSession stream (opened on first use, reopened if lost)."""
        async with self._session_lock:
            for attempt in (1, 2):
                if self._session is None:
                    self._session = self._stub.FirmwareSession(metadata=self.md)
                try:
                    await self._session.write(op)
                except asyncio.InvalidStateError:
                    # grpc.aio's answer to a write on a stream that has ended (rmp went away
                    # since the last command): nothing was sent, a new stream takes it
                    self._session = None
                    continue
                except grpc.aio.AioRpcError as e:
                    self._session = None
                    if attempt == 2:
                        raise Unavailable(f"rmp is unreachable: {e.details()}") from None
                    continue
                except BaseException:
                    self._forget_session()  # a cancelled command: half an exchange
                    raise
                try:
                    reply = await self._session.read()
                except BaseException as e:
                    if not isinstance(e, grpc.aio.AioRpcError):
                        # cancelled while rmp answers: its reply must never reach the next
                        # command on this stream
                        self._forget_session()
                        raise
                    self._session = None
                    if attempt == 2:
                        raise Unavailable(f"rmp is unreachable: {e.details()}") from None
                    continue
                if reply is grpc.aio.EOF:
                    self._session = None
                    continue
                break
            else:
                raise Unavailable("rmp closed the firmware session")
        if reply.WhichOneof("result") == "error":
            err = reply.error
            code = _BY_NUMBER.get(err.code, grpc.StatusCode.UNKNOWN)
            raise rmp_error(code, err.message, err.reason, dict(err.metadata))
        return reply  # type: ignore[no-any-return]

    async def read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        req = pb.FirmwareReadRequest(
            spa=spa,
            length=length,
            asid=asid,
            expect_states=_states(expect),
            checks=[pb.PageCheck(spa=c, expect_states=_states(st)) for c, st in checks],
        )
        return bytes((await self._session_call(pb.FirmwareSessionRequest(read=req))).read.data)

    async def write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        req = pb.FirmwareWriteRequest(spa=spa, data=data, asid=asid, expect_states=_states(expect))
        await self._session_call(pb.FirmwareSessionRequest(write=req))

    async def install_key(self, asid: int, key: bytes) -> None:
        await self._call(
            self._stub.InstallMemoryKey, pb.InstallMemoryKeyRequest(asid=asid, key=key)
        )

    async def remove_key(self, asid: int) -> None:
        await self._call(self._stub.RemoveMemoryKey, pb.RemoveMemoryKeyRequest(asid=asid))

    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        r = await self._call(
            self._stub.FirmwareWbinvdIndicator, pb.FirmwareWbinvdIndicatorRequest(clear=clear)
        )
        return bool(r.set)

    async def close(self) -> None:
        if self._session is not None:
            self._session.cancel()
        if self.channel is not None:
            await self.channel.close()
