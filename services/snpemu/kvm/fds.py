"""A VMM's open fds as kvm counts them: each VM, vCPU and guest_memfd it made is one, and as a
process it holds at most INR_OPEN_CUR of them; the next ioctl that would make one fails with
EMFILE and makes nothing. The host (VMs made with no VMM) is not counted.
KERNEL: include/uapi/linux/fs.h INR_OPEN_CUR (the default RLIMIT_NOFILE soft limit);
fs/file.c alloc_fd() (-EMFILE past it), which KVM_CREATE_VM, KVM_CREATE_VCPU and
KVM_CREATE_GUEST_MEMFD reach through get_unused_fd_flags() before anything is made.
"""

from __future__ import annotations

from collections.abc import Iterable

from snpemu.errors import ResourceExhausted
from snpemu.kvm.gmem import GuestMemfds
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.uapi import Errno, refuse
from snpemu.kvm.vm import Vm

INR_OPEN_CUR = 1024


def open_fds(vms: Iterable[Vm], gmems: GuestMemfds, owner: str) -> int:
    mine = [vm for vm in vms if vm.owner == owner]
    held = sum(1 for g in gmems.by_fd.values() if g.owner == owner)
    return len(mine) + sum(len(vm.vcpus) for vm in mine) + held


def check_room(vms: Iterable[Vm], gmems: GuestMemfds, owner: str, new: int = 1) -> None:
    """`new` more fds for the VMM `owner`, or EMFILE."""
    if not owner:
        return
    have = open_fds(vms, gmems, owner)
    if have + new > INR_OPEN_CUR:
        raise refuse(
            ResourceExhausted,
            Errno.EMFILE,
            f"{owner} holds {have} fds (VMs, vCPUs, guest_memfds); {new} more would pass "
            f"{INR_OPEN_CUR} (RLIMIT_NOFILE)",
            reason=KvmReason.TOO_MANY_FDS,
        )
