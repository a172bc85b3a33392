"""Guest memory is backed when first used (kvm/faultin.py), as KVM backs a guest_memfd memslot
on its first fault: CreateVm takes no frame, a fault takes the frames of the 2 MiB chunk it
lands in and maps them, and DestroyVm gives back exactly what faults took.

The frame counts are what the design says (a 2 MiB chunk is 512 pages); the GPA-to-memfd-offset
rule is KVM's (kvm_gmem_get_pfn(): index = gfn - slot->base_gfn + slot->gmem.pgoff), applied to
QEMU's layout (RAM above 4 GiB at the memfd offset where the RAM below ends).
"""

from __future__ import annotations

import pytest
from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.errors import Unavailable
from snpemu.kvm.config import VmConfig
from snpemu.kvm.exits import Exits
from snpemu.kvm.exits.npf import NpfAction
from snpemu.kvm.faultin import faultin
from snpemu.kvm.gmem import GuestMemfd
from snpemu.kvm.machine import Kvm
from snpemu.kvm.vm import Vm
from snpemu.vmm.memory_layout import RAM_HIGH_SLOT, RAM_SLOT

from tests.unit.kvm.test_rollback import host

GIB = 1 << 30


def ram_gmem(kvm: Kvm, vm: Vm) -> GuestMemfd:
    return kvm.gmems.by_fd[vm.slots[RAM_SLOT].gmem_fd]


async def test_a_64_gib_vm_takes_no_frame_until_its_memory_is_used() -> None:
    kvm, rmp, _psp, _faults = await host()
    empty = set(rmp.owned())
    vm = await kvm.create_vm(VmConfig(memory_bytes=64 * GIB, vcpus=1))
    # KVM_SEV_INIT2 takes the two guest-request bounce pages (KERNEL: arch/x86/kvm/svm/sev.c
    # snp_guest_req_init()), and no frame of guest memory
    before = set(rmp.owned())
    assert len(before - empty) == 2 and vm.memslots.runs == []
    assert {s.slot for s in vm.slots.values()} == {RAM_SLOT, RAM_HIGH_SLOT}
    # one page at 1 GiB and one 60 GiB above 4 GiB
    await faultin(kvm, vm, GIB + 5 * PAGE_SIZE, PAGE_SIZE)
    await faultin(kvm, vm, 64 * GIB, PAGE_SIZE)
    g = ram_gmem(kvm, vm)
    # memfd offsets: 1 GiB below; 2 GiB (where the low RAM ends) + 60 GiB above
    assert sorted(g.chunks) == [GIB // (2 << 20), (62 * GIB) // (2 << 20)]
    assert len(set(rmp.owned()) - before) == 2 * PAGES_PER_2M
    high = vm.memslots.translate(64 * GIB)
    assert high is not None and high // PAGE_SIZE == g.chunks[(62 * GIB) // (2 << 20)][0]
    # the NPT maps what the translation holds, and nothing else
    assert {r.gpa for r in rmp.npt[vm.vm_id].values()} == {GIB, 64 * GIB}
    # a second use of the same chunk takes nothing; a GPA in no memslot is left alone
    await faultin(kvm, vm, GIB + (2 << 20) - PAGE_SIZE, PAGE_SIZE)
    await faultin(kvm, vm, 3 * GIB, PAGE_SIZE)  # the PCI hole
    assert len(set(rmp.owned()) - before) == 2 * PAGES_PER_2M
    assert vm.memslots.translate(3 * GIB) is None
    assert await kvm.destroy_vm(vm) == 0
    assert set(rmp.owned()) == empty and vm.vm_id not in rmp.npt


async def test_a_guest_fault_maps_the_page_and_the_guest_retries() -> None:
    kvm, _rmp, _psp, _faults = await host()
    vm = await kvm.create_vm(VmConfig(memory_bytes=16 << 20, vcpus=1))
    await kvm.launch_vm(vm)
    exits = Exits(kvm)
    ident = kvm.identity(vm, 0)
    gpa = 12 << 20  # RAM the launch did not touch
    assert vm.memslots.translate(gpa) is None
    assert await exits.npf(ident, gpa + 8, 0) == (NpfAction.MAP, True)
    assert vm.memslots.translate(gpa) is not None
    assert await exits.npf(ident, 3 * GIB, 0) == (NpfAction.NO_MEMSLOT, False)


async def test_a_mapping_rmp_refused_is_made_again_at_the_next_use() -> None:
    kvm, rmp, _psp, faults = await host()
    vm = await kvm.create_vm(VmConfig(memory_bytes=16 << 20, vcpus=1))
    before = set(rmp.owned())
    faults.arm("rmp.update_npt")
    with pytest.raises(Unavailable):
        await faultin(kvm, vm, 0, PAGE_SIZE)
    # the frames are the memfd's (DestroyVm frees them); the GPA is not translated
    assert vm.memslots.translate(0) is None and vm.slots[RAM_SLOT].runs == []
    faults.disarm()
    await faultin(kvm, vm, 0, PAGE_SIZE)
    assert vm.memslots.translate(0) is not None
    assert len(set(rmp.owned()) - before) == PAGES_PER_2M  # the same chunk's frames
    assert await kvm.destroy_vm(vm) == 0
    assert set(rmp.owned()) <= before


async def test_a_released_vm_is_never_backed_again_and_translates_to_no_freed_frame() -> None:
    """A firmware reset takes a VM's frames back (teardown.release()) and leaves the VM until
    DestroyVm: no frame it gave back may still be translated, and no later use backs any."""
    from snpemu.kvm import teardown

    kvm, rmp, _psp, _faults = await host()
    before = set(rmp.owned())
    vm = await kvm.create_vm(VmConfig(memory_bytes=64 << 20, vcpus=1))
    await faultin(kvm, vm, 0x200000, PAGE_SIZE)
    assert vm.memslots.translate(0x200000) is not None
    await teardown.release(kvm, vm)
    assert vm.memslots.runs == [] and all(not s.runs for s in vm.slots.values())
    await faultin(kvm, vm, 0x400000, PAGE_SIZE)
    assert vm.memslots.translate(0x400000) is None and vm.memslots.translate(0x200000) is None
    assert await kvm.destroy_vm(vm) == 0
    assert set(rmp.owned()) == before


async def test_an_mmio_read_into_untouched_ram_backs_its_scratch_area() -> None:
    """KVM writes an MMIO read's data to a scratch area outside the GHCB with kvm_write_guest(),
    which faults the page in (arch/x86/kvm/svm/sev.c setup_vmgexit_scratch()): RAM the guest
    never touched takes the all-ones read, not SCRATCH_NOT_MAPPED."""
    from snpemu.abi import ghcb as g
    from snpemu.kvm.exits.scratch import GuestMemory, mmio

    kvm, _rmp, _psp, _faults = await host()
    vm = await kvm.create_vm(VmConfig(memory_bytes=16 << 20, vcpus=1))
    ghcb_gpa, scratch = 0x100000, 12 << 20
    assert vm.memslots.translate(scratch) is None
    x = g.Ghcb()
    x.set("sw_exit_code", g.EXIT_MMIO_READ)
    x.set("sw_exit_info_1", 0xFEE00000)
    x.set("sw_exit_info_2", 8)
    x.set("sw_scratch", scratch)
    written: list[tuple[int, bytes]] = []

    async def write(spa: int, data: bytes) -> int:
        written.append((spa, data))
        return len(data)

    async def back(gpa: int, size: int) -> None:
        await faultin(kvm, vm, gpa, size)

    await mmio(GuestMemory(vm.memslots.translate, write, back), ghcb_gpa, x)
    assert written == [(vm.memslots.translate(scratch), b"\xff" * 8)]
