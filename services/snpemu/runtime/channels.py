"""Client channels that send a credential on every call, for tools that talk to a guest
agent as its owner (the lab, scripts) without threading metadata through each call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from snpemu.runtime.credentials import OWNER_HEADER


# grpc.aio's interceptor bases have no type stubs
class _WithMetadata(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*self.metadata)
        for key, value in d.metadata or ():
            md.add(key, value)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def owner_channel(address: str, owner_credential: str | None) -> grpc.aio.Channel:
    """A plaintext channel to a guest agent, as its owner (no credential: an open agent)."""
    if not owner_credential:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.insecure_channel(
        address, interceptors=[_WithMetadata(((OWNER_HEADER, owner_credential),))]
    )
