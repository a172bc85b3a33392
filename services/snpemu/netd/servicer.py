"""gRPC adapter of netd (what a guest's VMM and grpcurl call)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2 as pb

from snpemu.abi import virtio
from snpemu.errors import InvalidArgument
from snpemu.netd.daemon import Device, NetDaemon, Ring

log = logging.getLogger(__name__)


def _ring(msg: Any, name: str) -> Ring:
    if not msg.entries:
        raise InvalidArgument(
            f"{name} ring is required (ring_gpa, buffers_gpa, entries, buffer_size)"
        )
    return Ring(msg.ring_gpa, msg.buffers_gpa, msg.entries, msg.buffer_size)


def stats_pb(dev: Device) -> pb.DeviceStats:
    c = dev.counters
    return pb.DeviceStats(
        device=pb.DeviceHandle(id=dev.device_id),
        mac=virtio.mac_text(dev.mac),
        rx_packets=c.rx_packets,
        tx_packets=c.tx_packets,
        dropped_packets=c.dropped,
        rx_bytes=c.rx_bytes,
        tx_bytes=c.tx_bytes,
        vm=handles_pb2.VmHandle(id=dev.vm_id),
        rmp_violations=c.violations,
    )


class NetdServicer:
    def __init__(self, daemon: NetDaemon, restarts: int) -> None:
        self.d = daemon
        self.restarts = restarts
        self.holds: dict[str, int] = {}

    async def RegisterDevice(self, request: Any, context: Any) -> pb.RegisterDeviceResponse:
        if not request.vm.id:
            raise InvalidArgument("vm is required")
        dev = await self.d.register(
            request.vm.id, request.mac, _ring(request.rx, "rx"), _ring(request.tx, "tx")
        )
        return pb.RegisterDeviceResponse(device=pb.DeviceHandle(id=dev.device_id))

    async def HoldDevice(self, request: Any, context: Any) -> AsyncIterator[pb.HoldDeviceResponse]:
        dev = self.d.device(request.device.id)
        self.holds[dev.device_id] = self.holds.get(dev.device_id, 0) + 1
        try:
            yield pb.HoldDeviceResponse(device=request.device, daemon_boot_id=self.d.boot_id)
            await asyncio.Event().wait()  # until the VMM hangs up: the call is cancelled
        finally:
            self.holds[dev.device_id] -= 1
            if not self.holds[dev.device_id]:
                del self.holds[dev.device_id]
                if self.d.devices.get(dev.device_id) is dev:
                    log.info("the VMM of %s hung up", dev.vm_id, extra={"event": "vmm_gone"})
                    self.d.unregister(dev.device_id)

    async def UnregisterDevice(self, request: Any, context: Any) -> pb.UnregisterDeviceResponse:
        self.d.unregister(request.device.id)
        return pb.UnregisterDeviceResponse()

    async def NotifyQueue(self, request: Any, context: Any) -> pb.NotifyQueueResponse:
        dev = self.d.device(request.device.id)
        if request.queue == pb.QUEUE_TX:
            results = await self.d.notify_tx(dev.device_id)
            return pb.NotifyQueueResponse(
                processed=len(results),
                results=[pb.PacketResult.ValueType(int(r)) for r in results],
            )
        if request.queue == pb.QUEUE_RX:
            # new RX buffers are picked up when a packet arrives; nothing waits for them
            return pb.NotifyQueueResponse()
        raise InvalidArgument("queue must be QUEUE_RX or QUEUE_TX")

    async def GetDeviceStats(self, request: Any, context: Any) -> pb.GetDeviceStatsResponse:
        return pb.GetDeviceStatsResponse(stats=stats_pb(self.d.device(request.device.id)))

    async def ListDevices(self, request: Any, context: Any) -> pb.ListDevicesResponse:
        return pb.ListDevicesResponse(
            devices=[stats_pb(d) for d in self.d.devices.values()],
            daemon_boot_id=self.d.boot_id,
            restarts=self.restarts,
        )
