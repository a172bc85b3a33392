"""netd over gRPC as the VMM's vhost-user side and the guest's doorbells reach it
(guest/netdev.py Netd).

netd's refusals keep their code here (a MAC in use is ALREADY_EXISTS to the guest's caller too,
not an INTERNAL error of the agent); a device netd no longer has raises DeviceGone, so the
driver registers it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2, netd_pb2_grpc

from snpemu import errors
from snpemu.guest.holds import held
from snpemu.guest.netdev import DeviceGone, DeviceRef
from snpemu.guest.ports import DeviceHold, PacketResult, Queue, Ring, VmHandle
from snpemu.netd.reasons import NetdReason
from snpemu.runtime.peers import Peer, PeerError

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


def _device(dev: DeviceRef) -> netd_pb2.DeviceHandle:
    return netd_pb2.DeviceHandle(id=dev.id, token=dev.token)


def _refused(e: PeerError) -> errors.SnpemuError:
    """netd's refusal with its own code, reason and metadata (the caller caused it)."""
    if e.code == grpc.StatusCode.NOT_FOUND and e.reason == NetdReason.UNKNOWN_DEVICE:
        return DeviceGone(e.message, metadata=e.metadata)
    by_code: dict[grpc.StatusCode, type[errors.SnpemuError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
        grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
        grpc.StatusCode.FAILED_PRECONDITION: errors.WrongState,
    }
    cls = by_code.get(e.code)
    return e if cls is None else cls(e.message, reason=e.reason, metadata=e.metadata)


class GrpcNetd:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @classmethod
    def connect(cls, address: str, credential: str | None) -> GrpcNetd:
        return cls(Peer("netd", address, credential, netd_pb2_grpc.NetdServiceStub))

    def _stub(self) -> NetdServiceAsyncStub:
        return self.peer.ensure()  # type: ignore[no-any-return]

    async def register_device(self, vm: VmHandle, mac: str, rx: Ring, tx: Ring) -> DeviceRef:
        # the VM's handle as kvm made it, token included: netd passes it to kvm, which checks it
        handle = handles_pb2.VmHandle(id=vm.id, token=vm.token)
        try:
            r = await self.peer.invoke(
                self._stub().RegisterDevice,
                netd_pb2.RegisterDeviceRequest(vm=handle, mac=mac, rx=_ring(rx), tx=_ring(tx)),
            )
        except PeerError as e:
            raise _refused(e) from None
        return DeviceRef(str(r.device.id), bytes(r.device.token))

    async def hold_device(self, dev: DeviceRef) -> DeviceHold:
        call = self._stub().HoldDevice(
            netd_pb2.HoldDeviceRequest(device=_device(dev)), metadata=self.peer.md
        )
        try:
            hold, first = await held(self.peer.name, call)
        except PeerError as e:
            raise _refused(e) from None
        return DeviceHold(hold, first.daemon_boot_id)

    async def notify_queue(self, dev: DeviceRef, queue: Queue) -> list[PacketResult]:
        try:
            r = await self.peer.invoke(
                self._stub().NotifyQueue,
                netd_pb2.NotifyQueueRequest(
                    device=_device(dev), queue=netd_pb2.Queue.ValueType(int(queue))
                ),
            )
        except PeerError as e:
            raise _refused(e) from None
        return [PACKET_RESULTS.get(v, PacketResult.UNSPECIFIED) for v in r.results]

    async def unregister_device(self, dev: DeviceRef) -> None:
        try:
            await self.peer.invoke(
                self._stub().UnregisterDevice,
                netd_pb2.UnregisterDeviceRequest(device=_device(dev)),
            )
        except PeerError as e:
            raise _refused(e) from None

    async def close(self) -> None:
        await self.peer.close()
