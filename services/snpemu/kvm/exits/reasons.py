"""Why kvm refuses an exit: the `reason` of the error the caller gets (the wire strings). An
exit of a VM not running is kvm/reasons.py KvmReason.VM_STATE, as for every other call."""

from __future__ import annotations

import enum


class ExitReason(enum.StrEnum):
    # the exit does not carry the vCPU identity kvm issued (token, ASID or vCPU unknown)
    BAD_VCPU_IDENTITY = "BAD_VCPU_IDENTITY"
    VM_TERMINATED = "VM_TERMINATED"
    # the vCPU is out in the VMM with an exit its RunVcpu has not completed (map_gpa.py): it
    # does not run guest code meanwhile
    VCPU_IN_VMM = "VCPU_IN_VMM"
    # RunVcpu on a vCPU with no exit out in the VMM
    NO_PENDING_EXIT = "NO_PENDING_EXIT"
    GHCB_NOT_REGISTERED = "GHCB_NOT_REGISTERED"
    GHCB_NOT_MAPPED = "GHCB_NOT_MAPPED"
    UNSUPPORTED_EVENT = (
        "UNSUPPORTED_EVENT"  # the guest's own report (SVM_VMGEXIT_UNSUPPORTED_EVENT)
    )
    # KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: an exit with no KVM handler (nae.py)
    UNEXPECTED_EXIT_REASON = "UNEXPECTED_EXIT_REASON"
    # a scratch area KVM fails the vCPU run for (scratch.py)
    STRING_IO_COUNT = "STRING_IO_COUNT"  # count * size overflows (sev_es_string_io())
    SCRATCH_NOT_MAPPED = "SCRATCH_NOT_MAPPED"  # kvm_read_guest() of the area fails
