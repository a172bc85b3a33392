"""A peer's refusal the caller caused keeps its code on the way back; a peer refusing the
service itself is the service's internal error (runtime/status.py grpc_code)."""

from __future__ import annotations

import grpc
import pytest
from snp.rmp.v1 import rmp_pb2
from snpemu.runtime.peers import PeerError, session_error
from snpemu.runtime.status import grpc_code

S = grpc.StatusCode


def refusal(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")


@pytest.mark.parametrize(
    ("peer", "caller"),
    [
        (S.INVALID_ARGUMENT, S.INVALID_ARGUMENT),
        (S.NOT_FOUND, S.NOT_FOUND),
        (S.PERMISSION_DENIED, S.PERMISSION_DENIED),
        (S.FAILED_PRECONDITION, S.FAILED_PRECONDITION),
        (S.UNAUTHENTICATED, S.INTERNAL),  # the service's own credential: not the caller's
        (S.INTERNAL, S.INTERNAL),
        (S.UNKNOWN, S.INTERNAL),
    ],
)
def test_peer_codes(peer: grpc.StatusCode, caller: grpc.StatusCode) -> None:
    assert grpc_code(PeerError("rmp", "FreePages", refusal(peer))) == caller
    # the same refusal answered in-band on a session stream (rmp.proto SessionError)
    inband = rmp_pb2.SessionError(code=peer.value[0], message="no", reason="R")
    assert grpc_code(session_error(inband)) == caller


def test_a_peer_refusing_the_services_own_credential_is_internal() -> None:
    for code in (S.PERMISSION_DENIED, S.UNAUTHENTICATED):
        inband = rmp_pb2.SessionError(code=code.value[0], reason="HOST_CREDENTIAL_WRONG")
        assert grpc_code(session_error(inband)) == S.INTERNAL
    # a peer out of room is not the caller's doing either
    inband = rmp_pb2.SessionError(code=S.RESOURCE_EXHAUSTED.value[0], reason="FULL")
    assert grpc_code(session_error(inband)) == S.INTERNAL
