"""runtime/peers.py Peer.invoke(): a bound stub method called with the credential, its errors
decoded into snpemu errors (UNAVAILABLE and DEADLINE_EXCEEDED: Unavailable; any other:
PeerError with the ErrorInfo reason and the firmware status)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from snpemu.errors import Unavailable, WrongState
from snpemu.runtime.peers import Peer, PeerError
from snpemu.runtime.status import to_status


class Rpc:
    """A unary multicallable that records its call and fails with `error` if given."""

    _method = b"/snp.psp.v1.PspService/LaunchStart"

    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, request: object, **kw: Any) -> str:
        self.calls.append(kw)
        if self.error is not None:
            raise self.error
        return "reply"


def rpc_error(code: grpc.StatusCode, err: WrongState | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if err is not None:
        for k, v in to_status(err, "psp").trailing_metadata:
            trailing.add(k, v)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="refused")


async def test_invoke_passes_the_credential_and_a_timeout() -> None:
    peer = Peer("psp", "127.0.0.1:1", "secret", object)
    rpc = Rpc()
    assert (await peer.invoke(rpc, object(), timeout=5)) == "reply"
    assert rpc.calls == [{"metadata": peer.md, "timeout": 5}] and peer.md


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
async def test_an_unreachable_peer_is_unavailable(code: grpc.StatusCode) -> None:
    peer = Peer("psp", "127.0.0.1:1", None, object)
    with pytest.raises(Unavailable, match="psp is unreachable: refused"):
        (await peer.invoke(Rpc(rpc_error(code)), object()))


async def test_a_refusal_is_a_peer_error_with_the_firmware_status() -> None:
    peer = Peer("psp", "127.0.0.1:1", None, object)
    err = WrongState("refused", reason="POLICY_FAILURE", metadata={"fw_status": "0x0007"})
    with pytest.raises(PeerError) as info:
        (await peer.invoke(Rpc(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, err)), object()))
    e = info.value
    assert (e.reason, e.fw_status, e.message) == ("POLICY_FAILURE", 7, "psp LaunchStart: refused")
