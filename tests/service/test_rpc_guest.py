"""The guest agent's RPCs through gRPC where no other test takes them: the error paths of
memory and device calls, the VMSA and response-page misbehaviours, and a terminated guest."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import grpc
import pytest
from snp.guest.v1 import guest_pb2 as pb
from snp.guest.v1 import guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2
from snp.netd.v1 import netd_pb2
from snp.rmp.v1 import rmp_pb2

from tests.service.host_stack import HOST, Stack, host_stack
from tests.service.test_guest import agent
from tests.service.test_rpc_netd import refused

A, B = "02:00:00:00:00:1a", "02:00:00:00:00:1b"


async def status(g: guest_pb2_grpc.GuestServiceStub) -> pb.GetStatusResponse:
    return await g.GetStatus(pb.GetStatusRequest())


async def spa_of(s: Stack, vm_id: str, gpa: int) -> int:
    mm = await s.kvm.GetMemoryMap(
        kvm_pb2.GetMemoryMapRequest(vm=kvm_pb2.VmInfo(vm={"id": vm_id}).vm), metadata=HOST
    )
    for r in mm.regions:
        if r.gpa <= gpa < r.gpa + r.size:
            return int(r.spa + gpa - r.gpa)
    raise AssertionError(f"{gpa:#x} is not mapped")


@pytest.mark.rpc("snp.guest.v1.GuestService/ConvertMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/AcceptMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/WriteMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ReadMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ReceivePackets", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/SendPacket", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/FlipBufferDuringCopy", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ExposeVmsaPage", "ok", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/AttachNetDevice", "ok", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/SkipDmaConversion", "error")
async def test_wrong_requests_and_the_vmsa_page(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s, agent(s, "guest-0") as (g, _):
        st = await status(g)
        assert st.state == pb.BOOT_STATE_RUNNING
        ram = st.memory_bytes
        await refused(
            g.ConvertMemory(pb.ConvertMemoryRequest(gpa=0x400000, size=4096, page_size=1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BAD_FIELD",
        )
        await refused(  # beyond guest RAM
            g.AcceptMemory(pb.AcceptMemoryRequest(gpa=ram, size=4096)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BAD_RANGE",
        )
        await refused(
            g.AcceptMemory(pb.AcceptMemoryRequest(gpa=0x400800, size=4096)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BAD_RANGE",
        )
        await refused(
            g.WriteMemory(pb.WriteMemoryRequest(gpa=0x400000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BAD_FIELD",
        )
        await refused(
            g.ReadMemory(pb.ReadMemoryRequest(gpa=0x400000, length=(1 << 20) + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOO_LARGE",
        )
        # the device calls before any device is attached
        for call in (
            g.ReceivePackets(pb.ReceivePacketsRequest()),
            g.SendPacket(pb.SendPacketRequest(destination_mac=B, payload=b"x")),
            g.FlipBufferDuringCopy(pb.FlipBufferDuringCopyRequest()),
            g.ExposeVmsaPage(pb.ExposeVmsaPageRequest()),
        ):
            await refused(call, grpc.StatusCode.FAILED_PRECONDITION, "NO_DEVICE")
        # virtio 1.2 2.7: a split queue's size is a power of 2
        for call in (
            g.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A, ring_entries=12)),
            g.SkipDmaConversion(pb.SkipDmaConversionRequest(mac=A, ring_entries=12)),
        ):
            await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        assert list(devices.devices) == []  # nothing registered by the refused calls

        dev = (await g.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A))).device_id
        assert dev
        await refused(
            g.SendPacket(pb.SendPacketRequest(payload=b"x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BAD_MAC",
        )
        await refused(
            g.FlipBufferDuringCopy(pb.FlipBufferDuringCopyRequest(timeout_ms=60_001)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        # the next RX buffer's page becomes private and a VMSA page, as the RMP says
        outcome = (await g.ExposeVmsaPage(pb.ExposeVmsaPageRequest())).outcome
        m = re.match(r"page (0x[0-9a-f]+) ", outcome)
        assert m, outcome
        spa = await spa_of(s, st.vm_id, int(m.group(1), 16))
        e = (
            await s.rmp.ReadRmpEntry(rmp_pb2.ReadRmpEntryRequest(pfn=spa >> 12), metadata=HOST)
        ).entry
        vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm={"id": st.vm_id}), metadata=HOST)).vm
        assert (e.assigned, e.vmsa, e.asid) == (True, True, vm.asid)


@pytest.mark.rpc("snp.guest.v1.GuestService/GetReport", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/GetExtendedReport", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/GetDerivedKey", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ConvertMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/WriteMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ReadMemory", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/AttachNetDevice", "ok", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/SkipDmaConversion", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/SendPacket", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/ReceivePackets", "error")
async def test_every_field_is_checked_before_the_guest_acts(tmp_path: Path) -> None:
    """The agent's own API refuses an out-of-range field with INVALID_ARGUMENT (or
    FAILED_PRECONDITION BAD_RANGE for an address outside guest RAM, as AcceptMemory does) and
    ErrorInfo, quotes at most a prefix of what it was sent, and changes nothing: not the
    guest's memory state, not its device (issue 19: WriteMemory over 1 MiB answered INTERNAL,
    ConvertMemory with conversion 99 converted a page)."""
    async with host_stack(tmp_path) as s, agent(s, "guest-0") as (g, rt):
        kernel = rt.impl.kernel
        dev = (await g.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A))).device_id

        async def state() -> tuple[object, ...]:
            st = await status(g)
            del st.events[:]
            devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
            return str(st), str(devices), bytes(kernel.unaccepted), bytes(kernel.accepted)

        before = await state()
        ram = (await status(g)).memory_bytes
        bad = grpc.StatusCode.INVALID_ARGUMENT
        huge_mac = "02:" * (1 << 18)
        for call, code, reason in (
            # SPEC: SNP ABI MSG_REPORT_REQ: REPORT_DATA is 64 bytes, VMPL 0..3
            (g.GetReport(pb.GetReportRequest(report_data=b"x" * 65)), bad, "TOO_LARGE"),
            (g.GetReport(pb.GetReportRequest(vmpl=4)), bad, "BAD_FIELD"),
            (g.GetExtendedReport(pb.GetExtendedReportRequest(certs_pages=17)), bad, "BAD_FIELD"),
            (g.GetDerivedKey(pb.GetDerivedKeyRequest(guest_field_select=1 << 7)), bad, "BAD_FIELD"),
            (g.GetDerivedKey(pb.GetDerivedKeyRequest(vmpl=0xFFFFFFFF)), bad, "BAD_FIELD"),
            (
                g.ConvertMemory(
                    pb.ConvertMemoryRequest(gpa=0x400000, size=4096, conversion=99, page_size=1)  # type: ignore[arg-type]
                ),
                bad,
                "BAD_ENUM",
            ),
            (
                g.ConvertMemory(
                    pb.ConvertMemoryRequest(
                        gpa=0x400000,
                        size=4096,
                        conversion=pb.CONVERSION_TO_SHARED,
                        page_size=99,  # type: ignore[arg-type]
                    )
                ),
                bad,
                "BAD_ENUM",
            ),
            (  # a 2M conversion of a range that is not 2M aligned: refused before any page moves
                g.ConvertMemory(
                    pb.ConvertMemoryRequest(
                        gpa=0x400000, size=4096, conversion=pb.CONVERSION_TO_SHARED, page_size=2
                    )
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                "BAD_RANGE",
            ),
            (
                g.WriteMemory(pb.WriteMemoryRequest(gpa=0x400000, data=b"x" * ((1 << 20) + 1))),
                bad,
                "TOO_LARGE",
            ),
            (
                g.WriteMemory(pb.WriteMemoryRequest(gpa=ram - 4, data=b"12345678", shared=True)),
                grpc.StatusCode.FAILED_PRECONDITION,
                "BAD_RANGE",
            ),
            (
                g.ReadMemory(pb.ReadMemoryRequest(gpa=(1 << 64) - 1, length=1)),
                grpc.StatusCode.FAILED_PRECONDITION,
                "BAD_RANGE",
            ),
            # SPEC: IEEE 802: bit 0 of the first octet marks a group address
            (g.AttachNetDevice(pb.AttachNetDeviceRequest(mac="01:00:00:00:00:01")), bad, "BAD_MAC"),
            (g.SkipDmaConversion(pb.SkipDmaConversionRequest(mac="02:00")), bad, "BAD_MAC"),
            (g.SendPacket(pb.SendPacketRequest(destination_mac=huge_mac)), bad, "BAD_MAC"),
            (g.ReceivePackets(pb.ReceivePacketsRequest(max_packets=1 << 31)), bad, "BAD_FIELD"),
        ):
            details = await refused(call, code, reason)
            assert len(details) < 200, details[:300]
        assert await state() == before
        listed = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        assert [d.device.id for d in listed.devices] == [dev]


@pytest.mark.rpc("snp.guest.v1.GuestService/AttachNetDevice", "ok", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/SkipDmaConversion", "error")
async def test_an_attach_netd_refuses_leaves_the_window_and_the_old_device(tmp_path: Path) -> None:
    """An attach with a MAC another VM's device holds is ALREADY_EXISTS, after the window was
    converted to shared: the driver's error path puts every page back (issue 19: the window
    stayed shared), and a driver that was attached before is attached again."""
    async with (
        host_stack(tmp_path) as s,
        agent(s, "guest-0") as (g0, _),
        agent(s, "guest-1") as (g1, rt1),
    ):
        await g0.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A))
        kernel = rt1.impl.kernel

        async def memory() -> tuple[object, ...]:
            st = await status(g1)
            rmp = await s.rmp_entries()
            return st.accepted_bytes, rmp, bytes(kernel.unaccepted), bytes(kernel.accepted)

        async def macs() -> list[str]:
            listed = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
            return sorted(d.mac for d in listed.devices)

        # a lazily accepting guest, so the window holds never-touched pages as well
        await g1.AcceptMemory(pb.AcceptMemoryRequest(gpa=0x100_0000, size=0x4000))
        before = await memory()
        for attach in (  # one at a time: an aio call starts when it is made
            lambda: g1.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A)),
            lambda: g1.SkipDmaConversion(pb.SkipDmaConversionRequest(mac=A)),
        ):
            call = attach()
            await refused(call, grpc.StatusCode.ALREADY_EXISTS, "MAC_IN_USE")
            assert await memory() == before
        assert await macs() == [A]

        await g1.AttachNetDevice(pb.AttachNetDeviceRequest(mac=B))
        before = await memory()
        await refused(
            g1.AttachNetDevice(pb.AttachNetDeviceRequest(mac=A)),
            grpc.StatusCode.ALREADY_EXISTS,
            "MAC_IN_USE",
        )
        assert await macs() == [A, B]
        assert await memory() == before
        sent = await g1.SendPacket(pb.SendPacketRequest(destination_mac=A, payload=b"still up"))
        assert sent.result == "delivered", sent


@pytest.mark.rpc("snp.guest.v1.GuestService/FlipResponsePage", "ok", "error")
@pytest.mark.rpc("snp.guest.v1.GuestService/GetReport", "error")
async def test_a_response_page_flipped_private_under_convert_kill(tmp_path: Path) -> None:
    """kvm's kernel-mode write of the response hits the page the guest made private: under
    convert-kill the host converts it and kills the guest; a terminated guest refuses calls."""

    async with host_stack(tmp_path, policy="convert-kill") as s, agent(s, "guest-0") as (g, _):
        outcome = (await g.FlipResponsePage(pb.FlipResponsePageRequest())).outcome
        assert outcome, outcome
        deadline = time.monotonic() + 10
        while (st := await status(g)).state != pb.BOOT_STATE_TERMINATED:
            assert time.monotonic() < deadline, (outcome, st.state)
            await asyncio.sleep(0.02)
        vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm={"id": st.vm_id}), metadata=HOST)).vm
        assert vm.state == kvm_pb2.VM_STATE_TERMINATED
        await refused(
            g.FlipResponsePage(pb.FlipResponsePageRequest()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "GUEST_TERMINATED",
        )
        await refused(
            g.GetReport(pb.GetReportRequest()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "GUEST_TERMINATED",
        )
