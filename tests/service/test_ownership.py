"""Who may act on a VM: its creator (holding the token CreateVm returned) or the host; and a
guest agent's API is its owner's alone. Every refusal leaves the VM as it was."""

from __future__ import annotations

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2 as pb
from snpemu.runtime.channels import owner_channel
from snpemu.runtime.credentials import vmm_credential
from snpemu.runtime.status import error_info

from tests.service.host_stack import CRED, HOST, Stack, agent
from tests.service.test_rpc_netd import refused

HEADER = "x-snpemu-host-credential"


def vmm(guest: str) -> tuple[tuple[str, str], ...]:
    return ((HEADER, vmm_credential(CRED, guest)),)


def config() -> pb.VmConfig:
    return pb.VmConfig(memory_bytes=64 << 20, vcpus=1)


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/GetVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/DestroyVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetGuestRequestThrottle", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/LaunchVm", "error")
async def test_only_the_creator_or_the_host_acts_on_a_vm(stack: Stack) -> None:
    mine = (await stack.kvm.CreateVm(pb.CreateVmRequest(config=config()), metadata=vmm("a"))).vm
    assert len(mine.token) == 32
    theirs = (await stack.kvm.CreateVm(pb.CreateVmRequest(config=config()), metadata=vmm("b"))).vm
    assert mine.token != theirs.token

    # the id alone is no handle: ids are public (ListVms shows them, never a token)
    listed = (await stack.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
    assert {v.vm.id for v in listed} == {mine.id, theirs.id}
    assert all(v.vm.token == b"" for v in listed)
    bare = handles_pb2.VmHandle(id=theirs.id)
    forged = handles_pb2.VmHandle(id=theirs.id, token=mine.token)
    for handle, reason in ((bare, "VM_TOKEN_MISSING"), (forged, "VM_TOKEN_WRONG")):
        for call in (
            stack.kvm.DestroyVm(pb.DestroyVmRequest(vm=handle), metadata=vmm("a")),
            stack.kvm.LaunchVm(pb.LaunchVmRequest(vm=handle), metadata=vmm("a")),
            stack.kvm.GetVm(pb.GetVmRequest(vm=handle), metadata=vmm("a")),
            stack.kvm.SetGuestRequestThrottle(
                pb.SetGuestRequestThrottleRequest(
                    vm=handle, throttle=pb.GuestRequestThrottle(interval_ms=3_600_000, burst=1)
                ),
                metadata=vmm("a"),
            ),
        ):
            await refused(call, grpc.StatusCode.PERMISSION_DENIED, reason)
    # even the host may not present a forged handle, though it may name a VM by id alone
    await refused(
        stack.kvm.DestroyVm(pb.DestroyVmRequest(vm=forged), metadata=HOST),
        grpc.StatusCode.PERMISSION_DENIED,
        "VM_TOKEN_WRONG",
    )
    info = (await stack.kvm.GetVm(pb.GetVmRequest(vm=bare), metadata=HOST)).vm
    assert info.state == pb.VM_STATE_CREATED and info.vm.token == b""

    # a VMM credential opens only its own guest's name, and never a host-only RPC
    wrong = ((HEADER, "b." + vmm_credential(CRED, "a").split(".", 1)[1]),)
    await refused(
        stack.kvm.CreateVm(pb.CreateVmRequest(config=config()), metadata=wrong),
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_CREDENTIAL_WRONG",
    )
    await refused(
        stack.kvm.ListVms(pb.ListVmsRequest(), metadata=vmm("a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_CREDENTIAL_WRONG",
    )

    # a token handed to another guest's VMM opens nothing for it
    await refused(
        stack.kvm.GetVm(pb.GetVmRequest(vm=theirs), metadata=vmm("a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "VM_NOT_YOURS",
    )
    # the creator's own handle works, and nothing above changed the other VM
    got = (await stack.kvm.GetVm(pb.GetVmRequest(vm=mine), metadata=vmm("a"))).vm
    assert got.state == pb.VM_STATE_CREATED
    await stack.kvm.DestroyVm(pb.DestroyVmRequest(vm=mine), metadata=vmm("a"))
    left = (await stack.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
    assert [(v.vm.id, v.state) for v in left] == [(theirs.id, pb.VM_STATE_CREATED)]


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "error")
async def test_create_vm_takes_the_throttle_set_throttle_takes(stack: Stack) -> None:
    for bad in (
        pb.GuestRequestThrottle(interval_ms=3_600_001, burst=1),
        pb.GuestRequestThrottle(interval_ms=1000, burst=1001),
        pb.GuestRequestThrottle(interval_ms=1000, burst=0),
    ):
        cfg = config()
        cfg.throttle.CopyFrom(bad)
        await refused(
            stack.kvm.CreateVm(pb.CreateVmRequest(config=cfg), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "THROTTLE_OUT_OF_RANGE",
        )
    assert not (await stack.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms


@pytest.mark.rpc("snp.guest.v1.GuestService/GetStatus", "ok", "error")
async def test_a_guest_agents_api_is_its_owners(stack: Stack) -> None:
    async with agent(stack, "guest-o", owner="owner-secret-0123") as (stub, rt):
        # a channel that sends the owner credential on every call (the lab and scripts use it)
        async with owner_channel(rt.address, "owner-secret-0123") as ch:
            got = await guest_pb2_grpc.GuestServiceStub(ch).GetStatus(guest_pb2.GetStatusRequest())
            assert got.vm_id
        owner = (("x-snpemu-owner-credential", "owner-secret-0123"),)
        status = await stub.GetStatus(guest_pb2.GetStatusRequest(), metadata=owner)
        assert status.vm_id
        await refused(
            stub.GetStatus(guest_pb2.GetStatusRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "OWNER_CREDENTIAL_MISSING",
        )
        # the host credential is no key to a guest's memory
        for md in (HOST, (("x-snpemu-owner-credential", CRED),)):
            await refused(
                stub.ReadMemory(guest_pb2.ReadMemoryRequest(gpa=0, length=16), metadata=md),
                grpc.StatusCode.UNAUTHENTICATED
                if md is HOST
                else grpc.StatusCode.PERMISSION_DENIED,
                "OWNER_CREDENTIAL_MISSING" if md is HOST else "OWNER_CREDENTIAL_WRONG",
            )


async def test_the_ioctl_rpcs_take_only_their_creators_handles(stack: Stack) -> None:
    """Each ioctl RPC refuses another VMM's VM (as a VM fd works only in its process), and a
    guest_memfd fd is its maker's: another VMM naming it gets EBADF, as an fd number means
    nothing in another process (KERNEL: virt/kvm/guest_memfd.c kvm_gmem_bind(): fget() fails)."""
    a = (await stack.kvm.CreateVm(pb.CreateVmRequest(), metadata=vmm("a"))).vm
    b = (await stack.kvm.CreateVm(pb.CreateVmRequest(), metadata=vmm("b"))).vm
    for vm, who in ((a, "a"), (b, "b")):
        await stack.kvm.SnpInit2(pb.SnpInit2Request(vm=vm), metadata=vmm(who))
    fd_b = (
        await stack.kvm.CreateGuestMemfd(
            pb.CreateGuestMemfdRequest(vm=b, size=1 << 20), metadata=vmm("b")
        )
    ).fd
    calls = {
        "SnpInit2": lambda h: stack.kvm.SnpInit2(pb.SnpInit2Request(vm=h), metadata=vmm("a")),
        "CreateGuestMemfd": lambda h: stack.kvm.CreateGuestMemfd(
            pb.CreateGuestMemfdRequest(vm=h, size=4096), metadata=vmm("a")
        ),
        "SetMemoryRegion": lambda h: stack.kvm.SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=h, flags=4, memory_size=4096, guest_memfd=fd_b),
            metadata=vmm("a"),
        ),
        "SetMemoryAttributes": lambda h: stack.kvm.SetMemoryAttributes(
            pb.SetMemoryAttributesRequest(vm=h, size=4096, attributes=8), metadata=vmm("a")
        ),
        "CreateVcpu": lambda h: stack.kvm.CreateVcpu(pb.CreateVcpuRequest(vm=h), metadata=vmm("a")),
        "SnpLaunchStart": lambda h: stack.kvm.SnpLaunchStart(
            pb.SnpLaunchStartRequest(vm=h, policy=0x30000), metadata=vmm("a")
        ),
        "SnpLaunchUpdate": lambda h: stack.kvm.SnpLaunchUpdate(
            pb.SnpLaunchUpdateRequest(vm=h, len=4096, type=3), metadata=vmm("a")
        ),
        "SnpLaunchFinish": lambda h: stack.kvm.SnpLaunchFinish(
            pb.SnpLaunchFinishRequest(vm=h), metadata=vmm("a")
        ),
    }
    before = (await stack.kvm.GetVm(pb.GetVmRequest(vm=b), metadata=HOST)).vm
    for name, call in calls.items():
        for handle, reason in (
            (handles_pb2.VmHandle(id=b.id), "VM_TOKEN_MISSING"),
            (b, "VM_NOT_YOURS"),
        ):
            try:
                await refused(call(handle), grpc.StatusCode.PERMISSION_DENIED, reason)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
    assert (await stack.kvm.GetVm(pb.GetVmRequest(vm=b), metadata=HOST)).vm == before
    # b's guest_memfd is not an fd of a's, even on a's own VM
    await refused(
        stack.kvm.SetMemoryRegion(
            pb.SetMemoryRegionRequest(
                vm=a, flags=4, memory_size=1 << 20, userspace_addr=1 << 40, guest_memfd=fd_b
            ),
            metadata=vmm("a"),
        ),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    # and b binds it
    await stack.kvm.SetMemoryRegion(
        pb.SetMemoryRegionRequest(
            vm=b, flags=4, memory_size=1 << 20, userspace_addr=1 << 40, guest_memfd=fd_b
        ),
        metadata=vmm("b"),
    )


async def test_a_vmm_holds_at_most_rlimit_nofile_fds(stack: Stack) -> None:
    """Each VM, vCPU and guest_memfd a VMM makes is an fd of its process, and a process holds
    at most INR_OPEN_CUR (1024: include/uapi/linux/fs.h, the default RLIMIT_NOFILE) of them:
    the next one is EMFILE (fs/file.c alloc_fd()) and makes nothing. Another VMM, and the
    host, are not held back by it."""
    kvm = stack.kvm
    a = vmm("a")
    vms = [(await kvm.CreateVm(pb.CreateVmRequest(), metadata=a)).vm for _ in range(1023)]
    await kvm.CreateGuestMemfd(pb.CreateGuestMemfdRequest(vm=vms[0], size=1 << 20), metadata=a)
    before = len((await kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms)
    for call in (
        kvm.CreateVm(pb.CreateVmRequest(), metadata=a),
        kvm.CreateGuestMemfd(pb.CreateGuestMemfdRequest(vm=vms[0], size=1 << 20), metadata=a),
        kvm.CreateVm(pb.CreateVmRequest(config=config()), metadata=a),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(info.value).metadata["errno"] == "EMFILE"  # type: ignore[union-attr]
    assert len((await kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms) == before
    await kvm.CreateVm(pb.CreateVmRequest(), metadata=vmm("b"))
    await kvm.CreateVm(pb.CreateVmRequest(), metadata=HOST)
    # closing one (DestroyVm) makes room for the next
    await kvm.DestroyVm(pb.DestroyVmRequest(vm=vms[-1]), metadata=a)
    await kvm.CreateVm(pb.CreateVmRequest(), metadata=a)
