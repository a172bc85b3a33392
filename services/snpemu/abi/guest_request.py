"""SW_EXITINFO2 of an SNP guest request (SNP_GUEST_REQUEST, SNP_EXT_GUEST_REQUEST): the VMM's
error in the upper half, the firmware's status in the lower. kvm answers with it; the guest
driver reads it.

KERNEL: include/uapi/linux/sev-guest.h SNP_GUEST_VMM_ERR_INVALID_LEN, SNP_GUEST_VMM_ERR_BUSY,
SNP_GUEST_VMM_ERR_GENERIC, SNP_GUEST_VMM_ERR(x) = x << 32, SNP_GUEST_FW_ERR_MASK.
"""

from __future__ import annotations

VMM_ERR_SHIFT = 32
VMM_ERR_INVALID_LEN = 1  # the certificate pages are too few: RBX says how many are needed
VMM_ERR_BUSY = 2  # throttled or the firmware busy: retry
VMM_ERR_GENERIC = 1 << 31
FW_ERR_MASK = (1 << VMM_ERR_SHIFT) - 1


def vmm_error(code: int) -> int:
    """SNP_GUEST_VMM_ERR(code): SW_EXITINFO2 of a request the VMM refused."""
    return code << VMM_ERR_SHIFT


def fw_error(status: int) -> int:
    """SW_EXITINFO2 of a request the firmware refused: its status, no VMM error."""
    return status & FW_ERR_MASK
