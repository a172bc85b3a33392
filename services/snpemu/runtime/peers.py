"""Connections to peer services with the host (or VMM) credential, and their errors decoded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from snp.psp.v1 import psp_pb2_grpc
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc

from snpemu.errors import SnpemuError, Unavailable
from snpemu.runtime.servicer import CREDENTIAL_HEADER
from snpemu.runtime.status import error_info

R = TypeVar("R")


class PeerError(SnpemuError):
    """A peer answered with an error; fw_status is set when it was a firmware status."""

    def __init__(self, service: str, method: str, err: grpc.aio.AioRpcError) -> None:
        info = error_info(err)
        self.code = err.code()
        self.fw_status = (
            int(info.metadata["fw_status"], 16) if info and "fw_status" in info.metadata else None
        )
        super().__init__(
            f"{service} {method}: {err.details()}",
            reason=info.reason if info else self.code.name,
            metadata=dict(info.metadata) if info else {},
        )


class Peer:
    """Calls with the credential; UNAVAILABLE becomes Unavailable, other errors PeerError."""

    def __init__(self, name: str, address: str, credential: str | None, stub_cls: Any) -> None:
        self.name, self.address, self.stub_cls = name, address, stub_cls
        self.md = ((CREDENTIAL_HEADER, credential),) if credential else ()
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None

    def ensure(self) -> Any:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address)
            self.stub = self.stub_cls(self.channel)
        return self.stub

    async def invoke(
        self, rpc: Callable[..., Awaitable[R]], request: object, timeout: float = 30
    ) -> R:
        """One unary call of a bound method of the stub (`peer.invoke(peer.ensure().Psmash,
        request)`), with the credential and the errors decoded."""
        try:
            return await rpc(request, metadata=self.md, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(_method_name(rpc), e) from None

    def _error(self, method: str, e: grpc.aio.AioRpcError) -> SnpemuError:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(f"{self.name} is unreachable: {e.details()}")
        return PeerError(self.name, method, e)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


def _method_name(rpc: object) -> str:
    """The RPC's name for error messages: grpc's multicallables keep the full method path."""
    path = getattr(rpc, "_method", b"")
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    return str(path).rsplit("/", 1)[-1] or "call"


def rmp_peer(address: str, credential: str | None) -> Peer:
    return Peer("rmp", address, credential, rmp_pb2_grpc.RmpServiceStub)


def psp_peer(address: str, credential: str | None) -> Peer:
    return Peer("psp", address, credential, psp_pb2_grpc.PspServiceStub)


class SessionRefused(SnpemuError):
    """An error an rmp session answered in-band, with the status code it carried."""

    def __init__(self, err: Any) -> None:
        super().__init__(err.message, reason=err.reason, metadata=dict(err.metadata))
        self.code = next(
            (c for c in grpc.StatusCode if c.value[0] == err.code), grpc.StatusCode.UNKNOWN
        )


def session_error(err: Any) -> SnpemuError:
    """The error an rmp session answered in-band (rmp.proto SessionError), as the exception a
    unary call would have raised."""
    return SessionRefused(err)


class SessionPool:
    """Streams of one of rmp's session RPCs (one op in flight on each), reused so that each
    step costs one message, not one call: HostSession for kvm's exits (GHCB read, RMPUPDATE,
    GHCB write), GuestSession for a guest's vCPU (its memory accesses and PVALIDATEs). A
    subclass opens its stream on the typed stub (`_open`) and types `exchange`."""

    def __init__(self, peer: Peer, size: int = 8) -> None:
        self.peer = peer
        self.idle: list[Any] = []
        self.size = size
        self.opened = 0
        self.free = asyncio.Condition()
        self._wakers: set[asyncio.Future[None]] = set()

    async def exchange(self, request: Any) -> Any:
        """One session request, its reply (an in-band error raised as the unary call would)."""
        for _ in range(self.size + 1):
            stream = await self._acquire()
            try:
                await stream.write(request)
            except asyncio.InvalidStateError:
                # grpc.aio's answer to a write on a stream that has ended (rmp went away while
                # it sat idle): nothing was sent, so a fresh stream takes it
                self._drop(stream)
                continue
            except grpc.aio.AioRpcError as e:
                self._drop(stream)
                raise Unavailable(f"rmp session lost: {e.details()}") from None
            except BaseException:
                self._drop(stream)  # a cancelled caller: the stream holds half an exchange
                raise
            break
        else:
            raise Unavailable("rmp session lost: every stream had ended")
        try:
            reply = await stream.read()
        except grpc.aio.AioRpcError as e:
            self._drop(stream)
            raise Unavailable(f"rmp session lost: {e.details()}") from None
        except BaseException:
            # cancelled while rmp answers (the caller's own call was cancelled): the reply
            # must never reach the next op on this stream, so the stream goes
            self._drop(stream)
            raise
        if reply is grpc.aio.EOF:
            self._drop(stream)
            raise Unavailable("rmp closed the session")
        await self._release(stream)
        if reply.WhichOneof("result") == "error":
            raise session_error(reply.error)
        return reply

    async def _acquire(self) -> Any:
        async with self.free:
            while not self.idle and self.opened >= self.size:
                await self.free.wait()
            if self.idle:
                return self.idle.pop()
            self.opened += 1
        return self._open()

    def _open(self) -> Any:
        raise NotImplementedError

    async def _release(self, stream: Any) -> None:
        async with self.free:
            self.idle.append(stream)
            self.free.notify()

    def _drop(self, stream: Any) -> None:
        """The stream cancelled and its slot given back; synchronous, so that a cancelled
        caller's cleanup cannot itself be cut short."""
        stream.cancel()
        self.opened -= 1
        waker = asyncio.ensure_future(self._wake())
        self._wakers.add(waker)
        waker.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self.free:
            self.free.notify()

    async def close(self) -> None:
        for stream in self.idle:
            stream.cancel()
        self.idle.clear()


class HostSessions(SessionPool):
    """rmp's HostSession, typed: kvm's exit path (reads, writes, copies, batched RMPUPDATEs,
    and sequences of them in one message)."""

    def __init__(self, peer: Peer, size: int = 8) -> None:
        super().__init__(peer, size)

    async def exchange(self, request: rmp_pb2.HostSessionRequest) -> rmp_pb2.HostSessionResponse:
        reply: rmp_pb2.HostSessionResponse = await super().exchange(request)
        return reply

    def _open(self) -> Any:
        return self.peer.ensure().HostSession(metadata=self.peer.md)
