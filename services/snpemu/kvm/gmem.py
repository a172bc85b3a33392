"""guest_memfds: a VM's private memory, made by KVM_CREATE_GUEST_MEMFD and bound to memslots.

A guest_memfd holds which of its pages each memslot binds and the frames it has taken: none
when it is made, a chunk's when a page of it is first used (kvm/faultin.py), as the kernel's
file gets a folio when kvm_gmem_get_pfn() first asks for one. Its fd is kvm-wide, as fds are a
process's: only the caller that made it can name it, as another process cannot use an fd it
was not handed.
KERNEL: virt/kvm/guest_memfd.c kvm_gmem_create(), kvm_gmem_bind(), kvm_gmem_unbind(),
kvm_gmem_get_folio()

UNVERIFIED(gmem-chunk): frames are taken 2 MiB (one 2M-aligned extent) at a time, where the
kernel takes a 4K folio per page: a 2 MiB guest range stays 2M-contiguous in host memory, so
2M RMP entries and PVALIDATEs work as on hugepage-backed memory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from snpemu.abi.addr import PAGES_PER_2M, Pfn, page_bytes, pages
from snpemu.errors import InvalidArgument, NotFound
from snpemu.kvm.uapi import Errno, refuse


@dataclass
class GuestMemfd:
    fd: int
    vm_id: str
    owner: str  # the caller that made it ("" for the host)
    npages: int
    # slot id -> (first page, pages) of the binding
    bindings: dict[int, tuple[int, int]] = field(default_factory=dict)
    # chunk (PAGES_PER_2M pages from chunk * PAGES_PER_2M) -> its frames, once taken
    chunks: dict[int, list[Pfn]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return page_bytes(self.npages)

    def chunk_pages(self, chunk: int) -> int:
        """How many pages the chunk holds (the last one may be short)."""
        return min(PAGES_PER_2M, self.npages - chunk * PAGES_PER_2M)

    def pfns(self) -> list[Pfn]:
        """Every frame it has taken."""
        return [p for c in sorted(self.chunks) for p in self.chunks[c]]

    def bind(self, slot: int, offset: int, size: int) -> None:
        """[offset, offset+size) bound to the slot. KERNEL: kvm_gmem_bind()"""
        if offset + size > self.size:
            raise refuse(
                InvalidArgument,
                Errno.EINVAL,
                f"guest_memfd_offset {offset:#x} + memory_size {size:#x} is past the end of "
                f"guest_memfd {self.fd} ({self.size:#x} bytes)",
            )
        first, count = pages(offset), pages(size)
        for other, (f, n) in self.bindings.items():
            if f < first + count and first < f + n:
                # KERNEL: kvm_gmem_bind() xa_find() on the bindings: -EINVAL, not -EEXIST
                raise refuse(
                    InvalidArgument,
                    Errno.EINVAL,
                    f"pages {first:#x}..{first + count - 1:#x} of guest_memfd {self.fd} overlap "
                    f"those memslot {other} binds",
                )
        self.bindings[slot] = (first, count)

    def unbind(self, slot: int) -> None:
        self.bindings.pop(slot, None)


class GuestMemfds:
    def __init__(self) -> None:
        self.by_fd: dict[int, GuestMemfd] = {}
        # fds count up as a process's do; 0..2 are the standard streams
        self._next = itertools.count(3)

    def add(self, vm_id: str, owner: str, npages: int) -> GuestMemfd:
        g = GuestMemfd(next(self._next), vm_id, owner, npages)
        self.by_fd[g.fd] = g
        return g

    def get(self, fd: int, vm_id: str, caller: str, is_host: bool) -> GuestMemfd:
        """The guest_memfd `caller` names by fd for the VM. KERNEL: kvm_gmem_bind(): fget()
        fails (-EBADF), or the file is another VM's (-EINVAL)."""
        g = self.by_fd.get(fd)
        if g is None or not (is_host or g.owner == caller):
            err = refuse(NotFound, Errno.EBADF, f"guest_memfd {fd} is not an fd of this caller")
            raise err
        if g.vm_id != vm_id:
            raise refuse(InvalidArgument, Errno.EINVAL, f"guest_memfd {fd} belongs to another VM")
        return g

    def remove(self, fd: int) -> GuestMemfd | None:
        return self.by_fd.pop(fd, None)
