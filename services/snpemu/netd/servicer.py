"""gRPC adapter of netd (what a guest's VMM and grpcurl call).

Every field is checked before the daemon acts: handles and tokens (netd/limits.py), rings and
the MAC (daemon.register), the queue enum here. Who may act on a device is its capability: a
VMM sends the token RegisterDevice gave it; the host may act on any device.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2 as pb

from snpemu.abi import virtio
from snpemu.errors import InvalidArgument, PermissionDenied
from snpemu.netd.daemon import Device, NetDaemon, Ring, VmRef
from snpemu.netd.reasons import NetdReason
from snpemu.runtime.caller import current_caller

log = logging.getLogger(__name__)


def _ring(request: Any, name: str) -> Ring:
    if not request.HasField(name) or not getattr(request, name).entries:
        raise InvalidArgument(
            f"{name} ring is required (ring_gpa, buffers_gpa, entries, buffer_size)"
        )
    msg = getattr(request, name)
    return Ring(msg.ring_gpa, msg.buffers_gpa, msg.entries, msg.buffer_size)


def stats_pb(dev: Device) -> pb.DeviceStats:
    """A device as the host sees it: ids only, never a token."""
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


def _host() -> bool:
    return current_caller().is_host


class NetdServicer:
    def __init__(self, daemon: NetDaemon, restarts: int) -> None:
        self.d = daemon
        self.restarts = restarts
        self.holds: dict[str, int] = {}

    def _claim(self, request: Any) -> Device:
        return self.d.claim(request.device.id, bytes(request.device.token), host=_host())

    async def RegisterDevice(self, request: Any, context: Any) -> pb.RegisterDeviceResponse:
        if not request.HasField("vm"):
            raise InvalidArgument("vm is required")
        rx, tx = _ring(request, "rx"), _ring(request, "tx")
        vm = VmRef(request.vm.id, bytes(request.vm.token))
        dev = await self.d.register(vm, request.mac, rx, tx, host=_host())
        return pb.RegisterDeviceResponse(device=pb.DeviceHandle(id=dev.device_id, token=dev.token))

    async def HoldDevice(self, request: Any, context: Any) -> AsyncIterator[pb.HoldDeviceResponse]:
        dev = self._claim(request)
        self.holds[dev.device_id] = self.holds.get(dev.device_id, 0) + 1
        try:
            yield pb.HoldDeviceResponse(
                device=pb.DeviceHandle(id=dev.device_id), daemon_boot_id=self.d.boot_id
            )
            # until the VMM hangs up (the call is cancelled) or the device is unregistered:
            # then the stream ends and the VMM registers again
            await dev.gone.wait()
        finally:
            self.holds[dev.device_id] -= 1
            if not self.holds[dev.device_id]:
                del self.holds[dev.device_id]
                if self.d.devices.get(dev.device_id) is dev:
                    log.info("the VMM of %s hung up", dev.vm_id, extra={"event": "vmm_gone"})
                    self.d.unregister(dev.device_id)

    async def UnregisterDevice(self, request: Any, context: Any) -> pb.UnregisterDeviceResponse:
        self.d.unregister(self._claim(request).device_id)
        return pb.UnregisterDeviceResponse()

    async def NotifyQueue(self, request: Any, context: Any) -> pb.NotifyQueueResponse:
        if request.queue not in (pb.QUEUE_RX, pb.QUEUE_TX):
            raise InvalidArgument(f"queue must be QUEUE_RX or QUEUE_TX, not {request.queue}")
        dev = self._claim(request)
        if request.queue == pb.QUEUE_TX:
            results = await self.d.notify_tx(dev.device_id)
            return pb.NotifyQueueResponse(
                processed=len(results),
                results=[pb.PacketResult.ValueType(int(r)) for r in results],
            )
        # new RX buffers are picked up when a packet arrives; nothing waits for them
        return pb.NotifyQueueResponse()

    async def GetDeviceStats(self, request: Any, context: Any) -> pb.GetDeviceStatsResponse:
        return pb.GetDeviceStatsResponse(stats=stats_pb(self._claim(request)))

    async def ListDevices(self, request: Any, context: Any) -> pb.ListDevicesResponse:
        # the runtime's credential check lets only the host in; this holds if that changes
        if not _host():
            raise PermissionDenied("ListDevices is the host's", reason=NetdReason.HOST_ONLY)
        return pb.ListDevicesResponse(
            devices=[stats_pb(d) for d in self.d.devices.values()],
            daemon_boot_id=self.d.boot_id,
            restarts=self.restarts,
        )
