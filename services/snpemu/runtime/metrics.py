"""The standard gRPC server metric families, on a registry each service is given.

Names and labels follow go-grpc-prometheus, which Grafana's gRPC dashboards expect:
grpc_server_started_total, grpc_server_handled_total, grpc_server_handling_seconds, with
grpc_type, grpc_service, grpc_method and (for handled) grpc_code in Go's spelling ("OK",
"InvalidArgument", "Unimplemented", ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

# No *_created series beside each counter and histogram: Prometheus's text format does not use
# them, and they would double the series count (docs/metrics.md lists what is exported).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# Go's codes.Code.String(): what go-grpc-prometheus puts in grpc_code.
_GO_NAMES = {grpc.StatusCode.CANCELLED: "Canceled", grpc.StatusCode.OK: "OK"}


def go_code_name(code: grpc.StatusCode) -> str:
    if code in _GO_NAMES:
        return _GO_NAMES[code]
    return "".join(part.capitalize() for part in code.name.split("_"))


# Local RPCs take tens of microseconds; the default buckets would start at 5 ms.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def rpc_type(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming and server_streaming:
        return "bidi_stream"
    if client_streaming:
        return "client_stream"
    if server_streaming:
        return "server_stream"
    return "unary"


class GrpcServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=BUCKETS,
            registry=registry,
        )
        self._types: dict[str, str] = {}

    def initialise(self, methods: Iterable[tuple[str, str, str]]) -> None:
        """Create every (type, service, method) series, and its handled series for every status
        code, at zero: a series born at its first increment starts at 1, and rate() sees no
        step in it, so the first error would show on no dashboard.
        SPEC: go-grpc-prometheus server_metrics.go preRegisterMethod() (every code in allCodes)."""
        codes = [go_code_name(code) for code in grpc.StatusCode]
        for kind, service, method in methods:
            self._types[f"/{service}/{method}"] = kind
            self.started.labels(kind, service, method)
            for code in codes:
                self.handled.labels(kind, service, method, code)
            self.handling.labels(kind, service, method)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)

    def record(self, full_method: str, kind: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.handled.labels(kind, service, method, go_code_name(code)).inc()
        self.handling.labels(kind, service, method).observe(seconds)

    def start(self, full_method: str, kind: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.started.labels(kind, service, method).inc()


def _final_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    # grpc.aio may report the code as its integer value.
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return default


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        kind = rpc_type(handler.request_streaming, handler.response_streaming)
        metrics = self.metrics

        if handler.unary_unary:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler

        @contextlib.contextmanager
        def observed(context: grpc.aio.ServicerContext) -> Iterator[None]:
            metrics.start(method, kind)
            began = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                yield
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                elapsed = time.perf_counter() - began
                metrics.record(method, kind, _final_code(context, code), elapsed)

        if inspect.isasyncgenfunction(behavior):

            async def wrapped_gen(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                with observed(context):
                    async for item in behavior(request, context):
                        yield item

            wrapped: Any = wrapped_gen
        else:

            async def wrapped_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with observed(context):
                    return await behavior(request, context)

            wrapped = wrapped_call

        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
