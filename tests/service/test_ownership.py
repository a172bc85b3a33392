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
