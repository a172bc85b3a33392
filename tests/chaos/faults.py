"""Failures injected where kvm meets its peers: a server interceptor on rmp and on psp that
fails one chosen call, over real gRPC, as a peer that refuses or is not there would.

The plan is shared by both interceptors, so it sees the host's calls in the order kvm made
them: `record()` learns a launch's steps, `arm()` fails the n-th call of one of them.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

Step = tuple[str, str, int]  # service, method, its n-th call in the cycle (1-based)

# Calls that are not a launch's: the host-epoch watch's boot id poll
BACKGROUND = frozenset({("rmp", "GetPlatformInfo")})


@dataclass
class Faults:
    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    trace: list[Step] | None = None
    armed: tuple[Step, grpc.StatusCode] | None = None
    injected: list[Step] = field(default_factory=list)

    def record(self) -> None:
        self.counts.clear()
        self.trace, self.armed = [], None

    def arm(self, step: Step, code: grpc.StatusCode) -> None:
        self.counts.clear()
        self.trace, self.armed = None, (step, code)

    def disarm(self) -> list[Step]:
        """Stop; what was recorded (empty when armed)."""
        trace = self.trace or []
        self.trace, self.armed = None, None
        return trace

    def interceptor(self, service: str) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self, service)

    def hit(self, service: str, method: str) -> grpc.StatusCode | None:
        """Count a call; the code to fail it with when it is the armed step."""
        if (service, method) in BACKGROUND or (self.trace is None and self.armed is None):
            return None
        self.counts[service, method] += 1
        step = (service, method, self.counts[service, method])
        if self.trace is not None:
            self.trace.append(step)
        if self.armed is not None and self.armed[0] == step:
            self.injected.append(step)
            return self.armed[1]
        return None


class _Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, faults: Faults, service: str) -> None:
        self.faults, self.service = faults, service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streams (sessions, holds) are not launch steps
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = self.faults.hit(self.service, method)
            if code is not None:  # refused before it did anything
                await context.abort(code, f"injected failure of {self.service} {method}")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
