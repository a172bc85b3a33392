"""A guest access or RMP instruction that faults instead of completing: #NPF or #VC.

The #NPF error code is built from the kernel's PFERR_* bits (abi/npf.py), as the hardware
reports an RMP violation to the hypervisor.
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.abi.npf import (
    PFERR_GUEST_ENC,
    PFERR_GUEST_FINAL,
    PFERR_GUEST_RMP,
    PFERR_GUEST_SIZEM,
    PFERR_GUEST_VMPL,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
)

# #VC error code for a private access to a page that is not validated.
# UNVERIFIED(vc-not-validated): 0x404 as in the GHCB/APM #VC exit-code list ("page not validated").
VC_PAGE_NOT_VALIDATED = 0x404


@dataclass(frozen=True)
class Fault:
    """A guest access or instruction that faulted instead of completing."""

    vc: bool  # True: #VC in the guest; False: #NPF exit to the hypervisor
    error_code: int
    gpa: int
    cause: str


def npf(
    gpa: int,
    cause: str,
    *,
    write: bool = False,
    enc: bool = True,
    sizem: bool = False,
    vmpl: bool = False,
) -> Fault:
    code = PFERR_GUEST_RMP | PFERR_GUEST_FINAL | PFERR_PRESENT | PFERR_USER
    code |= (PFERR_WRITE if write else 0) | (PFERR_GUEST_ENC if enc else 0)
    code |= (PFERR_GUEST_SIZEM if sizem else 0) | (PFERR_GUEST_VMPL if vmpl else 0)
    return Fault(vc=False, error_code=code, gpa=gpa, cause=cause)
