"""netd and the guests' virtio-net devices over real gRPC, with real rmp, psp, kvm (in-process).

The `sigbus` policy kills the writer for real, so it is exercised with netd as its own process
(cluster and lab tests); here the policies that leave the writer alive.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2
from snp.netd.v1 import netd_pb2
from snpemu import netd
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.credentials import vmm_credential
from snpemu.runtime.server import ServiceRuntime
from snpemu.runtime.status import error_info

from tests.service.host_stack import CRED, HOST, host_stack
from tests.service.test_guest import agent


def vmm_md(guest: str) -> tuple[tuple[str, str], ...]:
    """The metadata of `guest`'s VMM side: its own VMM credential."""
    return (("x-snpemu-host-credential", vmm_credential(CRED, guest)),)


# VIRTIO 1.2, 5.1.6 Device Operation: struct virtio_net_hdr, 12 bytes with num_buffers
NET_HDR_LEN = 12


def payload(i: int) -> bytes:
    body = f"packet {i}".encode()
    return hashlib.sha256(body).digest()[:8] + body


async def attach(g: guest_pb2_grpc.GuestServiceStub, mac: str) -> str:
    r = await g.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(mac=mac))
    return r.device_id


async def receive_all(g: guest_pb2_grpc.GuestServiceStub) -> list[guest_pb2.Packet]:
    return list((await g.ReceivePackets(guest_pb2.ReceivePacketsRequest())).packets)


async def status(g: guest_pb2_grpc.GuestServiceStub) -> guest_pb2.GetStatusResponse:
    return await g.GetStatus(guest_pb2.GetStatusRequest())


A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"


async def test_packets_go_between_guests_and_are_counted(tmp_path: Path) -> None:
    async with (
        host_stack(tmp_path) as s,
        agent(s, "guest-0") as (a, _),
        agent(s, "guest-1") as (b, _),
    ):
        await attach(a, A)
        await attach(b, B)
        for i in range(40):  # more than the 16 RX buffers: B re-offers them as it reads
            r = await a.SendPacket(
                guest_pb2.SendPacketRequest(destination_mac=B, payload=payload(i))
            )
            assert r.result == "delivered"
            if i % 10 == 9:
                got = await receive_all(b)
                assert [p.payload for p in got] == [payload(j) for j in range(i - 9, i + 1)]
                assert {p.source_mac for p in got} == {A}
        # B offered no buffer: the 17th packet is dropped and counted, not lost silently
        results = [
            (
                await a.SendPacket(
                    guest_pb2.SendPacketRequest(destination_mac=B, payload=payload(i))
                )
            ).result
            for i in range(17)
        ]
        assert results == ["delivered"] * 16 + ["no_buffer"]
        r = await a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=C, payload=b"x"))
        assert r.result == "no_route"
        sa, sb = await status(a), await status(b)
        assert dict(sa.net_sent) == {"delivered": 56, "no_buffer": 1, "no_route": 1}
        assert dict(sb.net_received) == {"ok": 40}
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        by_mac = {d.mac: d for d in devices.devices}
        assert by_mac[B].rx_packets == 56 and by_mac[B].dropped_packets == 1
        assert by_mac[A].tx_packets == 58 and by_mac[A].rmp_violations == 0
        assert devices.restarts == 0


async def test_register_validates_and_changes_nothing(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s, agent(s, "guest-0") as (a, a_rt):
        await attach(a, A)
        mine = a_rt.impl.kernel.vm  # type: ignore[union-attr]
        # guest-0's VMM, with the handle CreateVm gave it
        vm = handles_pb2.VmHandle(id=mine.id, token=mine.token)
        md = vmm_md("guest-0")
        rx = netd_pb2.Ring(ring_gpa=0x200000, buffers_gpa=0x201000, entries=8, buffer_size=2048)
        tx = netd_pb2.Ring(ring_gpa=0x210000, buffers_gpa=0x211000, entries=8, buffer_size=2048)
        huge = "v" * (1 << 20)  # the 1 MiB id
        bad = [
            # the issue: a MAC in use answered INTERNAL
            (dict(vm=vm, mac=A, rx=rx, tx=tx), "ALREADY_EXISTS", "MAC_IN_USE"),
            (dict(vm=vm, mac="01:00:00:00:00:01", rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (dict(vm=vm, mac="00:00:00:00:00:00", rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (dict(vm=vm, mac="nonsense", rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (dict(vm=vm, mac="+1:00:00:00:00:0c", rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (dict(vm=vm, mac=huge, rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (
                dict(vm=handles_pb2.VmHandle(id="vm-none", token=bytes(32)), mac=C, rx=rx, tx=tx),
                "NOT_FOUND",
                "UNKNOWN_VM",
            ),
            (dict(vm=handles_pb2.VmHandle(id=huge), mac=C, rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            # the VM's id alone is public: a VMM must hold the VM's token
            (
                dict(vm=handles_pb2.VmHandle(id=mine.id), mac=C, rx=rx, tx=tx),
                "PERMISSION_DENIED",
                "VM_TOKEN_MISSING",
            ),
            (
                dict(vm=handles_pb2.VmHandle(id=mine.id, token=bytes(32)), mac=C, rx=rx, tx=tx),
                "PERMISSION_DENIED",
                None,  # kvm's refusal, its code kept
            ),
            (dict(mac=C, rx=rx, tx=tx), "INVALID_ARGUMENT", None),
            (
                dict(
                    vm=vm,
                    mac=C,
                    rx=netd_pb2.Ring(
                        ring_gpa=0x200000, buffers_gpa=0x201000, entries=6, buffer_size=2048
                    ),
                    tx=tx,
                ),
                "INVALID_ARGUMENT",
                None,
            ),
            (
                dict(
                    vm=vm,
                    mac=C,
                    rx=netd_pb2.Ring(
                        ring_gpa=1 << 40, buffers_gpa=0x201000, entries=8, buffer_size=2048
                    ),
                    tx=tx,
                ),
                "INVALID_ARGUMENT",
                None,
            ),
            # the issue: RX and TX rings at the same GPA were accepted
            (dict(vm=vm, mac=C, rx=rx, tx=rx), "INVALID_ARGUMENT", "RINGS_OVERLAP"),
            (dict(vm=vm, mac=C, tx=tx), "INVALID_ARGUMENT", None),
        ]
        for fields, code, reason in bad:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.netd.RegisterDevice(
                    netd_pb2.RegisterDeviceRequest(**fields),  # type: ignore[arg-type]
                    metadata=md,
                )
            assert info.value.code().name == code, (fields, info.value.details())
            assert len(info.value.details() or "") < 300  # a prefix of the input at most
            if reason is not None:
                assert error_info(info.value).reason == reason  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.netd.NotifyQueue(
                netd_pb2.NotifyQueueRequest(
                    device=netd_pb2.DeviceHandle(id="nope"), queue=netd_pb2.QUEUE_TX
                ),
                metadata=md,
            )
        assert error_info(info.value).reason == "UNKNOWN_DEVICE"  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.netd.GetDeviceStats(
                netd_pb2.GetDeviceStatsRequest(device=netd_pb2.DeviceHandle(id=huge)),
                metadata=md,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details() or "") < 300
        # a guest agent without a credential may not list the host's devices
        with pytest.raises(grpc.aio.AioRpcError):
            await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=md)
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        assert [d.mac for d in devices.devices] == [A]
        assert not any(d.device.token for d in devices.devices)
        # the issue: another guest's VMM unregistered guest-0's device. Its id is no secret,
        # but its token is guest-0's alone
        theirs = netd_pb2.DeviceHandle(id=devices.devices[0].device.id)
        for call in (
            s.netd.UnregisterDevice(
                netd_pb2.UnregisterDeviceRequest(device=theirs), metadata=vmm_md("guest-1")
            ),
            s.netd.NotifyQueue(
                netd_pb2.NotifyQueueRequest(device=theirs, queue=netd_pb2.QUEUE_TX),
                metadata=vmm_md("guest-1"),
            ),
            s.netd.GetDeviceStats(
                netd_pb2.GetDeviceStatsRequest(device=theirs), metadata=vmm_md("guest-1")
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(info.value).reason == "DEVICE_TOKEN_MISSING"  # type: ignore[union-attr]
        after = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        assert after.devices == devices.devices


@pytest.mark.rpc("snp.guest.v1.GuestService/SkipDmaConversion", "ok")
@pytest.mark.parametrize("policy", ["convert", "convert-kill", "gmem"])
async def test_buggy_guest_under_each_policy(tmp_path: Path, policy: str) -> None:
    """A guest that forgot to convert its RX buffers: the host's user-mode write hits private
    pages. The daemon lives on; only the buggy guest is affected, and never silently."""

    async with (
        host_stack(tmp_path, policy=policy) as s,
        agent(s, "guest-0", SNPEMU_GUEST_ON_VC="log") as (a, _),
        agent(s, "guest-1", SNPEMU_GUEST_ON_VC="log") as (b, _),
        agent(s, "guest-2", SNPEMU_GUEST_ON_VC="log") as (c, _),
    ):
        await attach(a, A)
        await attach(c, C)
        await b.SkipDmaConversion(guest_pb2.SkipDmaConversionRequest(mac=B))
        to_b = (
            await a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=B, payload=b"hi"))
        ).result
        to_c = (
            await a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=C, payload=b"ok"))
        ).result
        assert to_c == "delivered"
        assert [p.payload for p in await receive_all(c)] == [b"ok"]
        vms = {
            v.vm.id: v for v in (await s.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
        }
        terminated = [v for v in vms.values() if v.state == kvm_pb2.VM_STATE_TERMINATED]
        if policy == "gmem":
            assert to_b == "refused"
            assert not terminated
            assert await receive_all(b) == []
            assert dict((await status(b)).net_received) == {"rx_error": 1}
        else:
            assert to_b == "converted"
            if policy == "convert-kill":
                assert len(terminated) == 1
                with pytest.raises(grpc.aio.AioRpcError):
                    await receive_all(b)
            else:
                assert not terminated
                assert await receive_all(b) == []  # the guest was told: #VC, no data
                st = await status(b)
                assert dict(st.net_received) == {"vc": 1}
                assert any(e.kind == "vc" for e in st.events)
        for g in (a, c):
            st = await status(g)
            assert st.state == guest_pb2.BOOT_STATE_RUNNING
            assert not any(e.kind == "vc" for e in st.events)


@pytest.mark.rpc("snp.guest.v1.GuestService/FlipBufferDuringCopy", "ok")
@pytest.mark.rpc("snp.guest.v1.GuestService/GetStatus", "ok")
@pytest.mark.rpc("snp.guest.v1.GuestService/ReceivePackets", "ok")
@pytest.mark.rpc("snp.guest.v1.GuestService/SendPacket", "ok")
async def test_flip_mid_copy_is_refused_under_gmem(tmp_path: Path) -> None:
    """b arms the flip (it blanks the header of its next RX buffer, then watches it), a sends
    b a packet; netd's copy stands still after its first chunk until the flip has made the
    page private, so the next chunk meets a guest-owned page, which gmem refuses."""

    async with (
        host_stack(
            tmp_path,
            netd_env={"SNPEMU_NETD_COPY_CHUNK": "256", "SNPEMU_NETD_COPY_DELAY_MS": "40"},
        ) as s,
        agent(s, "guest-0", SNPEMU_GUEST_ON_VC="log") as (a, _),
        agent(s, "guest-1", SNPEMU_GUEST_ON_VC="log") as (b, b_rt),
    ):
        await attach(a, A)
        await attach(b, B)
        flipped = asyncio.Event()
        pauses: list[float] = []

        async def pause(delay: float) -> None:
            pauses.append(delay)
            await flipped.wait()

        s.runtimes["netd"].impl.servicer.d.sleep = pause  # type: ignore[union-attr]
        # a marker in the header of the buffer netd fills next: gone once the flip is armed
        gpa = await b_rt.impl.net.dev.next_rx_buffer()  # type: ignore[union-attr]
        marker = b"\xa5" * NET_HDR_LEN
        await b.WriteMemory(guest_pb2.WriteMemoryRequest(gpa=gpa, data=marker, shared=True))
        flip = asyncio.ensure_future(
            b.FlipBufferDuringCopy(guest_pb2.FlipBufferDuringCopyRequest(timeout_ms=60_000))
        )
        deadline = asyncio.get_running_loop().time() + 30
        while (
            await b.ReadMemory(
                guest_pb2.ReadMemoryRequest(gpa=gpa, length=NET_HDR_LEN, shared=True)
            )
        ).data == marker:
            assert asyncio.get_running_loop().time() < deadline, "the flip never armed"
        send = asyncio.ensure_future(
            a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=B, payload=bytes(1400)))
        )
        try:
            outcome = (await flip).outcome
        finally:
            flipped.set()
        sent = await send
        assert "flipped to private mid-copy" in outcome
        assert f"copy into {gpa:#x} began" in outcome
        assert pauses == [0.04]  # held after the first chunk; the second was refused
        assert sent.result == "refused"
        assert await receive_all(b) == []
        assert dict((await status(b)).net_received) == {"rx_error": 1}


async def test_a_device_the_host_unregisters_comes_back(tmp_path: Path) -> None:
    """The issue: after another party unregistered a guest's device, its sends answered `lost`
    forever and it never registered again. Now netd ends the device's hold, and the guest
    registers again; a send in between answers a clear error, never a silent `lost`."""

    async with (
        host_stack(tmp_path) as s,
        agent(s, "guest-0") as (a, _),
        agent(s, "guest-1") as (b, _),
    ):
        await attach(a, A)
        old = await attach(b, B)
        # a MAC in use: the guest's caller is told so (it answered INTERNAL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(mac=B))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_info(info.value).reason == "MAC_IN_USE"  # type: ignore[union-attr]
        await attach(a, A)  # a's driver reload above dropped its device: attach it again

        await s.netd.UnregisterDevice(
            netd_pb2.UnregisterDeviceRequest(device=netd_pb2.DeviceHandle(id=old)), metadata=HOST
        )
        deadline = asyncio.get_running_loop().time() + 20
        answers: list[str] = []
        while True:
            assert asyncio.get_running_loop().time() < deadline, answers
            try:
                r = await b.SendPacket(
                    guest_pb2.SendPacketRequest(destination_mac=A, payload=b"back")
                )
                answers.append(r.result)
            except grpc.aio.AioRpcError as e:
                answers.append(f"{e.code().name}:{error_info(e).reason}")  # type: ignore[union-attr]
            if answers[-1] == "delivered":
                break
            await asyncio.sleep(0.05)
        assert set(answers[:-1]) <= {"FAILED_PRECONDITION:NO_DEVICE"}, answers
        assert [p.payload for p in await receive_all(a)] == [b"back"]
        st = await status(b)
        assert st.net_reconnects == 1
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        by_mac = {d.mac: d.device.id for d in devices.devices}
        assert set(by_mac) == {A, B} and by_mac[B] != old
        # and a packet to b arrives on the new device
        r = await a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=B, payload=b"hi"))
        assert r.result == "delivered"
        assert [p.payload for p in await receive_all(b)] == [b"hi"]


async def test_the_guest_checks_macs_before_it_changes_anything(tmp_path: Path) -> None:
    async with (
        host_stack(tmp_path) as s,
        agent(s, "guest-0") as (a, _),
        agent(s, "guest-1") as (b, _),
    ):
        await attach(a, A)
        await attach(b, B)
        huge = "0" * (1 << 20)
        for bad in ("00:00:00:00:00:00", "01:00:5e:00:00:01", huge):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await a.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(mac=bad))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(info.value.details() or "") < 300
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await b.SendPacket(guest_pb2.SendPacketRequest(destination_mac=bad, payload=b"x"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(info.value.details() or "") < 300
        # a's device was left as it was: it still sends and receives
        r = await b.SendPacket(guest_pb2.SendPacketRequest(destination_mac=A, payload=b"ok"))
        assert r.result == "delivered"
        assert [p.payload for p in await receive_all(a)] == [b"ok"]
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        assert {d.mac for d in devices.devices} == {A, B}


async def test_after_netd_restarts_guests_register_again_and_sends_meanwhile_are_lost(
    tmp_path: Path,
) -> None:
    """netd's death is not the host dropping a device: a send meanwhile answers `lost` (counted),
    never the dropped-device error, and each guest registers again with its own tokens."""

    async with (
        host_stack(tmp_path) as s,
        agent(s, "guest-0") as (a, _),
        agent(s, "guest-1") as (b, _),
    ):
        await attach(a, A)
        await attach(b, B)
        old = s.runtimes["netd"]
        await old.stop()
        env = {
            "SNPEMU_GRPC_PORT": str(old.grpc_port),
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_HOST_CREDENTIAL": CRED,
            "SNPEMU_SHUTDOWN_GRACE_S": "0",
            "SNPEMU_RMP_ADDR": s.runtimes["rmp"].address,
            "SNPEMU_KVM_ADDR": s.runtimes["kvm"].address,
            "SNPEMU_DATA_DIR": str(tmp_path / "netd"),
        }
        r = await a.SendPacket(guest_pb2.SendPacketRequest(destination_mac=B, payload=b"x"))
        assert r.result == "lost"
        new = ServiceRuntime(netd.SPEC, ServiceConfig.from_env("netd", env), netd.SPEC.options({}))
        await new.start()
        try:
            answers: list[str] = []
            deadline = asyncio.get_running_loop().time() + 30
            while not answers or answers[-1] != "delivered":
                assert asyncio.get_running_loop().time() < deadline, answers
                try:
                    r = await a.SendPacket(
                        guest_pb2.SendPacketRequest(destination_mac=B, payload=b"again")
                    )
                    answers.append(r.result)
                except grpc.aio.AioRpcError as e:
                    answers.append(e.code().name)
                await asyncio.sleep(0.05)
            # no_route: a is back before b is
            assert set(answers[:-1]) <= {"lost", "no_route"}, answers
            assert [p.payload for p in await receive_all(b)] == [b"again"]
            for g in (a, b):
                assert (await status(g)).net_reconnects == 1
            devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
            assert {d.mac for d in devices.devices} == {A, B} and devices.restarts == 1
        finally:
            await new.stop()
