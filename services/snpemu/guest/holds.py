"""A server stream a VMM keeps open to hold what it made (a VM fd, a vhost-user socket): its
first message confirms the hold, its end means the peer went away."""

from __future__ import annotations

from typing import Any

import grpc

from snpemu.errors import Unavailable
from snpemu.runtime.peers import PeerError


class StreamHold:
    def __init__(self, call: Any) -> None:
        self.call = call

    async def wait(self) -> None:
        await self.call.read()

    def cancel(self) -> None:
        self.call.cancel()


async def held(name: str, call: Any) -> tuple[StreamHold, Any]:
    """The hold and its first message, errors decoded as Peer.invoke's; a stream that gave none is
    cancelled."""
    try:
        return StreamHold(call), await call.read()
    except grpc.aio.AioRpcError as e:
        call.cancel()
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(f"{name} is unreachable: {e.details()}") from None
        raise PeerError(name, "Hold", e) from None
    except BaseException:
        call.cancel()
        raise
