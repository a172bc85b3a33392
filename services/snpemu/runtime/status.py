"""Map snpemu errors to gRPC status, with google.rpc.ErrorInfo details (grpcio-status)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from snpemu import errors

# One table, so every service maps the same way (STYLE: one hierarchy, mapped in one place).
_CODES: dict[type[errors.SnpemuError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotBuilt: grpc.StatusCode.UNIMPLEMENTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

DOMAIN = "snpemu"

# A status travels in trailing metadata, which clients cap (8 KiB by default): an error that
# quoted a megabyte of its input would reach the caller as RESOURCE_EXHAUSTED instead of
# itself. Models quote short prefixes; this is the backstop.
MAX_MESSAGE = 1024
MAX_METADATA_VALUE = 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# A peer's refusal that the caller caused reaches the caller with the peer's code (a VM token
# netd forwarded to kvm, a page rmp found beyond memory); a peer refusing the service itself
# (its credential, its bug) is the service's internal error.
_PASSED_ON = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
# a peer refusing this service's own credential: a misconfigured host, not the caller's doing
_OWN_CREDENTIAL = frozenset({"HOST_CREDENTIAL_MISSING", "HOST_CREDENTIAL_WRONG"})


def grpc_code(err: errors.SnpemuError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    peer_code = getattr(err, "code", None)
    if (
        isinstance(peer_code, grpc.StatusCode)
        and peer_code in _PASSED_ON
        and err.reason not in _OWN_CREDENTIAL
    ):
        return peer_code
    return grpc.StatusCode.INTERNAL


def to_status(err: errors.SnpemuError, service: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=_clip(err.reason, MAX_METADATA_VALUE),
        domain=f"{service}.{DOMAIN}",
        metadata={
            _clip(k, 64): _clip(v, MAX_METADATA_VALUE) for k, v in list(err.metadata.items())[:16]
        },
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc_code(err)
    proto = status_pb2.Status(
        code=code.value[0], message=_clip(err.message, MAX_MESSAGE), details=[detail]
    )
    return rpc_status.to_status(proto)


def error_info(call_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a failed call, if the server attached one (client side)."""
    status = rpc_status.from_call(call_error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
