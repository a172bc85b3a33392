"""A vCPU's identity as kvm issued it, decoded once from the wire by the servicer.

The guest agent presents it with every exit; rmp checks the same identity on every guest-mode
access. `token` is the capability: whoever holds it acts as that vCPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VcpuIdentity:
    vm_id: str
    vcpu_id: int
    asid: int
    token: bytes
