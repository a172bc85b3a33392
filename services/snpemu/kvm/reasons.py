"""The reasons kvm's errors carry (ErrorInfo.reason on the wire); a client compares by member."""

from __future__ import annotations

import enum


class KvmReason(enum.StrEnum):
    SNP_DISABLED = "SNP_DISABLED"  # the host came up without SNP
    ASID_EXHAUSTED = "ASID_EXHAUSTED"  # every SNP ASID is in use
    VM_STATE = "VM_STATE"  # the VM is not in the state the call needs (not launched, ...)
    # a launch failed after SNP_LAUNCH_START: the VM keeps its context until DestroyVm
    LAUNCH_STARTED = "LAUNCH_STARTED"
    PAGE_NOT_SHARED = "PAGE_NOT_SHARED"  # a launch page is not in hypervisor state
    POLICY_UNSUPPORTED = "POLICY_UNSUPPORTED"  # policy bits outside SNP_POLICY_MASK_VALID
    POLICY_MBO = "POLICY_MBO"  # policy bit 17 (reserved, must be one) is zero
    VMSA_FEATURES_UNSUPPORTED = "VMSA_FEATURES_UNSUPPORTED"
