"""The KVM uapi values the VM-control RPCs take, and the errno each refusal carries.

KERNEL: include/uapi/linux/kvm.h (memslots, guest_memfd, memory attributes),
arch/x86/include/uapi/asm/kvm.h (VM types, SEV commands and their structs), and the x86
limits of arch/x86/include/asm/kvm_host.h.
"""

from __future__ import annotations

import enum

from snpemu.errors import SnpemuError

# KERNEL: arch/x86/include/uapi/asm/kvm.h KVM_X86_*_VM
KVM_X86_DEFAULT_VM = 0
KVM_X86_SNP_VM = 4

# KERNEL: include/uapi/linux/kvm.h; only bits 15:0 are userspace's
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# KERNEL: include/uapi/linux/kvm.h GUEST_MEMFD_FLAG_*
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

# KERNEL: include/uapi/linux/kvm.h
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# KERNEL: include/uapi/linux/kvm.h KVM_EXIT_HYPERCALL, KVM_CAP_EXIT_HYPERCALL
KVM_EXIT_HYPERCALL = 3
KVM_CAP_EXIT_HYPERCALL = 201
# KERNEL: include/uapi/linux/kvm_para.h KVM_HC_MAP_GPA_RANGE; arch/x86/kvm/x86.h
# KVM_EXIT_HYPERCALL_VALID_MASK (the only hypercall a VMM may take)
KVM_HC_MAP_GPA_RANGE = 12
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
# KERNEL: arch/x86/include/uapi/asm/kvm_para.h KVM_MAP_GPA_RANGE_*
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0

# The host's MAXPHYADDR (CPUID 0x80000008 EAX[7:0] of an EPYC): KVM's shadow_phys_bits, which
# bounds every GFN (KERNEL: arch/x86/kvm/mmu.h kvm_mmu_max_gfn(), kvm_get_shadow_phys_bits())
MAXPHYADDR = 48

# KERNEL: arch/x86/include/asm/kvm_host.h KVM_MAX_NR_USER_MEMSLOTS (KVM_USER_MEM_SLOTS)
KVM_USER_MEM_SLOTS = 32764
# KERNEL: arch/x86/include/asm/kvm_host.h KVM_MAX_VCPU_IDS (kvm_vm_ioctl_create_vcpu()
# refuses an id at or above it)
KVM_MAX_VCPU_IDS = 4096
# KERNEL: arch/x86/include/asm/page_64_types.h TASK_SIZE_MAX with 4-level paging: the end of
# user space, which access_ok() checks a memslot's userspace_addr range against
TASK_SIZE_MAX = (1 << 47) - 4096

# KERNEL: arch/x86/include/uapi/asm/kvm.h sizes of the launch-finish blobs
KVM_SEV_SNP_ID_BLOCK_SIZE = 96
KVM_SEV_SNP_ID_AUTH_SIZE = 4096
KVM_SEV_SNP_FINISH_DATA_SIZE = 32
# KERNEL: arch/x86/kvm/svm/sev.c GHCB_VERSION_DEFAULT (GHCB_VERSION_MAX is abi/msr_protocol.py's)
GHCB_VERSION_DEFAULT = 2


class Errno(enum.StrEnum):
    """What an ioctl would have returned (negated), in ErrorInfo metadata "errno"."""

    EPERM = "EPERM"
    EIO = "EIO"
    EBADF = "EBADF"
    EFAULT = "EFAULT"
    EBUSY = "EBUSY"
    EEXIST = "EEXIST"
    EINVAL = "EINVAL"
    ENOTTY = "ENOTTY"
    EMFILE = "EMFILE"


def with_errno(err: SnpemuError, errno: Errno) -> SnpemuError:
    """err, carrying the errno KVM returns for it."""
    err.metadata["errno"] = errno.value
    return err


def refuse(
    cls: type[SnpemuError], errno: Errno, message: str, *, reason: str | None = None
) -> SnpemuError:
    return with_errno(cls(message, reason=reason), errno)
