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

    def __init__(self, ended: bool) -> None:
        self.ended, self.cancelled, self.sent = ended, False, 0

    async def write(self, request: Any) -> None:
        if self.ended:
            raise asyncio.InvalidStateError("RPC already finished.")
        self.sent += 1

    async def read(self) -> Any:
        return REPLY

    def cancel(self) -> None:
        self.cancelled = True


class Pool(SessionPool):
    def __init__(self, ended: int) -> None:
        super().__init__(peer=None, size=2)  # type: ignore[arg-type]
        self.ended = ended  # how many of the next streams opened have ended already
        self.made: list[Stream] = []

    def _open(self) -> Any:
        self.made.append(Stream(ended=len(self.made) < self.ended))
        return self.made[-1]


async def test_an_ended_idle_stream_is_dropped_and_the_request_goes_on_a_fresh_one() -> None:
    pool = Pool(ended=1)
    assert await pool.exchange(object()) is REPLY
    first, second = pool.made
    assert first.cancelled and first.sent == 0
    assert second.sent == 1 and pool.idle == [second] and pool.opened == 1


async def test_a_pool_whose_every_stream_ended_is_unavailable() -> None:
    pool = Pool(ended=100)
    with pytest.raises(Unavailable, match="session lost"):
        await pool.exchange(object())
    assert all(s.cancelled for s in pool.made) and pool.opened == 0 and pool.idle == []
