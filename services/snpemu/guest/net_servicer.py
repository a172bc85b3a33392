"""gRPC adapter of the guest agent's network RPCs (guest/network.py)."""

from __future__ import annotations

from typing import Any

from snp.guest.v1 import guest_pb2 as pb

from snpemu.errors import InvalidArgument
from snpemu.guest.network import Network


class NetServicer:
    def __init__(self, net: Network) -> None:
        self.net = net

    async def AttachNetDevice(self, request: Any, context: Any) -> pb.AttachNetDeviceResponse:
        dev = await self.net.attach(request.mac, request.ring_entries, skip=False)
        return pb.AttachNetDeviceResponse(device_id=dev.device_id)

    async def SendPacket(self, request: Any, context: Any) -> pb.SendPacketResponse:
        if not request.destination_mac:
            raise InvalidArgument("destination_mac is required")
        result = await self.net.device().send(request.destination_mac, bytes(request.payload))
        return pb.SendPacketResponse(result=result)

    async def ReceivePackets(self, request: Any, context: Any) -> pb.ReceivePacketsResponse:
        got = await self.net.device().receive(request.max_packets or 64)
        return pb.ReceivePacketsResponse(
            packets=[pb.Packet(source_mac=p.source_mac, payload=p.payload) for p in got]
        )

    async def SkipDmaConversion(self, request: Any, context: Any) -> pb.SkipDmaConversionResponse:
        outcome = await self.net.skip_dma_conversion(request.mac, request.ring_entries)
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
