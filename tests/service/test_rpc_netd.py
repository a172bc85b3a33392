"""Each netd RPC through gRPC, on its success path and refusing a wrong request, with a VM
launched by kvm (no guest agent: the test plays the VMM registering its device)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2 as pb
from snpemu.runtime.status import error_info

from tests.service.host_stack import HOST, Guest, Stack

A, B = "02:00:00:00:00:a1", "02:00:00:00:00:b2"
# virtio 1.2 2.7: a split ring of 8 entries fits one page; buffers follow it
RX = pb.Ring(ring_gpa=0x200000, buffers_gpa=0x201000, entries=8, buffer_size=2048)
TX = pb.Ring(ring_gpa=0x210000, buffers_gpa=0x211000, entries=8, buffer_size=2048)


async def refused(call: object, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    detail = error_info(info.value)
    assert detail is not None and detail.reason == reason, detail
    return str(info.value.details())


async def register(s: Stack, vm: handles_pb2.VmHandle, mac: str) -> pb.DeviceHandle:
    r = await s.netd.RegisterDevice(
        pb.RegisterDeviceRequest(vm=vm, mac=mac, rx=RX, tx=TX), metadata=HOST
    )
    assert r.device.id
    return r.device


async def listed(s: Stack) -> dict[str, pb.DeviceStats]:
    r = await s.netd.ListDevices(pb.ListDevicesRequest(), metadata=HOST)
    return {d.mac: d for d in r.devices}


@pytest.mark.rpc("snp.netd.v1.NetdService/RegisterDevice", "ok", "error")
@pytest.mark.rpc("snp.netd.v1.NetdService/ListDevices", "ok", "error")
@pytest.mark.rpc("snp.netd.v1.NetdService/GetDeviceStats", "ok", "error")
@pytest.mark.rpc("snp.netd.v1.NetdService/UnregisterDevice", "ok", "error")
@pytest.mark.rpc("snp.netd.v1.NetdService/NotifyQueue", "ok", "error")
async def test_device_register_stats_notify_unregister(stack: Stack, launched_vm: Guest) -> None:
    assert await listed(stack) == {}
    dev = await register(stack, launched_vm.vm, A)
    stats = (
        await stack.netd.GetDeviceStats(pb.GetDeviceStatsRequest(device=dev), metadata=HOST)
    ).stats
    assert (stats.device.id, stats.mac, stats.vm.id) == (dev.id, A, launched_vm.vm.id)
    assert (stats.rx_packets, stats.tx_packets, stats.dropped_packets) == (0, 0, 0)
    assert set(await listed(stack)) == {A}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.netd.ListDevices(pb.ListDevicesRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # a second device with the same MAC is refused and changes nothing
    await refused(
        stack.netd.RegisterDevice(
            pb.RegisterDeviceRequest(vm=launched_vm.vm, mac=A, rx=RX, tx=TX), metadata=HOST
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "MAC_IN_USE",
    )
    assert set(await listed(stack)) == {A}

    # the doorbells: nothing made available on an empty TX ring, nothing moved
    for queue in (pb.QUEUE_TX, pb.QUEUE_RX):
        n = await stack.netd.NotifyQueue(
            pb.NotifyQueueRequest(device=dev, queue=queue), metadata=HOST
        )
        assert (n.processed, list(n.results)) == (0, [])
    message = await refused(
        stack.netd.NotifyQueue(pb.NotifyQueueRequest(device=dev), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert "QUEUE_RX or QUEUE_TX" in message

    other = await register(stack, launched_vm.vm, B)
    await stack.netd.UnregisterDevice(pb.UnregisterDeviceRequest(device=dev), metadata=HOST)
    assert set(await listed(stack)) == {B}
    await refused(
        stack.netd.GetDeviceStats(pb.GetDeviceStatsRequest(device=dev), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_DEVICE",
    )
    await refused(
        stack.netd.UnregisterDevice(pb.UnregisterDeviceRequest(device=dev), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_DEVICE",
    )
    assert set(await listed(stack)) == {B}
    # the MAC is free again
    again = await register(stack, launched_vm.vm, A)
    assert again.id not in (dev.id, other.id)


@pytest.mark.rpc("snp.netd.v1.NetdService/HoldDevice", "ok", "error")
async def test_a_device_whose_hold_closes_is_dropped(stack: Stack, launched_vm: Guest) -> None:
    """HoldDevice is the vhost-user socket: when the VMM hangs up, netd drops the device."""

    dev = await register(stack, launched_vm.vm, A)
    boot_id = (await stack.netd.ListDevices(pb.ListDevicesRequest(), metadata=HOST)).daemon_boot_id
    hold = stack.netd.HoldDevice(pb.HoldDeviceRequest(device=dev), metadata=HOST)
    first = await hold.read()
    assert (first.device.id, first.daemon_boot_id) == (dev.id, boot_id)
    assert set(await listed(stack)) == {A}  # held: still there
    hold.cancel()
    deadline = time.monotonic() + 10
    while A in await listed(stack):
        assert time.monotonic() < deadline, "the device outlived its hold"
        await asyncio.sleep(0.02)
    gone = stack.netd.HoldDevice(pb.HoldDeviceRequest(device=dev), metadata=HOST)
    await refused(gone.read(), grpc.StatusCode.NOT_FOUND, "UNKNOWN_DEVICE")


async def test_a_device_token_is_its_capability(stack: Stack, launched_vm: Guest) -> None:
    """RegisterDevice returns the device's token; a call that sends another is refused, even
    the host's, and changes nothing. The host may omit it."""

    dev = await register(stack, launched_vm.vm, A)
    other = await register(stack, launched_vm.vm, B)
    assert len(dev.token) == 32 and other.token != dev.token
    wrong = pb.DeviceHandle(id=dev.id, token=other.token)
    hold = stack.netd.HoldDevice(pb.HoldDeviceRequest(device=wrong), metadata=HOST)
    for call in (
        stack.netd.GetDeviceStats(pb.GetDeviceStatsRequest(device=wrong), metadata=HOST),
        stack.netd.NotifyQueue(
            pb.NotifyQueueRequest(device=wrong, queue=pb.QUEUE_TX), metadata=HOST
        ),
        stack.netd.UnregisterDevice(pb.UnregisterDeviceRequest(device=wrong), metadata=HOST),
        hold.read(),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "DEVICE_TOKEN_WRONG")
    assert set(await listed(stack)) == {A, B}
    assert not any(d.device.token for d in (await listed(stack)).values())
    stats = await stack.netd.GetDeviceStats(pb.GetDeviceStatsRequest(device=dev), metadata=HOST)
    assert stats.stats.device == pb.DeviceHandle(id=dev.id)  # the token is never shown again

    # the host unregisters the device: netd ends its hold, so its VMM knows to register again
    hold = stack.netd.HoldDevice(pb.HoldDeviceRequest(device=dev), metadata=HOST)
    first = await hold.read()
    assert first.device == pb.DeviceHandle(id=dev.id)
    await stack.netd.UnregisterDevice(
        pb.UnregisterDeviceRequest(device=pb.DeviceHandle(id=dev.id)), metadata=HOST
    )
    assert await asyncio.wait_for(hold.read(), 10) == grpc.aio.EOF
    assert await hold.code() == grpc.StatusCode.OK
    assert set(await listed(stack)) == {B}
