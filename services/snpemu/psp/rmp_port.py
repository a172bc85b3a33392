"""How the firmware reaches memory and the RMP: only through rmp, as the AMD-SP does by DMA.

`RmpPort` is what the firmware model needs; `GrpcRmp` talks to the rmp service; tests may use
`LocalRmp` over an in-process RmpMachine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc

from snpemu.abi.rmp import FwOp, PageState
from snpemu.errors import SnpemuError, Unavailable, WrongState
from snpemu.psp.status import SevStatus, fail
from snpemu.rmp.machine import RmpMachine
from snpemu.runtime.servicer import CREDENTIAL_HEADER
from snpemu.runtime.status import error_info


@dataclass(frozen=True)
class Page:
    state: PageState
    asid: int
    gpa: int
    size_2m: bool
    vmsa: bool


@dataclass(frozen=True)
class Platform:
    memory_bytes: int
    rmp_covered_bytes: int
    snp_capable: bool


class RmpPort(Protocol):
    async def platform(self) -> Platform: ...
    async def page(self, spa: int) -> Page: ...
    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]: ...
    async def read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes: ...
    async def write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None: ...
    async def install_key(self, asid: int, key: bytes) -> None: ...
    async def remove_key(self, asid: int) -> None: ...
    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        """Has every core executed WBINVD since the indicator was last cleared; clear it after."""
        ...


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

    def _ensure_channel(self) -> None:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address)
            self.stub = rmp_pb2_grpc.RmpServiceStub(self.channel)

    async def _call(self, method: str, request: object) -> object:
        self._ensure_channel()
        try:
            return await getattr(self.stub, method)(request, metadata=self.md, timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"rmp is unreachable: {e.details()}") from None
            info = error_info(e)
            if info is not None and info.reason == "PAGE_STATE_MISMATCH":
                raise fail(SevStatus.INVALID_PAGE_STATE, e.details() or "page state") from None
            raise

    async def platform(self) -> Platform:
        r = await self._call("GetPlatformInfo", pb.GetPlatformInfoRequest())
        return Platform(r.memory_bytes, r.rmp_covered_bytes, r.snp_capable)  # type: ignore[attr-defined]

    async def page(self, spa: int) -> Page:
        e = (await self._call("ReadRmpEntry", pb.ReadRmpEntryRequest(pfn=spa >> 12))).entry  # type: ignore[attr-defined]
        return Page(PageState(e.state), e.asid, e.gpa, e.page_size == 2, e.vmsa)

    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        r = await self._call(
            "FirmwareTransition",
            pb.FirmwareTransitionRequest(spas=spas, op=pb.FirmwareOp.ValueType(int(op)), asid=asid),
        )
        return list(r.changed)  # type: ignore[attr-defined]

    async def _session_call(self, op: pb.FirmwareSessionRequest) -> pb.FirmwareSessionResponse:
        """One access on the FirmwareSession stream (opened on first use, reopened if lost)."""
        async with self._session_lock:
            for attempt in (1, 2):
                if self._session is None:
                    self._ensure_channel()
                    self._session = self.stub.FirmwareSession(metadata=self.md)
                try:
                    await self._session.write(op)
                    reply = await self._session.read()
                except grpc.aio.AioRpcError as e:
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
            if err.reason == "PAGE_STATE_MISMATCH":
                raise fail(SevStatus.INVALID_PAGE_STATE, err.message)
            raise SnpemuError(err.message, reason=err.reason, metadata=dict(err.metadata))
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
        await self._call("InstallMemoryKey", pb.InstallMemoryKeyRequest(asid=asid, key=key))

    async def remove_key(self, asid: int) -> None:
        await self._call("RemoveMemoryKey", pb.RemoveMemoryKeyRequest(asid=asid))

    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        r = await self._call(
            "FirmwareWbinvdIndicator", pb.FirmwareWbinvdIndicatorRequest(clear=clear)
        )
        return bool(r.set)  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._session is not None:
            self._session.cancel()
        if self.channel is not None:
            await self.channel.close()


class LocalRmp:
    """The same port over an in-process RmpMachine (unit tests of the firmware model)."""

    def __init__(self, machine: RmpMachine) -> None:
        self.m = machine

    async def platform(self) -> Platform:
        return Platform(self.m.memory_bytes, self.m.memory_bytes, self.m.snp_capable)

    async def page(self, spa: int) -> Page:
        e = self.m.entry(spa >> 12)
        return Page(e.state, e.asid, e.gpa, e.page_size_2m, e.vmsa)

    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        return self.m.fw_transition(spas, op, asid)

    async def read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        try:
            return self.m.fw_read(spa, length, asid, expect, checks)
        except WrongState as e:
            raise fail(SevStatus.INVALID_PAGE_STATE, e.message) from None

    async def write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        try:
            self.m.fw_write(spa, data, asid, expect)
        except WrongState as e:
            raise fail(SevStatus.INVALID_PAGE_STATE, e.message) from None

    async def install_key(self, asid: int, key: bytes) -> None:
        self.m.keys.install(asid, key)

    async def remove_key(self, asid: int) -> None:
        self.m.keys.remove(asid)

    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        return self.m.fw_wbinvd_indicator(clear)
