"""GUEST_POLICY: the u64 the host gives SNP_LAUNCH_START, bit by bit.

SPEC: SNP ABI (56860) "GUEST_POLICY"; KERNEL: include/linux/psp-sev.h SNP_POLICY_MASK_* ("as
defined by SEV-SNP Firmware ABI, under Guest Policy"), arch/x86/kvm/svm/sev.c
SNP_POLICY_MASK_VALID (docs/abi.md#guest-policy). Bits 7:0 and 15:8 are the minimum firmware ABI
minor and major, not flags: read them with abi_version(). Bits 63:26 are reserved (zero).
"""

from __future__ import annotations

import enum

ABI_MINOR_MASK = 0xFF  # SNP_POLICY_MASK_API_MINOR GENMASK_ULL(7, 0)
ABI_MAJOR_SHIFT = 8
ABI_MAJOR_MASK = 0xFF << ABI_MAJOR_SHIFT  # SNP_POLICY_MASK_API_MAJOR GENMASK_ULL(15, 8)
DEFINED_BITS = 26  # the highest defined bit is PAGE_SWAP_DISABLE (25)
RESERVED_MASK = ~((1 << DEFINED_BITS) - 1) & (2**64 - 1)


class GuestPolicy(enum.IntFlag):
    """The flag bits of GUEST_POLICY (an IntFlag keeps the ABI version bits it does not name)."""

    SMT = 1 << 16  # SMT may be enabled on the host
    RSVD_MBO = 1 << 17  # reserved, must be one
    MIGRATE_MA = 1 << 18  # a migration agent may be associated
    DEBUG = 1 << 19  # SNP_DBG_DECRYPT / SNP_DBG_ENCRYPT allowed
    SINGLE_SOCKET = 1 << 20  # the guest may run on one socket only
    CXL_ALLOW = 1 << 21
    MEM_AES_256_XTS = 1 << 22
    RAPL_DIS = 1 << 23
    CIPHERTEXT_HIDING_DRAM = 1 << 24
    PAGE_SWAP_DISABLE = 1 << 25

    @classmethod
    def from_int(cls, raw: int) -> GuestPolicy:
        return cls(raw)

    def to_int(self) -> int:
        return int(self)


def abi_version(policy: int) -> tuple[int, int]:
    """(major, minor): the firmware ABI the guest needs at least."""
    return (policy & ABI_MAJOR_MASK) >> ABI_MAJOR_SHIFT, policy & ABI_MINOR_MASK


def reserved_bits(policy: int) -> int:
    return policy & RESERVED_MASK


# QEMU target/i386/sev.c DEFAULT_SEV_SNP_POLICY: SMT and RSVD_MBO, ABI 0.0
DEFAULT = GuestPolicy.SMT | GuestPolicy.RSVD_MBO
# KERNEL: arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_VALID: what KVM passes to the firmware
KVM_VALID_MASK = int(
    ABI_MINOR_MASK
    | ABI_MAJOR_MASK
    | GuestPolicy.SMT
    | GuestPolicy.RSVD_MBO
    | GuestPolicy.DEBUG
    | GuestPolicy.SINGLE_SOCKET
)
