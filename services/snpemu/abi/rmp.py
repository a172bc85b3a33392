"""What the RMP's clients and the RMP agree on: page states, instruction result codes and the
page-state transitions the firmware makes. psp, kvm and the guest use these members; rmp
implements them; the gRPC enums of snp.common.v1.PageState and snp.rmp.v1.FirmwareOp carry
the same values.
"""

from __future__ import annotations

import enum

# The GPA the firmware and KVM record for a VMSA page: (u64)(-1) page-aligned, bits above 51
# cleared. KERNEL: arch/x86/kvm/svm/sev.c INITIAL_VMSA_GPA
VMSA_GPA = 0xFFFFFFFFF000


class PageState(enum.IntEnum):
    """SNP ABI ch. 5 page states (docs/abi.md#page-states). Values match snp.common.v1.PageState."""

    HYPERVISOR = 1
    HYPERVISOR_FIXED = 2
    FIRMWARE = 3
    RECLAIM = 4
    CONTEXT = 5
    PRE_GUEST = 6
    GUEST_INVALID = 7
    GUEST_VALID = 8
    METADATA = 9


class Code(enum.IntEnum):
    """RMP instruction results in EAX (docs/abi.md#rmp-instructions).
    KERNEL: arch/x86/include/asm/sev.h."""

    SUCCESS = 0
    FAIL_INPUT = 1
    FAIL_PERMISSION = 2
    FAIL_INUSE = 3
    FAIL_OVERLAP = 4
    FAIL_SIZEMISMATCH = 6
    # CF=1: PVALIDATE made no change. KERNEL: PVALIDATE_FAIL_NOUPDATE
    FAIL_NOUPDATE = 255


class FwOp(enum.IntEnum):
    """The page-state changes the firmware makes to the RMP directly (SNP ABI ch. 8, the command
    that makes each; docs/abi.md#page-states). Values match snp.rmp.v1.FirmwareOp."""

    CONTEXT = 1  # Firmware -> Context (SNP_GCTX_CREATE)
    FIRMWARE = 2  # Context/Metadata -> Firmware (SNP_DECOMMISSION)
    RECLAIM = 3  # Firmware/Context/Metadata/Pre-Guest -> Reclaim (SNP_PAGE_RECLAIM)
    FINISH = 4  # Pre-Guest of the ASID -> Guest-Valid (SNP_LAUNCH_FINISH)
    VMSA = 5  # the VMSA bit of a Pre-Guest page of the ASID (SNP_LAUNCH_UPDATE, type VMSA)
    HV_FIXED = 6  # Hypervisor/Firmware -> Hypervisor-Fixed (SNP_INIT_EX range list)
    UNSMASH = 7  # 512 matching 4K entries -> one 2M entry (SNP_PAGE_UNSMASH)


class Placement(enum.IntEnum):
    """Where rmp's frame allocator takes frames from. Values match snp.rmp.v1.Placement."""

    ANY = 1
    ALIGNED_2M = 2  # 2M-aligned runs (guest RAM, the TMR)
    # Never 2 MiB aligned: a 2M-aligned VMSA/VMCB page can take a spurious RMP #PF.
    # KERNEL: arch/x86/kvm/svm/sev.c snp_safe_alloc_page()
    SNP_SAFE = 3


class AccessOrigin(enum.IntEnum):
    """Who makes a host access; the violation policy tells them apart. Values match
    snp.rmp.v1.AccessOrigin."""

    USER = 1
    KERNEL = 2
