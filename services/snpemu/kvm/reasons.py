"""The reasons kvm's errors carry (ErrorInfo.reason on the wire); a client compares by member."""

from __future__ import annotations

import enum


class KvmReason(enum.StrEnum):
    SNP_DISABLED = "SNP_DISABLED"  # the host came up without SNP
    ASID_EXHAUSTED = "ASID_EXHAUSTED"  # every SNP ASID is in use
    TOO_MANY_FDS = "TOO_MANY_FDS"  # the VMM holds RLIMIT_NOFILE fds (kvm/fds.py)
    VM_STATE = "VM_STATE"  # the VM is not in the state the call needs (not launched, ...)
    # a launch failed after SNP_LAUNCH_START: the VM keeps its context until DestroyVm
    LAUNCH_STARTED = "LAUNCH_STARTED"
    PAGE_NOT_SHARED = "PAGE_NOT_SHARED"  # a launch page is not in hypervisor state
    POLICY_UNSUPPORTED = "POLICY_UNSUPPORTED"  # policy bits outside SNP_POLICY_MASK_VALID
    POLICY_MBO = "POLICY_MBO"  # policy bit 17 (reserved, must be one) is zero
    VMSA_FEATURES_UNSUPPORTED = "VMSA_FEATURES_UNSUPPORTED"
    POPULATE_INVALID = "POPULATE_INVALID"  # GetMemoryMap's populate: too many, empty, too large
    # the images of a VM's config (kvm/images.py)
    IMAGE_PATH_AND_BYTES = "IMAGE_PATH_AND_BYTES"  # a path and the bytes of one image
    IMAGE_PATH_INVALID = "IMAGE_PATH_INVALID"  # a NUL in the path, or longer than PATH_MAX
    IMAGE_OUTSIDE_DIR = "IMAGE_OUTSIDE_DIR"  # resolves outside the image directory
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    IMAGE_NOT_REGULAR = "IMAGE_NOT_REGULAR"  # a directory, FIFO, device, socket
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"  # over the host's cap for that kind of image
    IMAGE_UNREADABLE = "IMAGE_UNREADABLE"  # kvm may not (or could not) read it
    IMAGE_EMPTY = "IMAGE_EMPTY"  # an empty kernel
    FIRMWARE_INVALID = "FIRMWARE_INVALID"  # not an OVMF image SNP can launch for this VM
    KERNEL_REQUIRED = "KERNEL_REQUIRED"  # an initrd or a command line without a kernel
    CMDLINE_TOO_LONG = "CMDLINE_TOO_LONG"
