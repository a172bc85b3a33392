"""Guest vCPU identities: what kvm registers for each vCPU, and what a guest operation presents.

A guest-mode RPC is honoured only with the identity kvm issued for that vCPU (its ASID, VMPL
and a secret token), so a process that can reach rmp cannot act as a guest it is not.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from snpemu.errors import InvalidArgument, NotFound, PermissionDenied, WrongState
from snpemu.rmp.checks import quote
from snpemu.rmp.entry import MAX_ASID
from snpemu.rmp.reasons import RmpReason


@dataclass(frozen=True)
class Identity:
    vm_id: str
    vcpu_id: int
    asid: int
    vmpl: int
    token: bytes


class Identities:
    """The registered identities, by (VM, vCPU)."""

    def __init__(self) -> None:
        self._by_vcpu: dict[tuple[str, int], Identity] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._by_vcpu

    def register(self, ident: Identity) -> None:
        if not 1 <= ident.asid <= MAX_ASID or not 0 <= ident.vmpl <= 3:
            raise InvalidArgument(
                "identity needs an ASID in 1..1023 and a VMPL in 0..3",
                reason=RmpReason.OUT_OF_RANGE,
            )
        if len(ident.token) < 16:
            raise InvalidArgument(
                "identity token must be at least 16 bytes", reason=RmpReason.OUT_OF_RANGE
            )
        key = (ident.vm_id, ident.vcpu_id)
        if key in self._by_vcpu:
            raise WrongState(
                f"vCPU {ident.vcpu_id} of VM {quote(ident.vm_id)} already has an identity",
                reason=RmpReason.ALREADY_REGISTERED,
            )
        self._by_vcpu[key] = ident

    def revoke(self, vm_id: str, vcpu_id: int) -> None:
        if self._by_vcpu.pop((vm_id, vcpu_id), None) is None:
            raise NotFound(f"no identity for vCPU {vcpu_id} of VM {quote(vm_id)}")

    def check(self, vm_id: str, vcpu_id: int, asid: int, token: bytes) -> Identity:
        """The registered identity a guest operation presents, or PermissionDenied."""
        ident = self._by_vcpu.get((vm_id, vcpu_id))
        # compare_digest: the token check takes the same time however much of it matches
        if ident is None or not secrets.compare_digest(ident.token, token) or ident.asid != asid:
            raise PermissionDenied(
                "guest-mode operations need a vCPU identity issued by kvm",
                reason=RmpReason.BAD_VCPU_IDENTITY,
            )
        return ident
