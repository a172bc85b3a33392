"""runtime/peers.py SessionPool: a stream that ended while it sat idle (rmp closed it between
two calls) is dropped, and the request, which it never sent, goes on a fresh stream; when
every stream has ended the call is Unavailable (a lost session), never a bug's answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from snp.rmp.v1 import rmp_pb2
from snpemu.errors import Unavailable
from snpemu.runtime.peers import SessionPool

REPLY = rmp_pb2.HostSessionResponse()  # no result set: the pool hands it back as it came


class Stream:
    """grpc.aio's StreamStreamCall, as far as the pool uses it. An ended one does what
    grpc/aio/_call.py _write does once the RPC has finished: InvalidStateError."""

    def __init__(self, ended: bool, answers: bool = True) -> None:
        self.ended, self.answers, self.cancelled, self.sent = ended, answers, False, 0

    async def write(self, request: Any) -> None:
        if self.ended:
            raise asyncio.InvalidStateError("RPC already finished.")
        self.sent += 1

    async def read(self) -> Any:
        if not self.answers:
            await asyncio.Event().wait()  # rmp still working on it
        return REPLY

    def cancel(self) -> None:
        self.cancelled = True


class Pool(SessionPool):
    def __init__(self, ended: int, silent: int = 0) -> None:
        super().__init__(peer=None, size=2)  # type: ignore[arg-type]
        self.ended = ended  # how many of the first streams opened have ended already
        self.silent = silent  # how many of the first streams never answer
        self.made: list[Stream] = []

    def _open(self) -> Any:
        n = len(self.made)
        self.made.append(Stream(ended=n < self.ended, answers=n >= self.silent))
        return self.made[-1]


async def test_an_ended_idle_stream_is_dropped_and_the_request_goes_on_a_fresh_one() -> None:
    pool = Pool(ended=1)
    assert await pool.exchange(object()) is REPLY
    first, second = pool.made
    assert first.cancelled and first.sent == 0
    assert second.sent == 1 and pool.idle == [second] and pool.opened == 1


async def test_a_stream_that_ended_while_idle_is_dropped_for_a_fresh_one() -> None:
    pool = Pool(ended=0)
    assert await pool.exchange(object()) is REPLY
    (used,) = pool.idle
    used.ended = True  # rmp closed it while it sat in the pool
    assert await pool.exchange(object()) is REPLY
    assert used.cancelled and len(pool.made) == 2 and pool.idle == [pool.made[1]]
    assert pool.opened == 1


async def test_a_pool_whose_every_stream_ended_is_unavailable() -> None:
    pool = Pool(ended=100)
    with pytest.raises(Unavailable, match="session lost"):
        await pool.exchange(object())
    assert all(s.cancelled for s in pool.made) and pool.opened == 0 and pool.idle == []


async def test_a_caller_cancelled_mid_exchange_takes_its_stream_with_it() -> None:
    """Its reply, when it comes, must not be the next caller's: the stream is cancelled and
    its slot given back (a slot kept would, after `size` of these, block every caller)."""
    pool = Pool(ended=0, silent=3)
    for n in range(3):
        task = asyncio.ensure_future(pool.exchange(object()))
        deadline = asyncio.get_running_loop().time() + 10
        while len(pool.made) <= n or pool.made[n].sent == 0:  # written, waiting for rmp
            assert asyncio.get_running_loop().time() < deadline, f"exchange {n} never wrote"
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all(s.cancelled for s in pool.made) and pool.opened == 0 and pool.idle == []
    # a fourth stream, which answers (a bound on the wait: a pool that kept the slots blocks)
    assert await asyncio.wait_for(pool.exchange(object()), timeout=10) is REPLY
    assert len(pool.made) == 4


class FirmwareStub:
    """rmp's stub as psp's GrpcRmp uses it: FirmwareSession opens the next stream."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.opened = 0

    def FirmwareSession(self, metadata: Any) -> Stream:
        self.opened += 1
        return self.streams.pop(0)


async def test_psp_takes_a_fresh_firmware_session_for_one_that_ended_while_idle() -> None:
    from snpemu.psp.rmp_client import GrpcRmp

    rmp = GrpcRmp("127.0.0.1:1", "c")
    good = Stream(ended=False)
    stub = FirmwareStub([good])
    rmp.channel, rmp.stub = object(), stub  # type: ignore[assignment]
    rmp._session = Stream(ended=True)  # the stream the last command used: ended since
    assert await rmp._session_call(rmp_pb2.FirmwareSessionRequest()) is REPLY
    assert good.sent == 1 and rmp._session is good and stub.opened == 1
