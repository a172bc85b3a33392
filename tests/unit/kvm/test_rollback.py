"""A failed CreateVm or LaunchVm leaves nothing behind (kvm/undo.py, kvm/launch.py).

Each test fails one port call of a create or a launch, then checks what the fakes hold:
no frame handed out and not given back, no RMP entry, no NPT mapping, no vCPU identity, no
guest context or activated ASID, the ASID back in the free list; and that the same call then
succeeds. A launch that fails after SNP_ACTIVATE keeps its context (KERNEL:
arch/x86/kvm/svm/sev.c snp_launch_start() refuses a second one): the VM refuses a second
launch, and DestroyVm gives everything back (pages SNP_LAUNCH_UPDATE made pre-guest are
reclaimed first; one that will not come back is leaked, never lost).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from snpemu.errors import InvalidArgument, Unavailable, WrongState
from snpemu.kvm.config import VmConfig
from snpemu.kvm.machine import Kvm
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.vm import VmState

from tests.unit.kvm.fakes import FakePsp, FakeRmp, Faults, peer_error

CONFIG = VmConfig(memory_bytes=16 << 20, vcpus=2)


async def host() -> tuple[Kvm, FakeRmp, FakePsp, Faults]:
    faults = Faults()
    rmp = FakeRmp(faults)
    psp = FakePsp(faults, rmp)
    kvm = Kvm(rmp, psp)
    (await kvm.bring_up())
    assert kvm.snp_enabled
    return kvm, rmp, psp, faults


def held(kvm: Kvm, rmp: FakeRmp, psp: FakePsp) -> dict[str, Any]:
    """Everything a VM can hold, host-wide (a leaked page keeps its RMP entry, never reused)."""
    return {
        "frames": set(rmp.owned()),
        "rmp entries": {p: e.state for p, e in rmp.entries.items() if p not in rmp.leaked},
        "npt": {vm: dict(m) for vm, m in rmp.npt.items()},
        "identities": set(rmp.identities),
        "contexts": set(psp.contexts),
        "active asids": set(psp.active_asids),
        "free asids": sorted(kvm.free_asids),
        "vms": set(kvm.vms),
    }


async def trace(step: str) -> list[tuple[str, int]]:
    """The port calls of a create ("create") or a launch ("launch") that succeeds."""
    kvm, _, _, faults = await host()
    if step == "create":
        faults.arm("none")
        (await kvm.create_vm(CONFIG))
        return list(faults.trace)
    vm = await kvm.create_vm(CONFIG)
    faults.arm("none")
    (await kvm.launch_vm(vm))
    return list(faults.trace)


def steps(calls: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The first and the last call of each port method (a failure anywhere in a run of
    repeated calls is undone as either end of it is)."""
    last: dict[str, int] = {}
    for name, nth in calls:
        last[name] = nth
    out = []
    for name, nth in calls:
        if nth == 1 or nth == last[name]:
            out.append((name, nth))
    return out


CREATE = asyncio.run(trace("create"))  # at collection, for the parametrisation
LAUNCH = asyncio.run(trace("launch"))
# launch_start() is all or nothing: up to SNP_ACTIVATE a failure leaves the VM as created
ACTIVATED = LAUNCH.index(("psp.activate", 1))


def test_the_traced_steps_are_what_create_and_launch_do() -> None:
    """The parametrizations below cover every kind of call create and launch make."""
    # guest RAM is backed and mapped as it is first used (kvm/faultin.py): not at create;
    # KVM_SEV_INIT2 takes the guest-request pages, a hypervisor page and a firmware page
    # (KERNEL: arch/x86/kvm/svm/sev.c __sev_guest_init() -> snp_guest_req_init())
    assert [n for n, _ in CREATE] == [
        "rmp.allocate",
        "rmp.allocate",
        "rmp.rmpupdate",
        "rmp.register_identity",
        "rmp.register_identity",
    ]
    assert [n for n, _ in LAUNCH[: ACTIVATED + 1]] == [
        "rmp.allocate",
        "rmp.rmpupdate",
        "psp.gctx_create",
        "psp.launch_start",
        "psp.activate",
    ]
    assert {n for n, _ in LAUNCH[ACTIVATED + 1 :]} >= {
        "rmp.allocate",
        "rmp.update_npt",
        "rmp.read_entries",
        "rmp.host_write",
        "psp.launch_update",
        "psp.launch_finish",
        "rmp.rmpupdate",
    }


@pytest.mark.parametrize("step", steps(CREATE), ids=lambda s: f"{s[0]}#{s[1]}")
async def test_a_failed_create_leaves_nothing_and_a_retry_succeeds(step: tuple[str, int]) -> None:
    kvm, rmp, psp, faults = await host()
    before = held(kvm, rmp, psp)
    asids = list(kvm.free_asids)
    faults.arm(*step)
    with pytest.raises(Unavailable, match="injected"):
        (await kvm.create_vm(CONFIG))
    assert held(kvm, rmp, psp) == before
    assert kvm.free_asids == asids  # the next VM gets the same ASID
    faults.disarm()
    vm = await kvm.create_vm(CONFIG)
    assert vm.asid == before["free asids"][0] and len(rmp.identities) == CONFIG.vcpus
    assert (await kvm.destroy_vm(vm)) == 0
    assert held(kvm, rmp, psp) == before


async def test_a_create_refused_by_its_checks_takes_nothing() -> None:
    kvm, rmp, psp, faults = await host()
    before = held(kvm, rmp, psp)
    faults.arm("none")
    with pytest.raises(InvalidArgument):
        (await kvm.create_vm(VmConfig(memory_bytes=16 << 20, vcpus=0)))
    assert faults.trace == [] and held(kvm, rmp, psp) == before


@pytest.mark.parametrize("step", steps(LAUNCH[: ACTIVATED + 1]), ids=lambda s: f"{s[0]}#{s[1]}")
async def test_a_launch_failed_up_to_activate_leaves_the_vm_as_created(
    step: tuple[str, int],
) -> None:
    kvm, rmp, psp, faults = await host()
    booted = held(kvm, rmp, psp)
    vm = await kvm.create_vm(CONFIG)
    created = held(kvm, rmp, psp)
    faults.arm(*step)
    with pytest.raises(Unavailable, match="injected"):
        (await kvm.launch_vm(vm))
    assert (vm.state, vm.gctx) == (VmState.CREATED, 0)
    assert held(kvm, rmp, psp) == created
    assert rmp.leaked == set()
    faults.disarm()
    assert len(await kvm.launch_vm(vm)) == 48 and vm.state == VmState.RUNNING
    assert (await kvm.destroy_vm(vm)) == 0
    assert held(kvm, rmp, psp) == booted


@pytest.mark.parametrize("step", steps(LAUNCH[ACTIVATED + 1 :]), ids=lambda s: f"{s[0]}#{s[1]}")
async def test_a_launch_failed_after_activate_is_only_left_by_destroy(
    step: tuple[str, int],
) -> None:
    kvm, rmp, psp, faults = await host()
    booted = held(kvm, rmp, psp)
    vm = await kvm.create_vm(CONFIG)
    faults.arm(*step)
    with pytest.raises(Unavailable, match="injected"):
        (await kvm.launch_vm(vm))
    assert vm.state == VmState.CREATED and vm.gctx in psp.contexts
    faults.disarm()
    with pytest.raises(WrongState) as again:
        (await kvm.launch_vm(vm))
    assert again.value.reason == KvmReason.LAUNCH_STARTED and faults.trace == []
    # decommissioned, its pre-guest pages are reclaimed (SNP_PAGE_RECLAIM) and come back
    assert await kvm.destroy_vm(vm) == 0
    assert rmp.leaked == set()
    assert held(kvm, rmp, psp) == booted
    # the host launches the next VM
    vm = await kvm.create_vm(CONFIG)
    assert len(await kvm.launch_vm(vm)) == 48


async def test_a_launch_start_the_firmware_refuses_is_its_error_and_leaves_nothing() -> None:
    """POLICY_FAILURE at SNP_LAUNCH_START: the caller sees the firmware's status (as
    KVM returns it in kvm_sev_cmd.error) and the context is decommissioned and freed."""
    kvm, rmp, psp, faults = await host()
    vm = await kvm.create_vm(CONFIG)
    created = held(kvm, rmp, psp)
    faults.arm("psp.launch_start", error=peer_error("POLICY_FAILURE", 0x07))
    with pytest.raises(InvalidArgument) as info:
        (await kvm.launch_vm(vm))
    # KERNEL: sev.c snp_launch_start(): the firmware's failure is -EIO, its status in
    # kvm_sev_cmd.error
    assert (info.value.reason, info.value.metadata) == (
        "POLICY_FAILURE",
        {"fw_status": "0x0007", "errno": "EIO"},
    )
    assert held(kvm, rmp, psp) == created and (vm.state, vm.gctx) == (VmState.CREATED, 0)


async def test_a_failed_bring_up_gives_the_tmr_back() -> None:
    """SEV INIT unreachable: the TMR's firmware pages come back, so that the retried bring-up
    (kvm/__init__.py _startup) does not lose 2 MiB each time."""
    faults = Faults()
    rmp = FakeRmp(faults)
    psp = FakePsp(faults, rmp)
    kvm = Kvm(rmp, psp)
    faults.arm("psp.sev_init")
    with pytest.raises(Unavailable):
        (await kvm.bring_up())
    assert rmp.owned() == set() and rmp.entries == {} and not kvm.snp_enabled
    faults.disarm()
    (await kvm.bring_up())
    assert kvm.snp_enabled and len(rmp.owned()) == 512
