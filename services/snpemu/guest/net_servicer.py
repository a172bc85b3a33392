"""gRPC adapter of the guest agent's network RPCs (guest/network.py)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from snp.guest.v1 import guest_pb2 as pb

from snpemu import errors
from snpemu.errors import InvalidArgument
from snpemu.guest.errors import GuestReason
from snpemu.guest.network import Network
from snpemu.runtime.peers import PeerError

# SPEC: IEEE 802: six octets; bit 0 of the first set means a group (multicast) address,
# which no device has as its own
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# the most packets one ReceivePackets answers (the RX ring holds at most 64 per refill)
RECEIVE_LIMIT = 1024


def _mac(name: str, mac: str, *, required: bool) -> str:
    """A unicast MAC, checked before the device is touched (an attach detaches the old device
    first). The error quotes only a short prefix of what was sent."""
    if not mac and not required:
        return mac
    if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise InvalidArgument(
            f"{name} {mac[:24]!r} is not a unicast MAC like 02:00:00:00:00:01",
            reason=GuestReason.BAD_MAC,
        )
    return mac


# netd's refusals of a registration the caller asked for (a MAC in use, a bad ring) keep their
# code rather than becoming INTERNAL: the caller's request caused them
_PEER_CODES: dict[str, type[errors.SnpemuError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "FAILED_PRECONDITION": errors.WrongState,
    "NOT_FOUND": errors.NotFound,
    "PERMISSION_DENIED": errors.PermissionDenied,
}


@contextlib.contextmanager
def _caller_codes() -> Iterator[None]:
    try:
        yield
    except PeerError as e:
        cls = _PEER_CODES.get(e.code.name)
        if cls is None:
            raise
        raise cls(e.message[:200], reason=e.reason, metadata=e.metadata) from None


class NetServicer:
    def __init__(self, net: Network) -> None:
        self.net = net

    async def AttachNetDevice(self, request: Any, context: Any) -> pb.AttachNetDeviceResponse:
        mac = _mac("mac", request.mac, required=False)
        with _caller_codes():
            dev = await self.net.attach(mac, request.ring_entries, skip=False)
        return pb.AttachNetDeviceResponse(device_id=dev.device_id)

    async def SendPacket(self, request: Any, context: Any) -> pb.SendPacketResponse:
        dst = _mac("destination_mac", request.destination_mac, required=True)
        result = await self.net.device().send(dst, bytes(request.payload))
        return pb.SendPacketResponse(result=result)

    async def ReceivePackets(self, request: Any, context: Any) -> pb.ReceivePacketsResponse:
        if request.max_packets > RECEIVE_LIMIT:
            raise InvalidArgument(
                f"max_packets is at most {RECEIVE_LIMIT}", reason=GuestReason.BAD_FIELD
            )
        got = await self.net.device().receive(request.max_packets or 64)
        return pb.ReceivePacketsResponse(
            packets=[pb.Packet(source_mac=p.source_mac, payload=p.payload) for p in got]
        )

    async def SkipDmaConversion(self, request: Any, context: Any) -> pb.SkipDmaConversionResponse:
        mac = _mac("mac", request.mac, required=False)
        with _caller_codes():
            outcome = await self.net.skip_dma_conversion(mac, request.ring_entries)
        return pb.SkipDmaConversionResponse(outcome=outcome)

    async def FlipBufferDuringCopy(
        self, request: Any, context: Any
    ) -> pb.FlipBufferDuringCopyResponse:
        outcome = await self.net.flip_buffer_during_copy(request.timeout_ms)
        return pb.FlipBufferDuringCopyResponse(outcome=outcome)

    async def ExposeVmsaPage(self, request: Any, context: Any) -> pb.ExposeVmsaPageResponse:
        return pb.ExposeVmsaPageResponse(outcome=await self.net.expose_vmsa_page())

    async def FlipResponsePage(self, request: Any, context: Any) -> pb.FlipResponsePageResponse:
        return pb.FlipResponsePageResponse(outcome=await self.net.flip_response_page())
