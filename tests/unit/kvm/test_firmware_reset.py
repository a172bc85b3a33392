"""A psp restart is a firmware reset (kvm/firmware_watch.py), and a kvm restart finds what its
predecessor left (kvm/tmr_record.py, kvm/leftovers.py), on the in-memory fakes.

What a reset does to the firmware is what a fresh psp has: no guest contexts, no activated
ASIDs, the SEV state UNINIT (KERNEL: drivers/crypto/ccp/sev-dev.c, the platform is UNINIT until
__sev_platform_init_locked()); the RMP (rmp) keeps every page as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from snpemu.abi.addr import Pfn
from snpemu.abi.platform_status import PlatformState
from snpemu.abi.rmp import PageState
from snpemu.errors import Unavailable
from snpemu.kvm import bringup, leftovers
from snpemu.kvm.config import VmConfig
from snpemu.kvm.firmware_watch import TERM_HOST_FIRMWARE_RESET, follow_firmware
from snpemu.kvm.machine import Kvm
from snpemu.kvm.ports import RmpEntry
from snpemu.kvm.tmr_record import TmrRecord
from snpemu.kvm.vm import VmState

from tests.unit.kvm.fakes import FakePsp, FakeRmp, Faults, peer_error

CONFIG = VmConfig(memory_bytes=16 << 20, vcpus=2)
TMR_PAGES = 512  # 2 MiB: KERNEL: drivers/crypto/ccp/sev-dev.c SEV_TMR_SIZE
HOST_PFNS = 0x20000  # the fake host's memory: 512 MiB


class SizedRmp(FakeRmp):
    """The fake rmp with an end of memory, as ListRmpEntries has (INVALID_ARGUMENT past it)."""

    async def read_entries(
        self, first: Pfn, count: int, *, non_default_only: bool = True
    ) -> list[RmpEntry]:
        if first >= HOST_PFNS:
            raise peer_error("INVALID_ARGUMENT")
        return await super().read_entries(
            first, min(count, HOST_PFNS - first), non_default_only=non_default_only
        )


def reset(psp: FakePsp) -> None:
    """The firmware as a restarted psp has it."""
    psp.state = PlatformState.UNINIT
    psp.contexts.clear()
    psp.active_asids.clear()


async def host(record: TmrRecord | None = None) -> tuple[Kvm, SizedRmp, FakePsp]:
    faults = Faults()
    rmp = SizedRmp(faults)
    psp = FakePsp(faults, rmp)
    kvm = Kvm(rmp, psp)
    await bringup.bring_up(kvm, tmr_record=record)
    assert kvm.snp_enabled
    return kvm, rmp, psp


class Watch:
    """follow_firmware() driven poll by poll: `polls` sleeps, then it is cancelled."""

    def __init__(self, kvm: Kvm, polls: int) -> None:
        self.health: list[bool] = []
        self.polls = polls
        self.before_poll: list[object] = []
        self.kvm = kvm

    async def set_health(self, serving: bool) -> None:
        self.health.append(serving)

    async def sleep(self, _s: float) -> None:
        if self.polls == 0:
            raise asyncio.CancelledError
        self.polls -= 1
        if self.before_poll:
            step = self.before_poll.pop(0)
            if callable(step):
                step()

    async def run(self) -> None:
        with pytest.raises(asyncio.CancelledError):
            await follow_firmware(self.kvm, self.set_health, sleep=self.sleep)


def owned_states(rmp: FakeRmp) -> dict[PageState, int]:
    out: dict[PageState, int] = {}
    for p, e in rmp.entries.items():
        if p not in rmp.leaked:
            out[e.state] = out.get(e.state, 0) + 1
    return out


async def test_a_reset_firmware_is_brought_up_again_and_its_vms_terminate() -> None:
    kvm, rmp, psp = await host()
    vm = await kvm.create_vm(CONFIG)
    await kvm.launch_vm(vm)
    old_tmr = list(kvm.tmr_pfns)
    watch = Watch(kvm, polls=3)
    watch.before_poll = [lambda: None, lambda: reset(psp)]
    await watch.run()
    # NOT_SERVING while it recovered, SERVING after
    assert watch.health == [False, True]
    assert kvm.snp_enabled and psp.state == PlatformState.INIT
    assert vm.state == VmState.TERMINATED
    assert vm.term_reason == (0xF, TERM_HOST_FIRMWARE_RESET)
    # one TMR (a new one), the VM's pages and the old TMR back with the host: left in firmware
    # state are only the new TMR's pages; what would not come back is leaked, not lost
    assert kvm.tmr_pfns and kvm.tmr_pfns != old_tmr
    assert owned_states(rmp) == {PageState.FIRMWARE: TMR_PAGES}
    assert rmp.owned() - set(kvm.tmr_pfns) == set()
    # the VMM's destroy of the terminated VM gives its ASID back and forgets it
    assert await kvm.destroy_vm(vm) == 0
    assert vm.vm_id not in kvm.vms and vm.asid in kvm.free_asids
    new = await kvm.create_vm(CONFIG)
    await kvm.launch_vm(new)
    assert new.state == VmState.RUNNING


async def test_an_unreachable_firmware_is_not_serving_until_it_answers() -> None:
    kvm, _rmp, psp = await host()
    watch = Watch(kvm, polls=3)

    def unreachable() -> None:
        psp.faults.arm("psp.platform_status", 1, Unavailable("psp is unreachable"))

    watch.before_poll = [unreachable]
    await watch.run()
    assert watch.health == [False, True]
    assert kvm.snp_enabled


async def test_a_recovery_that_fails_part_way_is_retried() -> None:
    kvm, _rmp, psp = await host()
    watch = Watch(kvm, polls=4)

    def reset_and_fail_init() -> None:
        reset(psp)
        psp.faults.arm("psp.snp_init", 1, peer_error("HW_ERROR_PLATFORM", 0x1F))

    watch.before_poll = [reset_and_fail_init]
    await watch.run()
    assert watch.health == [False, True]
    assert kvm.snp_enabled and psp.state == PlatformState.INIT


async def test_a_restarted_kvm_keeps_the_recorded_tmr_and_frees_it_after_a_reset(
    tmp_path: Path,
) -> None:
    record = TmrRecord(tmp_path / "tmr.json")
    kvm, rmp, psp = await host(record)
    first_tmr = list(kvm.tmr_pfns)
    # kvm restarts: the firmware keeps its TMR; the new kvm takes no second one
    again = Kvm(rmp, psp)
    await bringup.bring_up(again, tmr_record=record)
    assert again.tmr_pfns == first_tmr
    assert owned_states(rmp) == {PageState.FIRMWARE: TMR_PAGES}
    # then the firmware is reset: the recorded TMR goes back, one new one is taken
    reset(psp)
    await bringup.bring_up(again, tmr_record=record)
    assert again.tmr_pfns != first_tmr
    assert owned_states(rmp) == {PageState.FIRMWARE: TMR_PAGES}
    assert not rmp.leaked and rmp.owned() == set(again.tmr_pfns)
    assert record.load() == again.tmr_pfns


async def test_a_record_the_rmp_does_not_confirm_is_ignored(tmp_path: Path) -> None:
    record = TmrRecord(tmp_path / "tmr.json")
    record.save([Pfn(0x40000 + i) for i in range(TMR_PAGES)])  # pages in hypervisor state
    kvm, rmp, _psp = await host(record)
    assert owned_states(rmp) == {PageState.FIRMWARE: TMR_PAGES}
    assert record.load() == kvm.tmr_pfns != [Pfn(0x40000)]


async def test_a_restarted_kvm_leaks_what_the_dead_kvm_s_vms_left(tmp_path: Path) -> None:
    record = TmrRecord(tmp_path / "tmr.json")
    kvm, rmp, psp = await host(record)
    vm = await kvm.create_vm(CONFIG)
    await kvm.launch_vm(vm)
    left: Sequence[Pfn] = [p for p, e in rmp.entries.items() if p not in set(kvm.tmr_pfns)]
    assert left
    again = Kvm(rmp, psp)
    await bringup.bring_up(again, tmr_record=record)
    assert await leftovers.sweep(again) == len(left)
    assert rmp.leaked == set(left)
    assert vm.asid not in again.free_asids  # its nested page table is still rmp's
    assert not psp.contexts  # the firmware forgot the dead kvm's guest
    new = await again.create_vm(CONFIG)
    await again.launch_vm(new)
    assert new.asid != vm.asid and new.state == VmState.RUNNING
    assert await leftovers.sweep(again) == 0  # once, at start: never a VM of its own
