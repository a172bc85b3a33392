"""The VM's memory ioctls: KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2,
KVM_SET_MEMORY_ATTRIBUTES, each refusing what KVM refuses, in KVM's order, before it changes
anything.

UNVERIFIED(one-backing): an SNP VM here has one backing: the guest_memfd's frames back a GPA
whether the guest uses it private or shared, and the memslot's userspace_addr is checked but
has nothing behind it (mainline keeps shared memory behind userspace_addr); a gmem VM's
attributes therefore move its backed pages in the RMP at once (kvm/gmem_rmp.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snpemu.abi.addr import PAGE_SIZE as PAGE
from snpemu.errors import AlreadyExists, InvalidArgument, NotBuilt
from snpemu.kvm import gmem_rmp
from snpemu.kvm.faultin import faultin_ranges
from snpemu.kvm.gmem import GuestMemfd
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_USER_MEM_SLOTS,
    MAXPHYADDR,
    TASK_SIZE_MAX,
    Errno,
    refuse,
)
from snpemu.kvm.vm import UserMemslot, Vm

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

U64 = 1 << 64
# KERNEL: arch/x86/kvm/mmu.h kvm_mmu_max_gfn(): (1 << (shadow_phys_bits - PAGE_SHIFT)) - 1
MAX_GFN = (1 << (MAXPHYADDR - 12)) - 1
# KERNEL: include/linux/kvm_host.h KVM_MEM_MAX_NR_PAGES ((1UL << 31) - 1)
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


def _einval(message: str) -> InvalidArgument:
    err = refuse(InvalidArgument, Errno.EINVAL, message)
    assert isinstance(err, InvalidArgument)
    return err


async def create_guest_memfd(kvm: Kvm, vm: Vm, size: int, flags: int, owner: str) -> GuestMemfd:
    """KERNEL: virt/kvm/guest_memfd.c kvm_gmem_create()"""
    # KERNEL: kvm_gmem_get_supported_flags(): MMAP only where the arch lets private memory be
    # mapped (x86 kvm_arch_supports_gmem_mmap(): not for a VM with private memory) and
    # INIT_SHARED likewise. UNVERIFIED(gmem-flags): read from patches, not a release.
    supported = 0
    if flags & ~supported:
        known = flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        raise _einval(
            f"flags {flags:#x}: "
            + (f"{known:#x} are not for an SNP VM's private memory" if known else "unknown bits")
        )
    # size is a loff_t there: a u64 with the top bit set is negative
    if size == 0 or size >= 1 << 63 or size % PAGE:
        raise _einval(f"size {size:#x} must be a positive multiple of 4096")
    # no frames yet: each chunk takes its own when first used (kvm/faultin.py)
    g = kvm.gmems.add(vm.vm_id, owner, size // PAGE)
    vm.gmem_fds.append(g.fd)
    return g


def _check_region(slot: int, flags: int, gpa: int, size: int, uaddr: int, off: int) -> None:
    """kvm_set_memory_region()'s checks of the request itself, rows 1 to 8."""
    # KERNEL: virt/kvm/kvm_main.c check_memory_region_flags(): an SNP VM has private memory
    # (kvm_arch_has_private_mem()) and no read-only memory (has_protected_state)
    valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    if flags & ~valid:
        what = "KVM_MEM_READONLY on an SNP VM" if flags & KVM_MEM_READONLY else "invalid bits"
        raise _einval(f"flags {flags:#x}: {what} (valid here: {valid:#x})")
    if size % PAGE:
        raise _einval(f"memory_size {size:#x} is not a multiple of 4096")
    if gpa % PAGE:
        raise _einval(f"guest_phys_addr {gpa:#x} is not page aligned")
    # access_ok(): the whole range inside user space
    if uaddr % PAGE or uaddr + size > TASK_SIZE_MAX:
        raise _einval(f"userspace_addr {uaddr:#x} (+{size:#x}) is not page-aligned user memory")
    if flags & KVM_MEM_GUEST_MEMFD and (off % PAGE or off + size >= U64):
        raise _einval(f"guest_memfd_offset {off:#x} is not page aligned or wraps")
    # KERNEL: kvm_arch_nr_memslot_as_ids(): one address space for a protected-state VM (no SMM)
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= 1 or sid >= KVM_USER_MEM_SLOTS:
        raise _einval(f"slot {slot:#x}: address space {as_id}, id {sid} (ids 0..32763, as 0)")
    # `gpa + size < gpa` in u64: a range ending at 2^64 wraps to 0
    if gpa + size >= U64:
        raise _einval(f"guest_phys_addr {gpa:#x} + memory_size {size:#x} wraps")
    if size // PAGE > KVM_MEM_MAX_NR_PAGES:
        raise _einval(f"memory_size {size:#x} is more than KVM_MEM_MAX_NR_PAGES pages")


async def set_memory_region(
    kvm: Kvm,
    vm: Vm,
    *,
    slot: int,
    flags: int,
    gpa: int,
    size: int,
    userspace_addr: int,
    gmem_fd: int,
    gmem_offset: int,
    caller: str,
    is_host: bool,
) -> None:
    """KERNEL: virt/kvm/kvm_main.c kvm_set_memory_region()"""
    _check_region(slot, flags, gpa, size, userspace_addr, gmem_offset)
    old = vm.slots.get(slot)
    if size == 0:
        if old is None:
            raise _einval(f"slot {slot} to delete does not exist")
        await _delete(kvm, vm, old)
        return
    if old is not None:
        # KERNEL: "Private memslots are immutable, they can only be deleted" (-EINVAL)
        raise _einval(f"slot {slot} exists and holds a guest_memfd: it can only be deleted")
    for other in vm.slots.values():
        if gpa < other.gpa + other.size and other.gpa < gpa + size:
            # KERNEL: kvm_check_memslot_overlap()
            raise refuse(
                AlreadyExists,
                Errno.EEXIST,
                f"slot {slot} [{gpa:#x}, {gpa + size:#x}) overlaps slot {other.slot} "
                f"[{other.gpa:#x}, {other.gpa + other.size:#x})",
            )
    if not flags & KVM_MEM_GUEST_MEMFD:
        raise NotBuilt(
            "a memslot without KVM_MEM_GUEST_MEMFD (shared-only memory) is not built yet: "
            "bind a guest_memfd"
        )
    g = kvm.gmems.get(gmem_fd, vm.vm_id, caller, is_host)
    g.bind(slot, gmem_offset, size)
    if (gpa + size) // PAGE - 1 > MAX_GFN:
        # KERNEL: arch/x86/kvm/x86.c kvm_arch_prepare_memory_region(), after the bind, which
        # __kvm_set_memory_region() undoes (out_unbind)
        g.unbind(slot)
        raise _einval(
            f"slot {slot} [{gpa:#x}, {gpa + size:#x}) ends past the host's {MAXPHYADDR}-bit "
            "physical address space (kvm_mmu_max_gfn())"
        )
    # nothing mapped yet: KVM maps a memslot's pages as the guest (or KVM) first uses them
    vm.slots[slot] = UserMemslot(slot, flags, gpa, size, userspace_addr, gmem_fd, gmem_offset)


async def _delete(kvm: Kvm, vm: Vm, old: UserMemslot) -> None:
    """KVM_MR_DELETE: out of the NPT and the translation, the guest_memfd unbound (its pages
    stay its own). KERNEL: kvm_set_memslot(), kvm_free_memslot() -> kvm_gmem_unbind()"""
    async with vm.fault_lock:
        if vm.sev_active and old.runs:
            await kvm.rmp.update_npt(vm.vm_id, vm.asid, unmap=list(old.runs))
        del vm.slots[old.slot]
        vm.memslots.remove(old.runs)
    g = kvm.gmems.by_fd.get(old.gmem_fd)
    if g is not None:
        g.unbind(old.slot)


async def set_memory_attributes(
    kvm: Kvm, vm: Vm, address: int, size: int, attributes: int, flags: int
) -> None:
    """KERNEL: virt/kvm/kvm_main.c kvm_vm_ioctl_set_mem_attributes(); a gmem VM's pages
    already backed change in the RMP too (kvm/gmem_rmp.py)"""
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    if attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
        raise _einval(
            f"attributes {attributes:#x}: only KVM_MEMORY_ATTRIBUTE_PRIVATE "
            f"({KVM_MEMORY_ATTRIBUTE_PRIVATE:#x}) is supported"
        )
    # `address + size < address` in u64: a range ending at 2^64 wraps to 0
    if size == 0 or address + size >= U64:
        raise _einval(f"range [{address:#x}, +{size:#x}) is empty or wraps")
    if address % PAGE or size % PAGE:
        raise _einval(f"address {address:#x} and size {size:#x} must be page aligned")
    # with no page backed meanwhile (kvm/faultin.py), the RMP first: if rmp cannot be
    # reached, the attributes stay as they were
    async with vm.fault_lock:
        await gmem_rmp.convert(kvm, vm, address, address + size, bool(attributes))
        vm.attributes.set(address, address + size, bool(attributes))


async def private_by_default(kvm: Kvm, vm: Vm, gpa: int, size: int) -> None:
    """A guest_memfd memslot's range made private as soon as it exists, as QEMU does (QEMU:
    accel/kvm/kvm-all.c kvm_set_phys_mem(): kvm_set_memory_attributes_private() for a region
    with a guest_memfd): the guest's memory starts private, and it converts what it shares."""
    await set_memory_attributes(kvm, vm, gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)


def enable_cap(vm: Vm, cap: int, flags: int, args: list[int]) -> None:
    """KVM_ENABLE_CAP on the VM. KERNEL: arch/x86/kvm/x86.c kvm_vm_ioctl_enable_cap(): nonzero
    flags are -EINVAL; KVM_CAP_EXIT_HYPERCALL takes args[0] within
    KVM_EXIT_HYPERCALL_VALID_MASK; an unknown cap is -EINVAL."""
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    if len(args) > 4:
        raise _einval(f"{len(args)} args: struct kvm_enable_cap has 4")
    if cap != KVM_CAP_EXIT_HYPERCALL:
        raise _einval(f"cap {cap}: only KVM_CAP_EXIT_HYPERCALL ({KVM_CAP_EXIT_HYPERCALL}) is taken")
    mask = args[0] if args else 0
    if mask & ~KVM_EXIT_HYPERCALL_VALID_MASK:
        raise _einval(
            f"args[0] {mask:#x}: only KVM_HC_MAP_GPA_RANGE "
            f"({KVM_EXIT_HYPERCALL_VALID_MASK:#x}) may exit to the VMM"
        )
    vm.hypercall_exit_enabled = mask


POPULATE_RANGES_MAX = 16
POPULATE_BYTES_MAX = 1 << 30


async def populate(kvm: Kvm, vm: Vm, ranges: list[tuple[int, int]]) -> None:
    """A device backend's first touch of the VMM's memory (GetMemoryMap's `populate`): each
    (gpa, size) backed where a memslot holds it, all checked before any is. The bounds keep one
    call from backing a large guest whole."""
    if len(ranges) > POPULATE_RANGES_MAX:
        raise InvalidArgument(
            f"populate takes at most {POPULATE_RANGES_MAX} ranges",
            reason=KvmReason.POPULATE_INVALID,
        )
    for gpa, size in ranges:
        if size == 0 or gpa + size > U64:
            raise InvalidArgument(
                f"populate range {gpa:#x}+{size:#x}: empty or past 2^64",
                reason=KvmReason.POPULATE_INVALID,
            )
    if sum(size for _, size in ranges) > POPULATE_BYTES_MAX:
        raise InvalidArgument(
            f"populate covers at most {POPULATE_BYTES_MAX} bytes in all",
            reason=KvmReason.POPULATE_INVALID,
        )
    if ranges:
        await faultin_ranges(kvm, vm, [(gpa, gpa + size) for gpa, size in ranges])
