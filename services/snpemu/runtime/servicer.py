"""Turn a proto service descriptor and a plain implementation object into gRPC handlers.

The implementation is any object with `async def Method(self, request, context)` (or an async
generator for server-streaming RPCs) per RPC it has built. Every RPC it lacks answers
UNIMPLEMENTED with ErrorInfo reason NOT_BUILT, so the whole API is visible through reflection
from day one and clients get a clear answer for the parts still to come. SnpemuError raised
by an implementation becomes its gRPC status here, in one place.
"""

from __future__ import annotations

import enum
import hmac
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from snpemu import errors
from snpemu.runtime.status import to_status


def _not_built(service: ServiceDescriptor, method: MethodDescriptor) -> errors.NotBuilt:
    return errors.NotBuilt(
        f"{service.full_name}/{method.name} is not built yet in this version of snpemu "
        "(the README lists what is built)",
        metadata={"method": f"{service.full_name}/{method.name}"},
    )


# gRPC metadata key carrying the host credential (docs/design.md#host-credential).
CREDENTIAL_HEADER = "x-snpemu-host-credential"


class CredentialReason(enum.StrEnum):
    HOST_CREDENTIAL_MISSING = "HOST_CREDENTIAL_MISSING"
    HOST_CREDENTIAL_WRONG = "HOST_CREDENTIAL_WRONG"


def _check_credential(context: grpc.aio.ServicerContext, credentials: tuple[str, ...]) -> None:
    given = dict(context.invocation_metadata() or ()).get(CREDENTIAL_HEADER)
    if given is None:
        raise errors.Unauthenticated(
            f"host-only RPC: send the host credential in the {CREDENTIAL_HEADER} header "
            "(the launcher writes it to .snpemu/host-credential)",
            reason=CredentialReason.HOST_CREDENTIAL_MISSING,
        )
    if not any(hmac.compare_digest(str(given).encode(), c.encode()) for c in credentials):
        raise errors.PermissionDenied(
            "wrong host credential", reason=CredentialReason.HOST_CREDENTIAL_WRONG
        )


def _behavior(
    short_name: str,
    service: ServiceDescriptor,
    method: MethodDescriptor,
    impls: Sequence[object],
    credential: tuple[str, ...] | None,
) -> Callable[..., Any]:
    fn = _find(impls, method.name)

    async def abort(context: grpc.aio.ServicerContext, err: errors.SnpemuError) -> None:
        status = to_status(err, short_name)
        await context.abort(status.code, status.details, status.trailing_metadata)

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
                if credential is not None:
                    _check_credential(context, credential)
                async for item in fn(request, context):
                    yield item
            except errors.SnpemuError as e:
                await abort(context, e)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if credential is not None:
                _check_credential(context, credential)
            return await fn(request, context)
        except errors.SnpemuError as e:
            await abort(context, e)

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


def build_handler(
    short_name: str,
    service: ServiceDescriptor,
    impls: Sequence[object],
    *,
    host_only: Callable[[str], bool] = lambda _name: False,
    credential: str | None = None,
    vmm_rpcs: frozenset[str] = frozenset(),
    vmm_credential: str | None = None,
) -> grpc.GenericRpcHandler:
    """Handlers for every RPC. With a credential, RPCs for which host_only(name) is true
    require it; without one (a service started by hand), they are open. Each RPC is served by
    the first object of `impls` that has a method of its name."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming and not method.server_streaming:
            raise ValueError(f"{service.full_name}/{method.name}: client streaming is not used")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            factory = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            factory = grpc.unary_stream_rpc_method_handler
        else:
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            _behavior(
                short_name,
                service,
                method,
                impls,
                _accepted(method.name, host_only, credential, vmm_rpcs, vmm_credential),
            ),
            request_deserializer=request_cls.FromString,
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _accepted(
    name: str,
    host_only: Callable[[str], bool],
    credential: str | None,
    vmm_rpcs: frozenset[str],
    vmm_credential: str | None,
) -> tuple[str, ...] | None:
    """The credentials a method accepts: None = open. The VMM credential (a guest's VMM side,
    creating and launching its own VM) opens only the methods in vmm_rpcs."""
    if not credential or not host_only(name):
        return None
    if name in vmm_rpcs and vmm_credential:
        return (credential, vmm_credential)
    return (credential,)


def built_methods(service: ServiceDescriptor, impls: Sequence[object]) -> list[str]:
    return [m.name for m in service.methods if _find(impls, m.name) is not None]
