"""netd over gRPC as the VMM's vhost-user side and the guest's doorbells reach it
(guest/ports.py Netd)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2, netd_pb2_grpc

from snpemu.guest.holds import held
from snpemu.guest.ports import DeviceHold, PacketResult, Queue, Ring, VmHandle
from snpemu.runtime.peers import Peer

if TYPE_CHECKING:
    from snp.netd.v1.netd_pb2_grpc import NetdServiceAsyncStub

PACKET_RESULTS = {
    v: PacketResult(k.removeprefix("PACKET_RESULT_").lower())
    for k, v in netd_pb2.PacketResult.items()
}


def _ring(r: Ring) -> netd_pb2.Ring:
    return netd_pb2.Ring(
        ring_gpa=r.ring_gpa, buffers_gpa=r.buffers_gpa, entries=r.entries, buffer_size=r.buffer_size
    )


def _device(device_id: str) -> netd_pb2.DeviceHandle:
    return netd_pb2.DeviceHandle(id=device_id)


class GrpcNetd:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @classmethod
    def connect(cls, address: str, credential: str | None) -> GrpcNetd:
        return cls(Peer("netd", address, credential, netd_pb2_grpc.NetdServiceStub))

    def _stub(self) -> NetdServiceAsyncStub:
        return self.peer.ensure()  # type: ignore[no-any-return]

    async def register_device(self, vm: VmHandle, mac: str, rx: Ring, tx: Ring) -> str:
        r = await self.peer.invoke(
            self._stub().RegisterDevice,
            netd_pb2.RegisterDeviceRequest(
                vm=handles_pb2.VmHandle(id=vm.id), mac=mac, rx=_ring(rx), tx=_ring(tx)
            ),
        )
        return str(r.device.id)

    async def hold_device(self, device_id: str) -> DeviceHold:
        call = self._stub().HoldDevice(
            netd_pb2.HoldDeviceRequest(device=_device(device_id)), metadata=self.peer.md
        )
        hold, first = await held(self.peer.name, call)
        return DeviceHold(hold, first.daemon_boot_id)

    async def notify_queue(self, device_id: str, queue: Queue) -> list[PacketResult]:
        r = await self.peer.invoke(
            self._stub().NotifyQueue,
            netd_pb2.NotifyQueueRequest(
                device=_device(device_id), queue=netd_pb2.Queue.ValueType(int(queue))
            ),
        )
        return [PACKET_RESULTS.get(v, PacketResult.UNSPECIFIED) for v in r.results]

    async def unregister_device(self, device_id: str) -> None:
        await self.peer.invoke(
            self._stub().UnregisterDevice,
            netd_pb2.UnregisterDeviceRequest(device=_device(device_id)),
        )

    async def close(self) -> None:
        await self.peer.close()
