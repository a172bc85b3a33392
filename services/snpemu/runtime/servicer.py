"""Turn a proto service descriptor and a plain implementation object into gRPC handlers.

The implementation is any object with `async def Method(self, request, context)` (or an async
generator for server-streaming RPCs) per RPC it has built. Every RPC it lacks answers
UNIMPLEMENTED with ErrorInfo reason NOT_BUILT, so the whole API is visible through reflection
from day one and clients get a clear answer for the parts still to come. SnpemuError raised
by an implementation becomes its gRPC status here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from snpemu import errors
from snpemu.runtime.caller import HOST, OPEN, Caller, Role, set_caller
from snpemu.runtime.credentials import HOST_HEADER, OWNER_HEADER, same_secret, vmm_principal
from snpemu.runtime.status import to_status

log = logging.getLogger(__name__)


def _not_built(service: ServiceDescriptor, method: MethodDescriptor) -> errors.NotBuilt:
    return errors.NotBuilt(
        f"{service.full_name}/{method.name} is not built yet in this version of snpemu "
        "(the README lists what is built)",
        metadata={"method": f"{service.full_name}/{method.name}"},
    )


# gRPC metadata keys carrying the credentials (runtime/credentials.py).
CREDENTIAL_HEADER = HOST_HEADER


class CredentialReason(enum.StrEnum):
    HOST_CREDENTIAL_MISSING = "HOST_CREDENTIAL_MISSING"
    HOST_CREDENTIAL_WRONG = "HOST_CREDENTIAL_WRONG"
    OWNER_CREDENTIAL_MISSING = "OWNER_CREDENTIAL_MISSING"
    OWNER_CREDENTIAL_WRONG = "OWNER_CREDENTIAL_WRONG"


@dataclass(frozen=True)
class Authority:
    """Who may call what on one service. With no credential configured (a service started by
    hand) every RPC is open and every caller acts as the host."""

    host_credential: str | None = None
    # Host-only RPCs a guest's VMM side may also call with its own VMM credential.
    vmm_rpcs: frozenset[str] = frozenset()
    host_only: Callable[[str], bool] = lambda _name: True
    # A guest agent: every RPC is its owner's, and the host credential opens nothing here.
    owner_credential: str | None = None

    def caller(self, method: str, metadata: Mapping[str, str]) -> Caller:
        if self.owner_credential:
            return self._owner(metadata.get(OWNER_HEADER))
        if not self.host_credential or not self.host_only(method):
            return OPEN
        given = metadata.get(HOST_HEADER)
        if given is None:
            raise errors.Unauthenticated(
                f"host-only RPC: send the host credential in the {HOST_HEADER} header "
                "(the launcher writes it to .snpemu/host-credential)",
                reason=CredentialReason.HOST_CREDENTIAL_MISSING,
            )
        if same_secret(given, self.host_credential):
            return HOST
        if method in self.vmm_rpcs:
            guest = vmm_principal(self.host_credential, given)
            if guest is not None:
                return Caller(Role.VMM, guest)
        raise errors.PermissionDenied(
            "wrong host credential", reason=CredentialReason.HOST_CREDENTIAL_WRONG
        )

    def _owner(self, given: str | None) -> Caller:
        assert self.owner_credential
        if given is None:
            raise errors.Unauthenticated(
                f"this guest's API is its owner's: send the owner credential in the "
                f"{OWNER_HEADER} header (the launcher writes it to "
                ".snpemu/<guest>.owner-credential)",
                reason=CredentialReason.OWNER_CREDENTIAL_MISSING,
            )
        if not same_secret(given, self.owner_credential):
            raise errors.PermissionDenied(
                "wrong owner credential", reason=CredentialReason.OWNER_CREDENTIAL_WRONG
            )
        return Caller(Role.OWNER, "owner")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class _Refused:
    """What the deserializer hands the behaviour for a request it would not parse, so the
    caller gets a clear status with ErrorInfo instead of grpc's bare INTERNAL."""

    def __init__(self, error: errors.SnpemuError) -> None:
        self.error = error


def _deserializer(method: MethodDescriptor, limit: int) -> Callable[[bytes], Any]:
    cls = message_factory.GetMessageClass(method.input_type)

    def parse(data: bytes) -> Any:
        if len(data) > limit:
            return _Refused(
                errors.InvalidArgument(
                    f"{method.name} request is {len(data)} bytes; this RPC takes at most {limit}",
                    reason=RequestReason.REQUEST_TOO_LARGE,
                    metadata={"limit": str(limit), "size": str(len(data))},
                )
            )
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return _Refused(
                errors.InvalidArgument(
                    f"{method.name} request is not a valid {method.input_type.full_name}: "
                    f"{str(e)[:80]}",
                    reason=RequestReason.MALFORMED_REQUEST,
                )
            )

    return parse


class RequestReason(enum.StrEnum):
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    INTERNAL = "INTERNAL"


async def _drain(requests: AsyncIterator[Any], most: int = 64, seconds: float = 1.0) -> None:
    """Read what a refused session's client already sent (a few messages, briefly) before the
    refusal: a bidirectional stream ended while the client is still writing reaches that
    client as INTERNAL "Internal error from Core" instead of the status sent."""

    async def read() -> None:
        n = 0
        async for _ in requests:
            n += 1
            if n >= most:
                return

    with contextlib.suppress(Exception, TimeoutError):
        await asyncio.wait_for(read(), seconds)


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A session's requests, ending the stream with a clear status on one it would not parse."""
    async for r in requests:
        if isinstance(r, _Refused):
            raise r.error
        yield r


def _bug(short_name: str, method: str, e: Exception) -> errors.SnpemuError:
    """An exception no model meant to raise: a bug. It is logged once, as one JSON line with
    its traceback, and the caller gets INTERNAL with ErrorInfo (grpc's own answer would be
    UNKNOWN with the traceback printed across many lines)."""
    log.error(
        "%s/%s failed: %s: %s",
        short_name,
        method,
        type(e).__name__,
        str(e)[:200],
        exc_info=e,
        extra={"event": "rpc_bug", "method": method},
    )
    return errors.SnpemuError(
        f"{method}: internal error ({type(e).__name__}); the service log has the traceback",
        reason=RequestReason.INTERNAL,
    )


def _behavior(
    short_name: str,
    service: ServiceDescriptor,
    method: MethodDescriptor,
    impls: Sequence[object],
    authority: Authority,
) -> Callable[..., Any]:
    fn = _find(impls, method.name)
    name = method.name

    async def abort(context: grpc.aio.ServicerContext, err: errors.SnpemuError) -> None:
        status = to_status(err, short_name)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
        """Check the credential, then the request; record the caller for the models."""
        set_caller(authority.caller(name, _metadata(context)))
        if isinstance(request, _Refused):
            raise request.error

    if fn is None:
        err = _not_built(service, method)
        if method.server_streaming:

            async def missing_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await abort(context, err)
                yield  # pragma: no cover - abort raises

            return missing_stream

        async def missing(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort(context, err)

        return missing

    if inspect.isasyncgenfunction(fn):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                try:
                    admit(request, context)
                except errors.SnpemuError:
                    if method.client_streaming:
                        await _drain(request)
                    raise
                if method.client_streaming:
                    request = _checked(request)
                async for item in fn(request, context):
                    yield item
            except errors.SnpemuError as e:
                await abort(context, e)
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # the last line before grpc answers UNKNOWN
                await abort(context, _bug(short_name, name, e))

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            admit(request, context)
            return await fn(request, context)
        except errors.SnpemuError as e:
            await abort(context, e)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the last line before grpc answers UNKNOWN
            await abort(context, _bug(short_name, name, e))

    return unary


def _find(impls: Sequence[object], name: str) -> Any:
    """The first implementation object that has built RPC `name`, or None."""
    for impl in impls:
        fn = getattr(impl, name, None)
        if fn is not None:
            return fn
    return None


def method_kinds(service: ServiceDescriptor) -> list[tuple[bool, bool, str]]:
    return [(m.client_streaming, m.server_streaming, m.name) for m in service.methods]


# Largest request an RPC takes unless its service says otherwise: gRPC's own default.
DEFAULT_REQUEST_LIMIT = 4 * 1024 * 1024


def build_handler(
    short_name: str,
    service: ServiceDescriptor,
    impls: Sequence[object],
    *,
    authority: Authority | None = None,
    request_limits: Mapping[str, int] | None = None,
) -> grpc.GenericRpcHandler:
    """Handlers for every RPC, each served by the first object of `impls` that has a method of
    its name, behind `authority` (by default: open) and a per-RPC request size limit."""
    authority = authority or Authority()
    limits = request_limits or {}
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming and not method.server_streaming:
            raise ValueError(f"{service.full_name}/{method.name}: client streaming is not used")
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            factory = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            factory = grpc.unary_stream_rpc_method_handler
        else:
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            _behavior(short_name, service, method, impls, authority),
            request_deserializer=_deserializer(
                method, limits.get(method.name, DEFAULT_REQUEST_LIMIT)
            ),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def built_methods(service: ServiceDescriptor, impls: Sequence[object]) -> list[str]:
    return [m.name for m in service.methods if _find(impls, m.name) is not None]
