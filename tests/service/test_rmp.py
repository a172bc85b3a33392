"""The rmp service over real gRPC, in-process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu import rmp
from snpemu.rmp.options import RmpOptions
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime
from snpemu.runtime.status import error_info

from tests.conftest import FakeClock, eventually

CRED = "test-credential-0123456789"
HOST = (("x-snpemu-host-credential", CRED),)
ASID = 7
KEY = bytes(range(64))


async def alloc(stub: rmp_pb2_grpc.RmpServiceStub, count: int) -> list[int]:
    """count frames anywhere (PLACEMENT_ANY)."""
    r = await stub.AllocatePages(
        pb.AllocatePagesRequest(count=count, placement=pb.PLACEMENT_ANY), metadata=HOST
    )
    return list(r.pfns)


@contextlib.asynccontextmanager
async def with_rmp(
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    **env: str,
) -> AsyncIterator[tuple[rmp_pb2_grpc.RmpServiceStub, ServiceRuntime]]:
    """An rmp service of 64 MiB (its options from `env`), its stub and its runtime."""
    config = ServiceConfig.from_env(
        "rmp",
        {
            "SNPEMU_GRPC_PORT": "0",
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_HOST_CREDENTIAL": CRED,
            "SNPEMU_SHUTDOWN_GRACE_S": "0",
        },
    )
    options = RmpOptions.from_env({"SNPEMU_RMP_MEMORY": "64M", **env})
    if clock is not None:
        options = dataclasses.replace(options, clock=clock)
    if sleep is not None:
        options = dataclasses.replace(options, sleep=sleep)
    runtime = ServiceRuntime(rmp.SPEC, config, options)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            yield rmp_pb2_grpc.RmpServiceStub(channel), runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def stub() -> AsyncIterator[rmp_pb2_grpc.RmpServiceStub]:
    """with_rmp() with its defaults (64 MiB, the gmem policy), for a test that needs only the
    stub; a test that needs other options or the runtime opens with_rmp(...) itself."""
    async with with_rmp() as (rmp_stub, _runtime):
        yield rmp_stub


def identity(
    vcpu: int = 0, asid: int = ASID, vm: str = "vm-a", vmpl: int = 0
) -> handles_pb2.VcpuIdentity:
    return handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=vm), vcpu_id=vcpu),
        asid=asid,
        vmpl=vmpl,
        token=(vm.encode() + bytes(32))[:32],
    )


async def guest_setup(
    stub: rmp_pb2_grpc.RmpServiceStub, pages: int = 8, asid: int = ASID, vm: str = "vm-a"
) -> tuple[list[int], handles_pb2.VcpuIdentity]:
    """What kvm and psp do before a guest runs: frames, NPT, key, identity, private pages."""
    pfns = await alloc(stub, pages)
    # INVARIANT: ANY placement hands out consecutive frames on a fresh host
    assert pfns == list(range(pfns[0], pfns[0] + pages))
    await stub.UpdateNestedPageTable(
        pb.UpdateNestedPageTableRequest(
            asid=asid, map=[pb.NptMapping(gpa=0, first_pfn=pfns[0], npages=pages)]
        ),
        metadata=HOST,
    )
    key = bytes((b + asid) % 256 for b in KEY)
    await stub.InstallMemoryKey(pb.InstallMemoryKeyRequest(asid=asid, key=key), metadata=HOST)
    ident = identity(asid=asid, vm=vm)
    await stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=ident), metadata=HOST)
    for i, pfn in enumerate(pfns):
        r = await stub.RmpUpdate(
            pb.RmpUpdateRequest(
                spa=pfn << 12,
                state=pb.RmpState(
                    gpa=i << 12, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=asid
                ),
            ),
            metadata=HOST,
        )
        assert r.result == pb.RMP_RESULT_SUCCESS
    return pfns, ident


@pytest.mark.rpc("snp.rmp.v1.RmpService/GetPlatformInfo", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestRead", "error")
async def test_host_only_rpcs_need_the_credential(stub: rmp_pb2_grpc.RmpServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetPlatformInfo(pb.GetPlatformInfoRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetPlatformInfo(
            pb.GetPlatformInfoRequest(), metadata=(("x-snpemu-host-credential", "nope"),)
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info_reply = await stub.GetPlatformInfo(pb.GetPlatformInfoRequest(), metadata=HOST)
    assert info_reply.memory_bytes == 64 << 20 and info_reply.snp_capable
    assert info_reply.violation_policy == pb.VIOLATION_POLICY_GMEM
    # guest RPCs need no credential but a registered identity
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GuestRead(
            pb.GuestReadRequest(identity=identity(), gpa=0, length=8, private=True)
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    detail = error_info(info.value)
    assert detail is not None and detail.reason == "BAD_VCPU_IDENTITY"


async def test_iommu_passthrough_is_not_snp_capable() -> None:
    async with with_rmp(SNPEMU_RMP_IOMMU="passthrough") as (stub, _rt):
        reply = await stub.GetPlatformInfo(pb.GetPlatformInfoRequest(), metadata=HOST)
        assert reply.iommu_mode == pb.IOMMU_MODE_PASSTHROUGH and not reply.snp_capable


async def test_private_memory_is_encrypted_and_owned(stub: rmp_pb2_grpc.RmpServiceStub) -> None:
    pfns, ident = await guest_setup(stub)
    # Not validated yet: #VC
    r = await stub.GuestRead(
        pb.GuestReadRequest(identity=ident, gpa=0x1000, length=4, private=True)
    )
    assert r.fault.vc and r.fault.cause == "page not validated"
    v = await stub.PvalidateBatch(
        pb.PvalidateBatchRequest(identity=ident, gpas=[i << 12 for i in range(8)], validate=True)
    )
    assert v.codes == bytes(8) and not v.HasField("fault")
    secret = b"the same secret!" * 4
    for gpa in (0x1000, 0x2000):
        w = await stub.GuestWrite(
            pb.GuestWriteRequest(identity=ident, gpa=gpa, data=secret, private=True)
        )
        assert not w.HasField("fault")
    back = await stub.GuestRead(
        pb.GuestReadRequest(identity=ident, gpa=0x1000, length=len(secret), private=True)
    )
    assert back.data == secret
    c1 = (await stub.HostRead(pb.HostReadRequest(spa=pfns[1] << 12, length=64), metadata=HOST)).data
    c2 = (await stub.HostRead(pb.HostReadRequest(spa=pfns[2] << 12, length=64), metadata=HOST)).data
    assert c1 != secret and c2 != secret and c1 != c2  # ciphertext, tweaked by address
    # Shared (C=0) access to a private page is an RMP #NPF
    s = await stub.GuestRead(
        pb.GuestReadRequest(identity=ident, gpa=0x1000, length=4, private=False)
    )
    assert s.fault.npf and s.fault.error_code & (1 << 31) and not s.fault.error_code & (1 << 34)
    # Another guest can neither read nor validate these pages
    _, other = await guest_setup(stub, pages=2, asid=ASID + 1, vm="vm-b")
    await stub.UpdateNestedPageTable(
        pb.UpdateNestedPageTableRequest(
            asid=ASID + 1, map=[pb.NptMapping(gpa=0x100000, first_pfn=pfns[1], npages=1)]
        ),
        metadata=HOST,
    )
    r = await stub.GuestRead(
        pb.GuestReadRequest(identity=other, gpa=0x100000, length=4, private=True)
    )
    assert r.fault.npf and r.fault.cause == "page not owned by this guest" and r.data == b""
    p = await stub.Pvalidate(
        pb.PvalidateRequest(
            identity=other, gpa=0x100000, page_size=types_pb2.PAGE_SIZE_4K, validate=False
        )
    )
    assert p.fault.npf
    # The owner's data is intact
    back = await stub.GuestRead(
        pb.GuestReadRequest(identity=ident, gpa=0x1000, length=len(secret), private=True)
    )
    assert back.data == secret


@pytest.mark.rpc("snp.rmp.v1.RmpService/ListRmpEntries", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/Pvalidate", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/ReadRmpEntry", "error")
async def test_entries_decoded_and_raw(stub: rmp_pb2_grpc.RmpServiceStub) -> None:
    pfns, ident = await guest_setup(stub, pages=2)
    await stub.Pvalidate(
        pb.PvalidateRequest(
            identity=ident, gpa=0x1000, page_size=types_pb2.PAGE_SIZE_4K, validate=True
        )
    )
    e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[1]), metadata=HOST)).entry
    assert (e.assigned, e.asid, e.gpa, e.validated, e.state) == (
        True,
        ASID,
        0x1000,
        True,
        types_pb2.PAGE_STATE_GUEST_VALID,
    )
    lo, hi = struct.unpack("<QQ", e.raw)
    assert lo == 1 | 0x1000 | ASID << 51 | 1 << 62 and hi == 0
    listed = await stub.ListRmpEntries(
        pb.ListRmpEntriesRequest(first_pfn=0, count=4096, non_default_only=True), metadata=HOST
    )
    assert [x.pfn for x in listed.entries] == pfns
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=1 << 40), metadata=HOST)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.rpc("snp.rmp.v1.RmpService/ReadRmpEntry", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RmpUpdateBatch", "ok", "error")
async def test_batch_rmpupdate_packed_entries(stub: rmp_pb2_grpc.RmpServiceStub) -> None:
    pfns = await alloc(stub, 4)
    entries = b"".join(
        struct.pack("<QQBBBBI", p << 12, i << 12, 1, 0, 0, 0, ASID) for i, p in enumerate(pfns)
    )
    entries += struct.pack("<QQBBBBI", (pfns[0] << 12) | 1, 0, 0, 0, 0, 0, 0)  # misaligned SPA
    r = await stub.RmpUpdateBatch(pb.RmpUpdateBatchRequest(entries=entries), metadata=HOST)
    assert list(r.codes) == [0, 0, 0, 0, 1]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RmpUpdateBatch(pb.RmpUpdateBatchRequest(entries=entries[:-1]), metadata=HOST)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[3]), metadata=HOST)).entry
    assert (e.assigned, e.gpa, e.asid) == (True, 0x3000, ASID)


class Kvm:
    """A test subscriber standing in for kvm's side of the MMU-notifier stream."""

    def __init__(self, stub: rmp_pb2_grpc.RmpServiceStub, ack: bool = True) -> None:
        self.stub, self.ack, self.seen = stub, ack, []
        self.call = stub.WatchMmuNotifications(pb.WatchMmuNotificationsRequest(), metadata=HOST)
        self.task = asyncio.ensure_future(self._loop())

    @classmethod
    async def subscribed(
        cls, stub: rmp_pb2_grpc.RmpServiceStub, rt: ServiceRuntime, ack: bool = True
    ) -> Kvm:
        """A subscriber whose stream rmp has taken in (its hub holds one more queue)."""
        hub: Any = rt.impl.hub  # type: ignore[attr-defined]
        before = len(hub.subscribers)
        kvm = cls(stub, ack)
        await eventually(lambda: len(hub.subscribers) == before + 1, "rmp took the subscription")
        return kvm

    async def _loop(self) -> None:
        async for note in self.call:
            self.seen.append(note)
            if self.ack:
                await self.stub.AcknowledgeMmuNotification(
                    pb.AcknowledgeMmuNotificationRequest(sequence=note.sequence), metadata=HOST
                )

    def close(self) -> None:
        self.call.cancel()


async def write(stub: rmp_pb2_grpc.RmpServiceStub, spa: int, origin: int) -> pb.HostWriteResponse:
    return await stub.HostWrite(
        pb.HostWriteRequest(spa=spa, data=b"host data", origin=origin, writer="test"), metadata=HOST
    )


@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestRead", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/PvalidateBatch", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RmpAdjust", "ok")
async def test_convert_policy_converts_and_the_guest_is_told() -> None:
    async with with_rmp(SNPEMU_RMP_POLICY="convert", SNPEMU_RMP_KICK_TIMEOUT_S="1") as (stub, rt):
        pfns, ident = await guest_setup(stub)
        await stub.PvalidateBatch(
            pb.PvalidateBatchRequest(
                identity=ident, gpas=[i << 12 for i in range(8)], validate=True
            )
        )
        r = await write(stub, pfns[3] << 12, pb.ACCESS_ORIGIN_USER)
        assert r.outcome == pb.VIOLATION_OUTCOME_CONVERTED
        assert r.entry.asid == ASID and r.rmp_dump[0].startswith(f"PFN 0x{pfns[3]:x}, RMP entry: [")
        e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[3]), metadata=HOST)).entry
        assert e.state == types_pb2.PAGE_STATE_HYPERVISOR
        # the guest's next private access faults; once kvm makes it private again: #VC
        g = await stub.GuestRead(
            pb.GuestReadRequest(identity=ident, gpa=0x3000, length=4, private=True)
        )
        assert g.fault.npf and g.fault.cause == "private access to a shared page"
        await stub.RmpUpdate(
            pb.RmpUpdateRequest(
                spa=pfns[3] << 12,
                state=pb.RmpState(
                    gpa=0x3000, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=ASID
                ),
            ),
            metadata=HOST,
        )
        g = await stub.GuestRead(
            pb.GuestReadRequest(identity=ident, gpa=0x3000, length=4, private=True)
        )
        assert g.fault.vc and g.fault.error_code == 0x404
        # a VMSA page needs kvm to kick the vCPUs; with nobody subscribed: SIGBUS
        await stub.RmpAdjust(
            pb.RmpAdjustRequest(
                identity=ident,
                gpa=0x4000,
                page_size=types_pb2.PAGE_SIZE_4K,
                target_vmpl=1,
                vmsa=True,
            )
        )
        r = await write(stub, pfns[4] << 12, pb.ACCESS_ORIGIN_USER)
        assert r.outcome == pb.VIOLATION_OUTCOME_SIGBUS
        kvm = await Kvm.subscribed(stub, rt)
        r = await write(stub, pfns[4] << 12, pb.ACCESS_ORIGIN_USER)
        assert r.outcome == pb.VIOLATION_OUTCOME_CONVERTED
        # the conversion waited for the acknowledgement, which the subscriber sends after
        # recording the notification: it is there when the write returns
        assert [(n.asid, n.pfn, n.terminate) for n in kvm.seen] == [(ASID, pfns[4], False)]
        kvm.close()
        reg = rt.registry
        assert (
            reg.get_sample_value(
                "snp_rmp_violations_total",
                {"origin": "user", "policy": "convert", "outcome": "converted"},
            )
            == 2
        )
        assert (
            reg.get_sample_value(
                "snp_rmp_violations_total",
                {"origin": "user", "policy": "convert", "outcome": "sigbus"},
            )
            == 1
        )


async def test_an_unacknowledged_kick_gives_up_when_rmps_timer_fires() -> None:
    """A VMSA page is converted only once kvm acknowledged the kick; a subscriber that never
    acknowledges leaves the write waiting until the kick timeout's timer fires: SIGBUS."""
    timers: list[float] = []
    fire = asyncio.Event()

    async def timer(seconds: float) -> None:
        timers.append(seconds)
        await fire.wait()

    async with with_rmp(
        sleep=timer, SNPEMU_RMP_POLICY="convert", SNPEMU_RMP_KICK_TIMEOUT_S="1.5"
    ) as (stub, rt):
        pfns, ident = await guest_setup(stub, pages=1)
        await stub.Pvalidate(
            pb.PvalidateRequest(
                identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, validate=True
            )
        )
        a = await stub.RmpAdjust(
            pb.RmpAdjustRequest(
                identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, target_vmpl=1, vmsa=True
            )
        )
        assert a.result == pb.RMP_RESULT_SUCCESS
        kvm = await Kvm.subscribed(stub, rt, ack=False)
        pending = asyncio.ensure_future(write(stub, pfns[0] << 12, pb.ACCESS_ORIGIN_USER))
        await eventually(lambda: bool(kvm.seen), "kvm was notified")
        assert timers == [1.5]  # SNPEMU_RMP_KICK_TIMEOUT_S
        assert not pending.done()  # no acknowledgement, no timeout yet: the write waits
        fire.set()
        r = await pending
        assert r.outcome == pb.VIOLATION_OUTCOME_SIGBUS
        e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[0]), metadata=HOST)).entry
        assert e.assigned and e.vmsa  # not converted
        kvm.close()


@pytest.mark.rpc("snp.rmp.v1.RmpService/AcknowledgeMmuNotification", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/HostWrite", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/InstallMemoryKey", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RegisterVcpuIdentity", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RmpUpdate", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/UpdateNestedPageTable", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/WatchMmuNotifications", "ok")
async def test_convert_kill_asks_kvm_to_terminate() -> None:
    async with with_rmp(SNPEMU_RMP_POLICY="convert-kill") as (stub, rt):
        pfns, _ = await guest_setup(stub, pages=2)
        kvm = await Kvm.subscribed(stub, rt)
        r = await write(stub, pfns[1] << 12, pb.ACCESS_ORIGIN_KERNEL)
        assert r.outcome == pb.VIOLATION_OUTCOME_CONVERTED
        # the write returned after kvm acknowledged the terminate notification (recorded first)
        assert [(n.asid, n.terminate) for n in kvm.seen] == [(ASID, True)]
        kvm.close()


async def test_rmpadjust_race_is_ended_by_the_kick() -> None:
    clock = FakeClock()  # the hold lasts until the test moves this clock

    async with with_rmp(clock, SNPEMU_RMP_POLICY="convert", SNPEMU_RMP_INSN_HOLD_US="1000000") as (
        stub,
        rt,
    ):
        pfns, ident = await guest_setup(stub, pages=2)
        await stub.Pvalidate(
            pb.PvalidateRequest(
                identity=ident, gpa=0x1000, page_size=types_pb2.PAGE_SIZE_4K, validate=True
            )
        )
        clock.advance(1.0)  # the PVALIDATE's hold is over
        # The guest holds the entry (instruction in flight for 1 s of rmp's clock)
        a = await stub.RmpAdjust(
            pb.RmpAdjustRequest(
                identity=ident, gpa=0x1000, page_size=types_pb2.PAGE_SIZE_4K, target_vmpl=1, perms=1
            )
        )
        assert a.result == pb.RMP_RESULT_SUCCESS
        u = await stub.RmpUpdate(
            pb.RmpUpdateRequest(
                spa=pfns[1] << 12, state=pb.RmpState(page_size=types_pb2.PAGE_SIZE_4K)
            ),
            metadata=HOST,
        )
        assert u.result == pb.RMP_RESULT_FAIL_INUSE and u.eax == 3
        clock.advance(0.999)  # still in flight
        u = await stub.RmpUpdate(
            pb.RmpUpdateRequest(
                spa=pfns[1] << 12, state=pb.RmpState(page_size=types_pb2.PAGE_SIZE_4K)
            ),
            metadata=HOST,
        )
        assert u.result == pb.RMP_RESULT_FAIL_INUSE
        kvm = await Kvm.subscribed(stub, rt)
        r = await write(stub, pfns[1] << 12, pb.ACCESS_ORIGIN_KERNEL)
        assert r.outcome == pb.VIOLATION_OUTCOME_CONVERTED  # retried after the kick
        assert [n.reason for n in kvm.seen] == ["RMPUPDATE in use"]
        e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[1]), metadata=HOST)).entry
        assert not e.assigned and e.state == types_pb2.PAGE_STATE_HYPERVISOR
        kvm.close()


async def test_an_instruction_hold_ends_on_rmps_clock() -> None:
    """Without a kick, the entry is free again once rmp's clock has moved past the hold."""
    clock = FakeClock()

    async with with_rmp(clock, SNPEMU_RMP_INSN_HOLD_US="250000") as (stub, _rt):
        pfns, ident = await guest_setup(stub, pages=2)
        to_shared = pb.RmpUpdateRequest(
            spa=pfns[1] << 12, state=pb.RmpState(page_size=types_pb2.PAGE_SIZE_4K)
        )
        await stub.Pvalidate(
            pb.PvalidateRequest(
                identity=ident, gpa=0x1000, page_size=types_pb2.PAGE_SIZE_4K, validate=True
            )
        )
        for _ in range(3):  # however many tries, however long they take: still held
            u = await stub.RmpUpdate(to_shared, metadata=HOST)
            assert u.result == pb.RMP_RESULT_FAIL_INUSE
        clock.advance(0.25)  # the hold's end
        u = await stub.RmpUpdate(to_shared, metadata=HOST)
        assert u.result == pb.RMP_RESULT_SUCCESS


async def test_sigbus_policy_kernel_write_panics_the_host() -> None:
    async with with_rmp(SNPEMU_RMP_POLICY="sigbus") as (stub, rt):
        pfns, _ = await guest_setup(stub, pages=2)
        r = await write(stub, pfns[0] << 12, pb.ACCESS_ORIGIN_USER)
        assert r.outcome == pb.VIOLATION_OUTCOME_SIGBUS
        # KERNEL: arch/x86/virt/svm/sev.c dump_rmpentry(): an assigned entry is one line, the
        # raw lo then hi; lo from struct rmpentry_raw: assigned bit 0, gpa 50:12, asid 60:51.
        lo = 1 | 0 << 12 | ASID << 51
        assert list(r.rmp_dump) == [f"PFN 0x{pfns[0]:x}, RMP entry: [0x{lo:016x} - 0x{0:016x}]"]
        before = (
            await stub.HostRead(pb.HostReadRequest(spa=pfns[0] << 12, length=9), metadata=HOST)
        ).data
        assert before != b"host data"  # the write did not happen
        r = await write(stub, pfns[1] << 12, pb.ACCESS_ORIGIN_KERNEL)
        assert r.outcome == pb.VIOLATION_OUTCOME_PANIC
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetPlatformInfo(pb.GetPlatformInfoRequest(), metadata=HOST)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "HOST_PANIC"
        async with grpc.aio.insecure_channel(rt.address) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert rt.registry.get_sample_value("snp_host_panics_total") == 1


@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestWrite", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/HostRead", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/MapHostPage", "error")
async def test_gmem_user_write_is_refused_and_changes_nothing(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    pfns, ident = await guest_setup(stub, pages=1)
    await stub.Pvalidate(
        pb.PvalidateRequest(identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, validate=True)
    )
    await stub.GuestWrite(pb.GuestWriteRequest(identity=ident, gpa=0, data=b"mine", private=True))
    before = (
        await stub.HostRead(pb.HostReadRequest(spa=pfns[0] << 12, length=4096), metadata=HOST)
    ).data
    r = await write(stub, pfns[0] << 12, pb.ACCESS_ORIGIN_USER)
    assert r.outcome == pb.VIOLATION_OUTCOME_REFUSED
    after = (
        await stub.HostRead(pb.HostReadRequest(spa=pfns[0] << 12, length=4096), metadata=HOST)
    ).data
    assert after == before
    e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[0]), metadata=HOST)).entry
    assert e.state == types_pb2.PAGE_STATE_GUEST_VALID
    g = await stub.GuestRead(pb.GuestReadRequest(identity=ident, gpa=0, length=4, private=True))
    assert g.data == b"mine"
    # kernel writers map (and so check) first: a private page cannot be mapped
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.MapHostPage(
            pb.MapHostPageRequest(spa=pfns[0] << 12, holder="kvm"), metadata=HOST
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.rpc("snp.rmp.v1.RmpService/ListHostMaps", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/MapHostPage", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/UnmapHostPage", "ok", "error")
async def test_host_map_lock_blocks_conversion_to_private() -> None:
    clock = FakeClock()  # the map's age is read from rmp's clock

    async with with_rmp(clock, SNPEMU_RMP_MAP_LEAK_S="0.25") as (stub, _rt):
        pfns = await alloc(stub, 1)
        await stub.UpdateNestedPageTable(
            pb.UpdateNestedPageTableRequest(
                asid=ASID, map=[pb.NptMapping(gpa=0x5000, first_pfn=pfns[0], npages=1)]
            ),
            metadata=HOST,
        )
        m = await stub.MapHostPage(
            pb.MapHostPageRequest(guest=pb.GuestPageAddress(asid=ASID, gpa=0x5000), holder="netd"),
            metadata=HOST,
        )
        assert m.spa == pfns[0] << 12
        to_private = pb.RmpUpdateRequest(
            spa=m.spa,
            state=pb.RmpState(
                gpa=0x5000, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=ASID
            ),
        )
        assert (await stub.RmpUpdate(to_private, metadata=HOST)).result == pb.RMP_RESULT_FAIL_INUSE
        clock.advance(0.25)  # held for exactly the threshold: not yet stale
        maps = (await stub.ListHostMaps(pb.ListHostMapsRequest(), metadata=HOST)).maps
        assert [(x.holder, x.stale) for x in maps] == [("netd", False)]
        clock.advance(0.001)
        maps = (await stub.ListHostMaps(pb.ListHostMapsRequest(), metadata=HOST)).maps
        assert [(x.holder, x.stale) for x in maps] == [("netd", True)]
        await stub.UnmapHostPage(pb.UnmapHostPageRequest(map_id=m.map_id), metadata=HOST)
        assert (await stub.RmpUpdate(to_private, metadata=HOST)).result == pb.RMP_RESULT_SUCCESS
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UnmapHostPage(pb.UnmapHostPageRequest(map_id=m.map_id), metadata=HOST)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.rpc("snp.rmp.v1.RmpService/FreePages", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/LeakPages", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/ListLeakedPages", "ok")
async def test_leaked_pages_are_never_reused_and_counted() -> None:
    async with with_rmp() as (stub, rt):
        pfns, _ = await guest_setup(stub, pages=2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FreePages(pb.FreePagesRequest(pfns=pfns), metadata=HOST)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await stub.LeakPages(pb.LeakPagesRequest(pfns=pfns, reason="reclaim failed"), metadata=HOST)
        assert (
            list((await stub.ListLeakedPages(pb.ListLeakedPagesRequest(), metadata=HOST)).pfns)
            == pfns
        )
        got = (
            await stub.AllocatePages(
                pb.AllocatePagesRequest(count=16384 - 2, placement=pb.PLACEMENT_ANY), metadata=HOST
            )
        ).pfns
        assert not set(got) & set(pfns)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.AllocatePages(
                pb.AllocatePagesRequest(count=1, placement=pb.PLACEMENT_ANY), metadata=HOST
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rt.registry.get_sample_value("snp_rmp_leaked_pages_total") == 2
        e = (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfns[0]), metadata=HOST)).entry
        assert e.leaked


@pytest.mark.rpc("snp.rmp.v1.RmpService/AllocatePages", "ok", "error")
async def test_allocation_placements(stub: rmp_pb2_grpc.RmpServiceStub) -> None:
    tmr = (
        await stub.AllocatePages(
            pb.AllocatePagesRequest(count=512, placement=pb.PLACEMENT_ALIGNED_2M), metadata=HOST
        )
    ).pfns
    assert tmr[0] % 512 == 0 and list(tmr) == list(range(tmr[0], tmr[0] + 512))
    safe = (
        await stub.AllocatePages(
            pb.AllocatePagesRequest(count=2000, placement=pb.PLACEMENT_SNP_SAFE), metadata=HOST
        )
    ).pfns
    assert all(p % 512 for p in safe)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AllocatePages(
            pb.AllocatePagesRequest(count=3, placement=pb.PLACEMENT_ALIGNED_2M), metadata=HOST
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_are_exported() -> None:
    async with with_rmp() as (stub, rt):
        _, ident = await guest_setup(stub, pages=3)
        await stub.Pvalidate(
            pb.PvalidateRequest(
                identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, validate=True
            )
        )
        url = f"http://127.0.0.1:{rt.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        total = (64 << 20) // 4096
        assert f'snp_rmp_pages{{state="hypervisor"}} {float(total - 3)}' in text
        assert 'snp_rmp_pages{state="guest_invalid"} 2.0' in text
        assert 'snp_rmp_pages{state="guest_valid"} 1.0' in text
        assert 'snp_rmp_updates_total{instruction="rmpupdate",result="success"} 3.0' in text
        assert 'snp_rmp_updates_total{instruction="pvalidate",result="success"} 1.0' in text
        assert 'snp_rmp_updates_total{instruction="psmash",result="fail_inuse"} 0.0' in text
        assert (
            'snp_rmp_violations_total{origin="kernel",outcome="panic",policy="sigbus"} 0.0' in text
        )
        assert 'snp_rmp_violation_policy{policy="gmem"} 1.0' in text
        assert "snp_rmp_leaked_pages_total 0.0" in text and "snp_host_panics_total 0.0" in text


@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareSession", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareSession", "error")
async def test_firmware_session_answers_in_order_and_survives_errors(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    pfns = await alloc(stub, 1)
    spa = pfns[0] << 12
    session = stub.FirmwareSession(metadata=HOST)
    await session.write(
        pb.FirmwareSessionRequest(write=pb.FirmwareWriteRequest(spa=spa, data=b"abc"))
    )
    assert (await session.read()).WhichOneof("result") == "write"
    # expects a firmware page: this one is a hypervisor page
    await session.write(
        pb.FirmwareSessionRequest(
            read=pb.FirmwareReadRequest(
                spa=spa, length=3, expect_states=[types_pb2.PAGE_STATE_FIRMWARE]
            )
        )
    )
    err = (await session.read()).error
    assert (err.reason, err.metadata["state"], err.code) == (
        "PAGE_STATE_MISMATCH",
        "HYPERVISOR",
        9,
    )
    await session.write(
        pb.FirmwareSessionRequest(
            read=pb.FirmwareReadRequest(
                spa=spa, length=3, expect_states=[types_pb2.PAGE_STATE_HYPERVISOR]
            )
        )
    )
    assert (await session.read()).read.data == b"abc"
    await session.done_writing()


@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestSession", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestSession", "error")
async def test_guest_session_checks_each_ops_identity_and_answers_in_order(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    """No credential: the vCPU identity of each op is the check, as in the unary calls."""

    _pfns, ident = await guest_setup(stub, pages=2)
    session = stub.GuestSession()  # no host credential
    ops = [
        pb.GuestSessionRequest(
            pvalidate_batch=pb.PvalidateBatchRequest(identity=ident, gpas=[0], validate=True)
        ),
        pb.GuestSessionRequest(
            write=pb.GuestWriteRequest(identity=ident, gpa=0x10, data=b"secret", private=True)
        ),
        pb.GuestSessionRequest(
            read=pb.GuestReadRequest(identity=ident, gpa=0x10, length=6, private=True)
        ),
        # another guest's identity (a forged token) is refused in-band ...
        pb.GuestSessionRequest(
            read=pb.GuestReadRequest(
                identity=handles_pb2.VcpuIdentity(
                    vcpu=ident.vcpu, asid=ident.asid, vmpl=0, token=b"forged" * 4
                ),
                gpa=0x10,
                length=6,
                private=True,
            )
        ),
        # ... and the stream goes on: an unvalidated page faults with #VC
        pb.GuestSessionRequest(
            read=pb.GuestReadRequest(identity=ident, gpa=0x1000, length=4, private=True)
        ),
    ]
    replies = []
    for op in ops:
        await session.write(op)
        replies.append(await session.read())
    await session.done_writing()
    assert [r.WhichOneof("result") for r in replies] == [
        "pvalidate_batch",
        "write",
        "read",
        "error",
        "read",
    ]
    assert replies[0].pvalidate_batch.codes == bytes(1)  # one PVALIDATE, code 0
    assert replies[2].read.data == b"secret"
    assert replies[3].error.reason == "BAD_VCPU_IDENTITY"
    assert replies[3].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert replies[4].read.fault.vc


@pytest.mark.rpc("snp.rmp.v1.RmpService/HostCopy", "ok", "error")
async def test_host_copy_reads_freely_and_writes_through_the_policy(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    pfns, _ident = await guest_setup(stub, pages=1)  # one guest-assigned page
    src, dst = await alloc(stub, 2)
    await stub.HostWrite(
        pb.HostWriteRequest(
            spa=src << 12, data=b"header..body", origin=pb.ACCESS_ORIGIN_KERNEL, writer="t"
        ),
        metadata=HOST,
    )
    r = await stub.HostCopy(
        pb.HostCopyRequest(
            src_spa=src << 12,
            dst_spa=dst << 12,
            length=4096,
            peek=6,
            origin=pb.ACCESS_ORIGIN_KERNEL,
            writer="t",
        ),
        metadata=HOST,
    )
    assert r.head == b"header" and r.write.outcome == pb.VIOLATION_OUTCOME_NONE
    got = await stub.HostRead(pb.HostReadRequest(spa=dst << 12, length=12), metadata=HOST)
    assert got.data == b"header..body"
    # into a guest-assigned page, from user mode, under gmem: refused, nothing written
    before = await stub.HostRead(pb.HostReadRequest(spa=pfns[0] << 12, length=64), metadata=HOST)
    r = await stub.HostCopy(
        pb.HostCopyRequest(
            src_spa=src << 12,
            dst_spa=pfns[0] << 12,
            length=64,
            origin=pb.ACCESS_ORIGIN_USER,
            writer="t",
        ),
        metadata=HOST,
    )
    assert r.write.outcome == pb.VIOLATION_OUTCOME_REFUSED
    after = await stub.HostRead(pb.HostReadRequest(spa=pfns[0] << 12, length=64), metadata=HOST)
    assert after.data == before.data
    for bad in (
        {"length": 0},
        {"length": 4097},
        {"length": 16, "peek": 32},
        {"length": 16, "origin": pb.ACCESS_ORIGIN_UNSPECIFIED},
    ):
        fields = {"origin": pb.ACCESS_ORIGIN_KERNEL, "writer": "t", **bad}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.HostCopy(
                pb.HostCopyRequest(src_spa=src << 12, dst_spa=dst << 12, **fields),
                metadata=HOST,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    got = await stub.HostRead(pb.HostReadRequest(spa=dst << 12, length=12), metadata=HOST)
    assert got.data == b"header..body"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.HostCopy(pb.HostCopyRequest(src_spa=src << 12, dst_spa=dst << 12, length=8))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # host only


@pytest.mark.rpc("snp.rmp.v1.RmpService/HostSession", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/HostSession", "error")
async def test_host_sequence_runs_in_order_and_stops_at_the_first_failure(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    a, b = await alloc(stub, 2)

    def write(pfn: int, data: bytes) -> pb.HostSessionRequest:
        return pb.HostSessionRequest(
            write=pb.HostWriteRequest(
                spa=pfn << 12, data=data, origin=pb.ACCESS_ORIGIN_KERNEL, writer="t"
            )
        )

    def update(pfn: int, misaligned: bool = False) -> pb.HostSessionRequest:
        entry = struct.pack("<QQBBBBI", pfn << 12 | misaligned, 0, 1, 0, 0, 0, ASID)
        return pb.HostSessionRequest(rmp_update_batch=pb.RmpUpdateBatchRequest(entries=entry))

    async def sequence(*ops: pb.HostSessionRequest) -> list[pb.HostSessionResponse]:
        session = stub.HostSession(metadata=HOST)
        await session.write(pb.HostSessionRequest(sequence=pb.HostSequenceRequest(ops=list(ops))))
        reply = await session.read()
        await session.done_writing()
        if reply.WhichOneof("result") == "error":
            return [reply]
        return list(reply.sequence.results)

    async def peek(pfn: int) -> bytes:
        r = await stub.HostRead(pb.HostReadRequest(spa=pfn << 12, length=4), metadata=HOST)
        return bytes(r.data)

    # all run, in order: the second write wins
    got = await sequence(write(a, b"one!"), update(b), write(a, b"two!"))
    assert [r.WhichOneof("result") for r in got] == ["write", "rmp_update_batch", "write"]
    assert await peek(a) == b"two!"
    # an RMPUPDATE batch with a failing entry stops the sequence: the write after it never runs
    got = await sequence(update(b, misaligned=True), write(a, b"3333"))
    assert len(got) == 1 and list(got[0].rmp_update_batch.codes) == [1]
    assert await peek(a) == b"two!"
    # an op that fails with an error stops it too, and the error is the last result
    bad_origin = pb.HostSessionRequest(write=pb.HostWriteRequest(spa=a << 12, data=b"x"))
    got = await sequence(write(a, b"ok.."), bad_origin, write(a, b"4444"))
    assert [r.WhichOneof("result") for r in got] == ["write", "error"]
    assert got[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert await peek(a) == b"ok.."
    # malformed sequences are refused before any op runs
    nested = pb.HostSessionRequest(sequence=pb.HostSequenceRequest(ops=[write(a, b"5555")]))
    for ops in (
        [],
        [write(a, b"6666")] * 9,
        [write(a, b"7777"), nested],
        [write(a, b"8888"), pb.HostSessionRequest()],
    ):
        got = await sequence(*ops)
        assert got[0].WhichOneof("result") == "error", ops
        assert got[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert await peek(a) == b"ok.."


@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareWbinvdIndicator", "ok")
@pytest.mark.rpc("snp.rmp.v1.RmpService/Wbinvd", "ok", "error")
async def test_wbinvd_sets_the_indicator_the_firmware_reads_and_clears(
    stub: rmp_pb2_grpc.RmpServiceStub,
) -> None:
    """WBINVD on every core sets the WBINVD indicator; SNP_DECOMMISSION clears it through the
    firmware's read-and-clear. KERNEL: arch/x86/kvm/svm/sev.c sev_flush_asids() ("DEACTIVATE
    will clear the WBINVD indicator causing DF_FLUSH to fail")."""

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Wbinvd(pb.WbinvdRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def indicator(clear: bool) -> bool:
        r = await stub.FirmwareWbinvdIndicator(
            pb.FirmwareWbinvdIndicatorRequest(clear=clear), metadata=HOST
        )
        return r.set

    assert await indicator(clear=False)  # nothing deactivated since boot
    assert await indicator(clear=True)  # read, then cleared
    assert not await indicator(clear=False)
    await stub.Wbinvd(pb.WbinvdRequest(), metadata=HOST)
    assert await indicator(clear=False)
