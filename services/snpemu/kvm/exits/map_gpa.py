"""A gmem VM's Page State Change: forwarded to the VMM as KVM_HC_MAP_GPA_RANGE exits.

What merged keeps no page state of its own for a PSC: KVM turns the guest's request into
KVM_EXIT_HYPERCALL exits (kvm_run.hypercall: nr KVM_HC_MAP_GPA_RANGE, args[0] the GPA, args[1]
the pages, args[2] the ENCRYPTED/DECRYPTED and page-size bits), one range at a time; the VMM
changes the memory attributes (KVM_SET_MEMORY_ATTRIBUTES) and re-enters KVM_RUN with
hypercall.ret, and KVM's completion callback answers the guest or forwards the next range. The
RMP changes later, when guest_memfd prepares or invalidates the pages (kvm/gmem_rmp.py).
KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc_msr(), snp_complete_psc_msr(), snp_begin_psc(),
snp_complete_one_psc(), __snp_complete_one_psc(), snp_complete_psc()

The functions here are KVM's, on the descriptor as the GHCB holds it (abi/psc.py); where the
pending exit is kept between the exit and the VMM's RunVcpu is kvm/exits/dispatch.py's and
msr.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.abi import msr_protocol as msr
from snpemu.abi import psc
from snpemu.abi.addr import Spa, gfn_to_gpa
from snpemu.kvm.uapi import (
    KVM_EXIT_HYPERCALL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
)
from snpemu.kvm.vm import Vm


@dataclass(frozen=True)
class Hypercall:
    """kvm_run.hypercall of a KVM_EXIT_HYPERCALL exit (KERNEL: include/uapi/linux/kvm.h)."""

    nr: int
    args: tuple[int, ...]
    flags: int = 0
    exit_reason: int = KVM_EXIT_HYPERCALL


NO_HYPERCALL = Hypercall(0, ())


def map_gpa_range(gpa: int, npages: int, private: bool, size_2m: bool) -> Hypercall:
    attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED
    attrs |= KVM_MAP_GPA_RANGE_PAGE_SZ_2M if size_2m else KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    return Hypercall(KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs, 0, 0, 0))


def exits_enabled(vm: Vm) -> bool:
    """KVM_CAP_EXIT_HYPERCALL enabled KVM_HC_MAP_GPA_RANGE (kvm->arch.hypercall_exit_enabled)."""
    return bool(vm.hypercall_exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE))


# --- the MSR protocol's one page -------------------------------------------------------------


@dataclass
class MsrPending:
    """An MSR-protocol PSC out in the VMM."""

    hypercall: Hypercall


def begin_msr(vm: Vm, gfn: int, op: int) -> Hypercall | None:
    """The exit for GHCB_MSR_PSC_REQ, or None when KVM answers GHCB_MSR_PSC_RESP_ERROR at once
    (an operation other than PRIVATE/SHARED, or the exit not enabled). KERNEL: snp_begin_psc_msr()
    """
    if op not in psc.STATE_CHANGES or not exits_enabled(vm):
        return None
    return map_gpa_range(gfn_to_gpa(gfn), 1, op == psc.Op.PRIVATE, size_2m=False)


def complete_msr(ret: int) -> int:
    """The GHCB MSR once the VMM answered. KERNEL: snp_complete_psc_msr()

    UNVERIFIED(map-gpa-ret): any nonzero hypercall.ret is the guest's error here; a 2026
    series ("KVM: SEV: Restrict userspace return codes for KVM_HC_MAP_GPA_RANGE") fails
    KVM_RUN with -EINVAL for a value other than 0, EINVAL or EAGAIN."""
    return msr.PSC_GENERIC_ERROR if ret else msr.PSC_RESP


# --- the GHCB descriptor ---------------------------------------------------------------------


@dataclass
class GhcbPending:
    """A GHCB PSC out in the VMM: the GHCB as KVM keeps it mapped across the exit (the page as
    read, the shared buffer being updated, where the descriptor starts in it) and the entries
    in flight (svm->sev_es.psc_idx, psc_inflight)."""

    hypercall: Hypercall
    page: bytes
    spa: Spa
    shared: bytearray
    offset: int
    idx: int
    inflight: int
    inline: bool = False  # the guest's VMGEXIT carried the GHCB (kvm.proto VmgexitRequest.ghcb)

    def descriptor(self) -> psc.Descriptor:
        return psc.Descriptor.decode(bytes(self.shared[self.offset :]))

    def store(self, desc: psc.Descriptor) -> None:
        view = bytearray(self.shared[self.offset :])
        desc.encode_into(view)
        self.shared[self.offset :] = view[: len(self.shared) - self.offset]


@dataclass(frozen=True)
class Forward:
    """The next range goes to the VMM: entries idx .. idx+inflight-1."""

    hypercall: Hypercall
    idx: int
    inflight: int


def begin(vm: Vm, desc: psc.Descriptor) -> Forward | int:
    """The next range to forward, or the PSC's answer (sw_exit_info_2) when nothing is left;
    advances the descriptor as KVM does. KERNEL: snp_begin_psc()"""
    if not exits_enabled(vm):
        return psc.PSC_ERROR_GENERIC
    while True:  # KVM's `next_range:`
        if not psc.check_header(desc):
            return psc.PSC_ERROR_INVALID_HDR
        idx, idx_end = desc.cur_entry, desc.end_entry
        # the start of the next range that needs processing; skipped entries advance cur_entry
        while idx <= idx_end:
            start = desc.entries[idx]
            gfn, huge, npages = start.gfn, start.size_2m, start.npages
            if not psc.check_entry(start):
                return psc.PSC_ERROR_INVALID_ENTRY
            if start.cur_page:
                # a partly done 2M entry is finished 4K at a time
                npages -= start.cur_page
                gfn += start.cur_page
                huge = False
            if npages:
                break
            idx += 1
            desc.cur_entry += 1
        if idx > idx_end:
            return 0
        first, inflight = idx, 1
        # later entries of adjacent GPAs and the same operation go in the same exit; KVM
        # compares with the first entry's own gfn plus the pages counted so far
        while (idx := idx + 1) <= idx_end:
            e = desc.entries[idx]
            if e.op != start.op or e.gfn != start.gfn + npages or e.cur_page or e.size_2m != huge:
                break
            inflight += 1
            npages += 512 if huge else 1
        if start.op in psc.STATE_CHANGES:
            # the page-size bit is the first entry's own, even when it is finished 4K
            hc = map_gpa_range(gfn_to_gpa(gfn), npages, start.op == psc.Op.PRIVATE, start.size_2m)
            return Forward(hc, first, inflight)
        # PSMASH, UNSMASH and undefined operations: the range is complete without an exit
        complete_one(desc, first, inflight)


def complete_one(desc: psc.Descriptor, idx: int, inflight: int) -> None:
    """The entries in flight marked done. KERNEL: __snp_complete_one_psc()"""
    for i in range(idx, idx + inflight):
        desc.entries[i].cur_page = desc.entries[i].npages
    desc.cur_entry = idx + inflight


def resume(vm: Vm, desc: psc.Descriptor, idx: int, inflight: int, ret: int) -> Forward | int:
    """After the VMM answered the range in flight: the next range, or the PSC's answer.
    KERNEL: snp_complete_one_psc() (UNVERIFIED(map-gpa-ret) as complete_msr())"""
    if ret:
        return psc.PSC_ERROR_GENERIC
    complete_one(desc, idx, inflight)
    return begin(vm, desc)
