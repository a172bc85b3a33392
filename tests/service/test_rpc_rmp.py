"""rmp's RPCs through gRPC where no other test takes them: the firmware's own access, keys,
identities, frames, the violation policy, and each call refusing a wrong request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu import rmp
from snpemu.rmp.options import RmpOptions
from snpemu.rmp.reasons import RmpReason
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime

from tests.service.test_rpc_netd import refused

CRED = "rpc-rmp-credential-0123456789"
HOST = (("x-snpemu-host-credential", CRED),)
Stub = rmp_pb2_grpc.RmpServiceStub
# An AES-256-XTS key: two different 32-byte halves (IEEE 1619-2018 5.1 requires Key1 != Key2)
KEY = bytes(range(64))


@contextlib.asynccontextmanager
async def rmp_stub(policy: str = "gmem") -> AsyncIterator[Stub]:
    """An rmp service of 64 MiB with violation policy `policy`, reached through its stub."""
    config = ServiceConfig.from_env(
        "rmp",
        {
            "SNPEMU_GRPC_PORT": "0",
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_HOST_CREDENTIAL": CRED,
            "SNPEMU_SHUTDOWN_GRACE_S": "0",
        },
    )
    options = RmpOptions.from_env({"SNPEMU_RMP_MEMORY": "64M", "SNPEMU_RMP_POLICY": policy})
    runtime = ServiceRuntime(rmp.SPEC, config, options)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            yield Stub(channel)
    finally:
        await runtime.stop()


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    """rmp_stub() with the gmem policy."""
    async with rmp_stub() as served:
        yield served


def ident(asid: int = 5, vm: str = "vm-r", token: bytes = b"t" * 32) -> handles_pb2.VcpuIdentity:
    return handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=vm), vcpu_id=0),
        asid=asid,
        token=token,
    )


async def alloc(stub: Stub, count: int = 1, placement: int = pb.PLACEMENT_ANY) -> list[int]:
    r = await stub.AllocatePages(
        pb.AllocatePagesRequest(count=count, placement=placement), metadata=HOST
    )
    return list(r.pfns)


async def state(stub: Stub, pfn: int) -> pb.RmpEntry:
    return (await stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=pfn), metadata=HOST)).entry


async def make(stub: Stub, pfn: int, **fields: Any) -> None:
    fields.setdefault("page_size", types_pb2.PAGE_SIZE_4K)
    r = await stub.RmpUpdate(
        pb.RmpUpdateRequest(spa=pfn << 12, state=pb.RmpState(**fields)), metadata=HOST
    )
    assert r.result == pb.RMP_RESULT_SUCCESS


async def unauthenticated(call: Any) -> None:
    await refused(call, grpc.StatusCode.UNAUTHENTICATED, "HOST_CREDENTIAL_MISSING")


@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareWrite", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareRead", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareTransition", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/FirmwareWbinvdIndicator", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/InstallMemoryKey", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RemoveMemoryKey", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/HostRead", "ok", "error")
async def test_firmware_access_and_memory_keys(stub: Stub) -> None:
    plain, enc = await alloc(stub, 2)
    for pfn in (plain, enc):
        await make(stub, pfn, assigned=True, immutable=True)  # firmware pages
    data = b"firmware data".ljust(64, b"!")
    fw = [types_pb2.PAGE_STATE_FIRMWARE]
    await stub.FirmwareWrite(
        pb.FirmwareWriteRequest(spa=plain << 12, data=data, expect_states=fw), metadata=HOST
    )
    got = await stub.FirmwareRead(
        pb.FirmwareReadRequest(spa=plain << 12, length=64, expect_states=fw), metadata=HOST
    )
    assert got.data == data
    host = await stub.HostRead(pb.HostReadRequest(spa=plain << 12, length=64), metadata=HOST)
    assert host.data == data  # no key: the bytes as written
    # with a guest's key the memory holds ciphertext, which only that key reads back
    await stub.InstallMemoryKey(pb.InstallMemoryKeyRequest(asid=5, key=KEY), metadata=HOST)
    await stub.FirmwareWrite(
        pb.FirmwareWriteRequest(spa=enc << 12, data=data, asid=5), metadata=HOST
    )
    host = await stub.HostRead(pb.HostReadRequest(spa=enc << 12, length=64), metadata=HOST)
    assert host.data != data
    got = await stub.FirmwareRead(
        pb.FirmwareReadRequest(spa=enc << 12, length=64, asid=5), metadata=HOST
    )
    assert got.data == data
    await stub.RemoveMemoryKey(pb.RemoveMemoryKeyRequest(asid=5), metadata=HOST)
    await refused(  # removed: a second removal finds no key
        stub.RemoveMemoryKey(pb.RemoveMemoryKeyRequest(asid=5), metadata=HOST),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_KEY",
    )
    for bad, why in (
        (pb.InstallMemoryKeyRequest(asid=5, key=KEY[:32]), RmpReason.INVALID_ARGUMENT),
        (pb.InstallMemoryKeyRequest(asid=5, key=bytes(64)), RmpReason.INVALID_ARGUMENT),  # K1==K2
        (pb.InstallMemoryKeyRequest(asid=0, key=KEY), RmpReason.OUT_OF_RANGE),
    ):
        await refused(
            stub.InstallMemoryKey(bad, metadata=HOST), grpc.StatusCode.INVALID_ARGUMENT, why
        )

    # the state checks go with the access
    message = await refused(
        stub.FirmwareRead(
            pb.FirmwareReadRequest(
                spa=plain << 12, length=8, expect_states=[types_pb2.PAGE_STATE_CONTEXT]
            ),
            metadata=HOST,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAGE_STATE_MISMATCH",
    )
    assert "FIRMWARE" in message
    await refused(
        stub.FirmwareRead(pb.FirmwareReadRequest(spa=plain << 12, length=0), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.OUT_OF_RANGE,
    )
    await refused(
        stub.FirmwareWrite(pb.FirmwareWriteRequest(spa=plain << 12), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await refused(
        stub.HostRead(pb.HostReadRequest(spa=plain << 12, length=0), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.OUT_OF_RANGE,
    )

    # SNP ABI ch. 5 page states: Firmware -> Context (GCTX_CREATE), Context -> Reclaim
    t = await stub.FirmwareTransition(
        pb.FirmwareTransitionRequest(spas=[plain << 12], op=pb.FIRMWARE_OP_CONTEXT),
        metadata=HOST,
    )
    assert list(t.changed) == [True]
    assert (await state(stub, plain)).state == types_pb2.PAGE_STATE_CONTEXT
    (hv,) = await alloc(stub)
    t = await stub.FirmwareTransition(  # a hypervisor page is not a firmware page
        pb.FirmwareTransitionRequest(spas=[hv << 12], op=pb.FIRMWARE_OP_CONTEXT),
        metadata=HOST,
    )
    assert list(t.changed) == [False]
    assert (await state(stub, hv)).state == types_pb2.PAGE_STATE_HYPERVISOR
    t = await stub.FirmwareTransition(
        pb.FirmwareTransitionRequest(spas=[plain << 12], op=pb.FIRMWARE_OP_RECLAIM),
        metadata=HOST,
    )
    assert list(t.changed) == [True]
    assert (await state(stub, plain)).state == types_pb2.PAGE_STATE_RECLAIM
    await refused(
        stub.FirmwareTransition(pb.FirmwareTransitionRequest(spas=[hv << 12]), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await unauthenticated(stub.FirmwareWbinvdIndicator(pb.FirmwareWbinvdIndicatorRequest()))


@pytest.mark.rpc("snp.rmp.v1.RmpService/RegisterVcpuIdentity", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RevokeVcpuIdentity", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/GuestWrite", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/Pvalidate", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/PvalidateBatch", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RmpAdjust", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/UpdateNestedPageTable", "error")
async def test_guest_instructions_need_a_registered_identity(stub: Stub) -> None:
    (pfn,) = await alloc(stub)
    await stub.UpdateNestedPageTable(
        pb.UpdateNestedPageTableRequest(
            asid=5, map=[pb.NptMapping(gpa=0, first_pfn=pfn, npages=1)]
        ),
        metadata=HOST,
    )
    await refused(
        stub.UpdateNestedPageTable(
            pb.UpdateNestedPageTableRequest(
                asid=0, map=[pb.NptMapping(gpa=0, first_pfn=pfn, npages=1)]
            ),
            metadata=HOST,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.OUT_OF_RANGE,
    )
    me = ident()
    for bad in (ident(token=b"short"), ident(asid=0)):
        await refused(
            stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=bad), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            RmpReason.OUT_OF_RANGE,
        )
    await stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=me), metadata=HOST)
    await refused(
        stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=me), metadata=HOST),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_REGISTERED",
    )
    # registered: a shared write goes through
    w = await stub.GuestWrite(pb.GuestWriteRequest(identity=me, gpa=0, data=b"hi"))
    assert not w.HasField("fault")
    # a wrong token, and a missing VM id
    forged = ident(token=b"f" * 32)
    k4 = types_pb2.PAGE_SIZE_4K
    calls = [
        stub.GuestWrite(pb.GuestWriteRequest(identity=forged, gpa=0, data=b"x")),
        stub.Pvalidate(pb.PvalidateRequest(identity=forged, gpa=0, page_size=k4)),
        stub.PvalidateBatch(pb.PvalidateBatchRequest(identity=forged, gpas=[0])),
        stub.RmpAdjust(pb.RmpAdjustRequest(identity=forged, gpa=0, page_size=k4)),
    ]
    for call in calls:
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "BAD_VCPU_IDENTITY")
    await refused(
        stub.Pvalidate(pb.PvalidateRequest(identity=me, gpa=0)),  # no page size
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await refused(
        stub.PvalidateBatch(pb.PvalidateBatchRequest(identity=ident(vm=""), gpas=[0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await stub.RevokeVcpuIdentity(pb.RevokeVcpuIdentityRequest(identity=me), metadata=HOST)
    # revoked: the same identity is refused now
    await refused(
        stub.GuestWrite(pb.GuestWriteRequest(identity=me, gpa=0, data=b"x")),
        grpc.StatusCode.PERMISSION_DENIED,
        "BAD_VCPU_IDENTITY",
    )
    await refused(
        stub.RevokeVcpuIdentity(pb.RevokeVcpuIdentityRequest(identity=me), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )


@pytest.mark.rpc("snp.rmp.v1.RmpService/FreePages", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/AllocatePages", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/LeakPages", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/ListLeakedPages", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/ListHostMaps", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/ListRmpEntries", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/RmpUpdate", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/HostWrite", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/Psmash", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/GetPlatformInfo", "ok")
async def test_frames_and_the_table(stub: Stub) -> None:

    async def free_pages() -> int:
        r = await stub.GetPlatformInfo(pb.GetPlatformInfoRequest(), metadata=HOST)
        return int(r.free_pages)

    before = await free_pages()
    a, b = await alloc(stub, 2)
    assert await free_pages() == before - 2
    await make(stub, b, assigned=True, asid=3, gpa=0x1000)
    await refused(  # an assigned page goes back only once it is shared again
        stub.FreePages(pb.FreePagesRequest(pfns=[b]), metadata=HOST),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAGE_NOT_HYPERVISOR",
    )
    assert await free_pages() == before - 2
    await stub.FreePages(pb.FreePagesRequest(pfns=[a]), metadata=HOST)
    assert await free_pages() == before - 1
    await refused(
        stub.AllocatePages(pb.AllocatePagesRequest(count=1), metadata=HOST),  # no placement
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )

    listed = await stub.ListRmpEntries(
        pb.ListRmpEntriesRequest(first_pfn=b, count=2), metadata=HOST
    )
    assert [(e.pfn, e.assigned, e.asid, e.gpa) for e in listed.entries] == [
        (b, True, 3, 0x1000),
        (b + 1, False, 0, 0),
    ]
    for bad in (
        pb.ListRmpEntriesRequest(first_pfn=b, count=0),
        pb.ListRmpEntriesRequest(first_pfn=b, count=4097),
    ):
        await refused(
            stub.ListRmpEntries(bad, metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            RmpReason.OUT_OF_RANGE,
        )
    await refused(
        stub.RmpUpdate(
            pb.RmpUpdateRequest(spa=b << 12, state=pb.RmpState(assigned=True)),  # no size
            metadata=HOST,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await refused(
        stub.HostWrite(pb.HostWriteRequest(spa=a << 12, data=b"x"), metadata=HOST),  # origin
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await refused(
        stub.LeakPages(pb.LeakPagesRequest(pfns=[a]), metadata=HOST),  # no reason
        grpc.StatusCode.INVALID_ARGUMENT,
        RmpReason.MISSING_FIELD,
    )
    await unauthenticated(stub.ListLeakedPages(pb.ListLeakedPagesRequest()))
    await unauthenticated(stub.ListHostMaps(pb.ListHostMapsRequest()))

    # PSMASH: one 2 MiB entry becomes 512 4 KiB entries with consecutive GPAs
    big = await alloc(stub, 512, pb.PLACEMENT_ALIGNED_2M)
    await make(stub, big[0], assigned=True, asid=4, gpa=0x400000, page_size=types_pb2.PAGE_SIZE_2M)
    s = await stub.Psmash(pb.PsmashRequest(spa=big[0] << 12), metadata=HOST)
    assert (s.result, s.eax) == (pb.RMP_RESULT_SUCCESS, 0)
    e = await state(stub, big[0] + 7)
    assert (e.page_size, e.gpa, e.asid) == (types_pb2.PAGE_SIZE_4K, 0x407000, 4)
    await unauthenticated(stub.Psmash(pb.PsmashRequest(spa=big[0] << 12)))


@pytest.mark.rpc("snp.rmp.v1.RmpService/GetViolationPolicy", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/SetViolationPolicy", "ok", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/WatchMmuNotifications", "error")
@pytest.mark.rpc("snp.rmp.v1.RmpService/AcknowledgeMmuNotification", "error")
async def test_violation_policy_and_notifications() -> None:
    async with rmp_stub(policy="convert") as stub:
        got = await stub.GetViolationPolicy(pb.GetViolationPolicyRequest(), metadata=HOST)
        assert got.policy == pb.VIOLATION_POLICY_CONVERT  # as configured below
        await stub.SetViolationPolicy(
            pb.SetViolationPolicyRequest(policy=pb.VIOLATION_POLICY_GMEM), metadata=HOST
        )
        got = await stub.GetViolationPolicy(pb.GetViolationPolicyRequest(), metadata=HOST)
        assert got.policy == pb.VIOLATION_POLICY_GMEM
        await refused(
            stub.SetViolationPolicy(pb.SetViolationPolicyRequest(), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            RmpReason.MISSING_FIELD,
        )
        got = await stub.GetViolationPolicy(pb.GetViolationPolicyRequest(), metadata=HOST)
        assert got.policy == pb.VIOLATION_POLICY_GMEM  # the refused change changed nothing
        await unauthenticated(stub.GetViolationPolicy(pb.GetViolationPolicyRequest()))
        await unauthenticated(stub.WatchMmuNotifications(pb.WatchMmuNotificationsRequest()).read())
        await refused(
            stub.AcknowledgeMmuNotification(
                pb.AcknowledgeMmuNotificationRequest(sequence=12345), metadata=HOST
            ),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
