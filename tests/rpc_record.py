"""What a test called through gRPC and how each call ended: the evidence behind its
`@pytest.mark.rpc("snp.kvm.v1.KvmService/KickVcpus", "ok")` markers.

While a test with rpc markers runs (or every test, with SNPEMU_RPC_RECORD=path), the channels
that test code opens (grpc.insecure_channel, grpc.aio.insecure_channel, called from a file
outside services/ and the installed packages) get client interceptors that record each call's
method and final status, and grpcurl run from test code through subprocess.run is recorded by
its exit status. Channels the services open
to each other are left alone: a service calling rmp is not a test calling it.

An "ok" claim needs a call of that method that ended with OK; for a method that streams its
responses, a call that delivered at least one response before the client hung up counts too
(HoldVm, WatchMmuNotifications and the like never end on their own). An "error" claim needs a
call that ended with one of CALLER_ERRORS: the codes a server answers a wrong request with.
An "unbuilt" claim needs a call that ended UNIMPLEMENTED (a method not built yet).
Transport and bug codes (UNAVAILABLE, UNKNOWN, INTERNAL, CANCELLED, DEADLINE_EXCEEDED, ...) do
not count as an error path.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

TESTS = Path(__file__).resolve().parent
SERVICES = TESTS.parent / "services"
OK = "ok"
ERROR = "error"
# UNIMPLEMENTED: a method declared in the .proto whose implementation is not built yet
# (runtime/servicer.py answers it with ErrorInfo NOT_BUILT); it has no success path to test.
UNBUILT = "unbuilt"
OUTCOMES = (OK, ERROR, UNBUILT)

# SPEC: https://grpc.github.io/grpc/core/md_doc_statuscodes.html: the codes a server generates
# for a request it refuses (argument, state, existence, permission), as opposed to the codes
# of the transport or of a server bug.
CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# grpcurl exits with 64 + the status code when the RPC fails (grpcurl cmd/grpcurl/grpcurl.go
# statusCodeOffset); other failures (bad flags, no connection) exit 1 or 2.
GRPCURL_STATUS_OFFSET = 64


@dataclass
class Call:
    method: str  # "snp.kvm.v1.KvmService/KickVcpus", no leading slash
    code: grpc.StatusCode | None = None  # None while it runs (or if the end was never seen)
    responses: int = 0
    response_stream: bool = False
    # responses of a session stream that carried an `error` (rmp's sessions answer a failed
    # op in-band with a SessionError and go on: rmp.proto FirmwareSession), by status code
    inband_errors: set[grpc.StatusCode] = field(default_factory=set)
    inband: int = 0

    def outcomes(self) -> set[str]:
        found = set()
        if self.code == grpc.StatusCode.OK:
            found.add(OK)
        if self.code in CALLER_ERRORS or self.inband_errors & CALLER_ERRORS:
            found.add(ERROR)
        if self.code == grpc.StatusCode.UNIMPLEMENTED:
            found.add(UNBUILT)
        if (
            self.response_stream
            and self.responses > self.inband
            and self.code in (None, grpc.StatusCode.CANCELLED)
        ):
            found.add(OK)
        return found

    def seen(self, response: Any) -> None:
        self.responses += 1
        which = getattr(response, "WhichOneof", None)
        oneofs = {o.name for o in response.DESCRIPTOR.oneofs} if which is not None else set()
        if "result" in oneofs and which("result") == "error":  # type: ignore[misc]
            self.inband += 1
            code = _BY_NUMBER.get(response.error.code)
            if code is not None:
                self.inband_errors.add(code)


@dataclass
class Recording:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, method: str | bytes, response_stream: bool = False) -> Call:
        if isinstance(method, bytes):
            method = method.decode()
        call = Call(method.lstrip("/"), response_stream=response_stream)
        with self.lock:
            self.calls.append(call)
        return call

    def outcomes(self) -> set[tuple[str, str]]:
        with self.lock:
            return {(c.method, o) for c in self.calls for o in c.outcomes()}


_current: Recording | None = None


def _aio_code(call: Any) -> grpc.StatusCode | None:
    """The final code of a finished aio call, without an event loop turn: Call.code() is a
    coroutine that returns at once when the status is in."""
    coro = call.code()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    except Exception:
        return None
    coro.close()
    return None


def _aio_done(rec: Call) -> Callable[[Any], None]:
    def done(call: Any) -> None:
        rec.code = _aio_code(call)

    return done


class _AioRecorder:
    def __init__(self, recording: Recording) -> None:
        self.recording = recording

    async def _unary(self, continuation: Any, details: Any, request: Any) -> Any:
        # the end comes by callback: awaiting it here would keep a cancel() from the caller
        # from reaching the call (it would cancel this interceptor instead)
        rec = self.recording.start(details.method)
        call = await continuation(details, request)
        call.add_done_callback(_aio_done(rec))
        return call

    async def _streamed(self, call: Any, rec: Call) -> AsyncIterator[Any]:
        async for response in call:
            rec.seen(response)
            yield response

    async def _stream(self, continuation: Any, details: Any, request: Any) -> Any:
        rec = self.recording.start(details.method, response_stream=True)
        call = await continuation(details, request)
        call.add_done_callback(_aio_done(rec))
        return self._streamed(call, rec)


# grpc.aio files each interceptor under the first of the four kinds it is (aio/_channel.py
# Channel.__init__), so one class per kind.
class _AioUnaryUnary(_AioRecorder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._unary(continuation, details, request)


class _AioStreamUnary(_AioRecorder, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._unary(continuation, details, requests)


class _AioUnaryStream(_AioRecorder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._stream(continuation, details, request)


class _AioStreamStream(_AioRecorder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._stream(continuation, details, requests)


def _aio_interceptors(rec: Recording) -> list[Any]:
    kinds = (_AioUnaryUnary, _AioStreamUnary, _AioUnaryStream, _AioStreamStream)
    return [kind(rec) for kind in kinds]


class _SyncRecorder(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The blocking client: the end of a call is its done callback (code() is final there)."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording

    def _any(self, continuation: Any, details: Any, request: Any, stream: bool) -> Any:
        rec = self.recording.start(details.method, response_stream=stream)
        outcome = continuation(details, request)

        def done(call: Any) -> None:
            with contextlib.suppress(Exception):
                rec.code = call.code()

        outcome.add_done_callback(done)
        return outcome

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._any(continuation, details, request, False)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._any(continuation, details, requests, False)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._any(continuation, details, request, False)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._any(continuation, details, requests, False)


_METHOD = re.compile(r"^/?([A-Za-z_][\w.]*\.[A-Za-z_]\w*)[/.]([A-Za-z_]\w*)$")


def record_grpcurl(recording: Recording, argv: list[str], returncode: int) -> None:
    """One grpcurl invocation: the method is its `pkg.Service/Method` argument; `list` and
    `describe` call no method of ours."""
    if any(a in ("list", "describe") for a in argv[1:]):
        return
    for arg in argv[1:]:
        if arg.startswith("-") or "/" not in arg:
            continue
        m = _METHOD.match(arg)
        if m:
            rec = recording.start(f"{m.group(1)}/{m.group(2)}")
            if returncode == 0:
                rec.code = grpc.StatusCode.OK
            elif returncode > GRPCURL_STATUS_OFFSET:
                rec.code = _BY_NUMBER.get(returncode - GRPCURL_STATUS_OFFSET)
            return


def _from_tests(depth: int = 2) -> bool:
    """The caller of the patched function is test code: not a service (services/), not an
    installed package (grpc itself, grpc_reflection, ...)."""
    filename = sys._getframe(depth).f_code.co_filename
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return not path.is_relative_to(SERVICES) and "site-packages" not in path.parts


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record what test code calls through gRPC until the block ends."""
    global _current
    rec = Recording()
    saved = (grpc.insecure_channel, grpc.aio.insecure_channel, subprocess.run)
    sync_channel, aio_channel, run = saved

    def insecure_channel(target: str, *args: Any, **kwargs: Any) -> Any:
        channel = sync_channel(target, *args, **kwargs)
        if _from_tests():
            return grpc.intercept_channel(channel, _SyncRecorder(rec))
        return channel

    def aio_insecure_channel(target: str, *args: Any, **kwargs: Any) -> Any:
        if _from_tests():
            if len(args) >= 3:
                args = (*args[:2], [*(args[2] or ()), *_aio_interceptors(rec)], *args[3:])
            else:
                kwargs["interceptors"] = [
                    *(kwargs.get("interceptors") or ()),
                    *_aio_interceptors(rec),
                ]
        return aio_channel(target, *args, **kwargs)

    def run_and_record(*args: Any, **kwargs: Any) -> Any:
        result = run(*args, **kwargs)
        argv = args[0] if args else kwargs.get("args")
        if (
            isinstance(argv, list | tuple)
            and argv
            and os.path.basename(str(argv[0])) == "grpcurl"
            and _from_tests()
        ):
            record_grpcurl(rec, [str(a) for a in argv], result.returncode)
        return result

    grpc.insecure_channel = insecure_channel
    grpc.aio.insecure_channel = aio_insecure_channel
    subprocess.run = run_and_record  # type: ignore[assignment]
    _current = rec
    try:
        yield rec
    finally:
        grpc.insecure_channel, grpc.aio.insecure_channel, subprocess.run = saved  # type: ignore[misc]
        _current = None


def rpc_modules() -> list[str]:
    """Every generated *_pb2 module of the project's own protos (services/snp/**)."""
    snp = SERVICES / "snp"
    return sorted(
        ".".join(p.relative_to(snp.parent).with_suffix("").parts) for p in snp.rglob("*_pb2.py")
    )


def all_methods() -> set[str]:
    """Every RPC the project serves, `package.Service/Method`, from the descriptors."""
    import importlib

    found = set()
    for name in rpc_modules():
        module = importlib.import_module(name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found |= {f"{service.full_name}/{m.name}" for m in service.methods}
    return found


def claims_of(marks: Any) -> set[tuple[str, str]]:
    """The (method, outcome) pairs of a test's rpc markers; ValueError on a malformed one."""
    claims = set()
    for mark in marks:
        method, *outcomes = mark.args
        if not outcomes or any(o not in OUTCOMES for o in outcomes) or mark.kwargs:
            usage = "rpc(method, 'ok' | 'error' | 'unbuilt', ...)"
            raise ValueError(f"rpc marker {mark.args}: {usage}")
        claims |= {(method, o) for o in outcomes}
    return claims
