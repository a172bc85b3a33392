"""The #NPF error code (EXITINFO1) an RMP check raises: rmp sets the bits, kvm's fault handler
reads them.

KERNEL: arch/x86/include/asm/kvm_host.h PFERR_*; arch/x86/kvm/svm/sev.c sev_handle_rmp_fault().
"""

from __future__ import annotations

PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_GUEST_RMP = 1 << 31
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33
PFERR_GUEST_ENC = 1 << 34
PFERR_GUEST_SIZEM = 1 << 35
PFERR_GUEST_VMPL = 1 << 36
