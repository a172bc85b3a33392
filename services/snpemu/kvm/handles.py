"""VM handles as capabilities: who may act on a VM.

KVM_CREATE_VM returns a VM fd, and every later ioctl on the VM goes through that fd: a process
that did not create the VM (and was not handed the fd) cannot name it at all, whatever it
knows of the VM. kvm's VmHandle carries the same capability as a token, made by CreateVm and
returned to its caller only. A VMM must present it; the host (root, who could open any
process's fds through /proc) may omit it, but a token that is sent must be right, so a forged
handle is refused from anyone.

KERNEL: virt/kvm/kvm_main.c kvm_dev_ioctl_create_vm() (anon_inode_getfile for the VM fd) and
kvm_vm_ioctl(), which acts on the VM the fd names (`kvm->mm != current->mm` refuses a VM fd
used from another process: -EIO).
"""

from __future__ import annotations

import enum
import hmac
import secrets

from snpemu.errors import InvalidArgument, PermissionDenied
from snpemu.runtime.caller import Caller

TOKEN_BYTES = 32
# VM ids are "vm-" and 12 hex digits; anything much longer is not one of ours, and is not
# quoted back whole
MAX_VM_ID = 64


class HandleReason(enum.StrEnum):
    VM_TOKEN_MISSING = "VM_TOKEN_MISSING"  # a VMM named a VM without its token
    VM_TOKEN_WRONG = "VM_TOKEN_WRONG"  # the token is not this VM's
    VM_ID_INVALID = "VM_ID_INVALID"  # empty or far too long to be a VM id
    VM_NOT_YOURS = "VM_NOT_YOURS"  # the right token, from a VMM that did not create the VM


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def check_id(vm_id: str) -> None:
    if not vm_id:
        raise InvalidArgument("vm.id is required", reason=HandleReason.VM_ID_INVALID)
    if len(vm_id) > MAX_VM_ID:
        raise InvalidArgument(
            f"vm.id {vm_id[:16]!r}... ({len(vm_id)} chars) is not a VM id",
            reason=HandleReason.VM_ID_INVALID,
        )


def check_token(vm_id: str, owner: str, expected: bytes, given: bytes, caller: Caller) -> None:
    """Refuse `caller` acting on the VM unless it holds the VM's token (the host may omit it);
    a VMM must also be the one that created it (a token handed to another guest's VMM opens
    nothing for it, as a VM fd is of no use to another user's process)."""
    if not given:
        if caller.is_host:
            return
        raise PermissionDenied(
            f"{vm_id} is reachable only through the handle CreateVm returned to its creator "
            "(vm.token)",
            reason=HandleReason.VM_TOKEN_MISSING,
        )
    if not hmac.compare_digest(given, expected):
        raise PermissionDenied(
            f"vm.token is not the token of {vm_id}", reason=HandleReason.VM_TOKEN_WRONG
        )
    if not caller.is_host and owner and caller.name != owner:
        raise PermissionDenied(
            f"{vm_id} was created by another VMM", reason=HandleReason.VM_NOT_YOURS
        )
