"""What kvm keeps per VM and per vCPU (the parts of struct kvm / kvm_sev_info it models)."""

from __future__ import annotations

import asyncio
import bisect
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from snpemu.abi.addr import PAGES_PER_2M, PMD_SIZE, Pfn, Spa, page_bytes, pfn_to_spa
from snpemu.kvm.attributes import PrivateRanges
from snpemu.kvm.config import VmConfig
from snpemu.kvm.handles import new_token
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.uapi import GHCB_VERSION_DEFAULT, KVM_X86_SNP_VM
from snpemu.vmm.memory_layout import E820Entry

if TYPE_CHECKING:
    from snpemu.kvm.exits.map_gpa import GhcbPending, MsrPending

NO_PAGE = Spa(0)  # a page not (yet) taken


class MemoryModel(enum.IntEnum):
    """Which SNP VM it is; values match snp.kvm.v1.MemoryModel."""

    GMEM = 1  # what merged: page-state changes go to the VMM (kvm/exits/map_gpa.py)
    V5 = 2  # the 2021 v5 host series: kvm makes them itself with RMPUPDATE (kvm/exits/psc.py)


class VmState(enum.IntEnum):
    """Values match snp.kvm.v1.VmState."""

    CREATED = 1
    LAUNCHING = 2
    RUNNING = 3
    TERMINATED = 4
    DESTROYED = 5


@dataclass(frozen=True)
class Run:
    """npages 4K frames from first_pfn back GPAs from gpa (one piece of a memslot)."""

    gpa: int
    first_pfn: int
    npages: int


class Memslots:
    """GPA -> host frame, as KVM memslots plus guest_memfd back a VM's memory."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._starts: list[int] = []
        empty = np.zeros(0, dtype=np.int64)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] = (empty, empty, empty)

    def add(self, gpa: int, pfns: Sequence[int]) -> list[Run]:
        """Map consecutive GPAs from gpa to these frames; returns the runs added."""
        return self.add_many([(gpa, pfns)])[0]

    def add_many(self, pieces: Sequence[tuple[int, Sequence[int]]]) -> list[list[Run]]:
        """add() of each (gpa, frames), indexed once: the runs each added."""
        out: list[list[Run]] = []
        for gpa, pfns in pieces:
            added: list[Run] = []
            start = 0
            for i in range(1, len(pfns) + 1):
                if i == len(pfns) or pfns[i] != pfns[i - 1] + 1:
                    added.append(Run(gpa + page_bytes(start), pfns[start], i - start))
                    start = i
            for r in added:
                j = bisect.bisect_left(self._starts, r.gpa)
                self._starts.insert(j, r.gpa)
                self.runs.insert(j, r)
            out.append(added)
        self._index()
        return out

    def remove(self, runs: Sequence[Run]) -> None:
        """Take these runs (as add() returned them) out of the translation."""
        gone = set(runs)
        self.runs = [r for r in self.runs if r not in gone]
        self._starts = [r.gpa for r in self.runs]
        self._index()

    def _index(self) -> None:
        self._arrays = (
            np.array(self._starts, dtype=np.int64),
            np.array([r.gpa + page_bytes(r.npages) for r in self.runs], dtype=np.int64),
            np.array([pfn_to_spa(r.first_pfn) for r in self.runs], dtype=np.int64),
        )

    def translate_many(self, gpas: np.ndarray) -> np.ndarray:
        """translate() of an array of GPAs: the SPAs, -1 outside every memslot."""
        starts, ends, spas = self._arrays
        if not len(starts):
            return np.full(len(gpas), -1, dtype=np.int64)
        j = np.searchsorted(starts, gpas, side="right") - 1
        k = j.clip(0)
        inside = (j >= 0) & (gpas < ends[k])
        return np.where(inside, spas[k] + (gpas - starts[k]), -1)

    def translate(self, gpa: int) -> Spa | None:
        """The SPA backing gpa, or None outside every memslot."""
        j = bisect.bisect_right(self._starts, gpa) - 1
        if j < 0:
            return None
        r = self.runs[j]
        if gpa >= r.gpa + page_bytes(r.npages):
            return None
        return Spa(pfn_to_spa(r.first_pfn) + (gpa - r.gpa))

    def pfns(self) -> list[Pfn]:
        return [Pfn(r.first_pfn + i) for r in self.runs for i in range(r.npages)]

    def contiguous_2m(self, gpa: int) -> Spa | None:
        """The 2M-aligned SPA backing a 2M-aligned GPA range, if it is one contiguous piece."""
        tail = page_bytes(PAGES_PER_2M - 1)
        spa = self.translate(gpa)
        last = self.translate(gpa + tail)
        if spa is None or last is None or spa % PMD_SIZE or last != spa + tail:
            return None
        return spa


@dataclass
class UserMemslot:
    """A memslot as KVM_SET_USER_MEMORY_REGION2 made it (struct kvm_userspace_memory_region2),
    and the translation runs of its pages backed so far (kvm/faultin.py)."""

    slot: int
    flags: int
    gpa: int
    size: int
    userspace_addr: int
    gmem_fd: int
    gmem_offset: int
    runs: list[Run] = field(default_factory=list)

    def holds(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


@dataclass
class Vcpu:
    vcpu_id: int
    token: bytes
    ghcb_gpa: int | None = None  # registered with GHCB_MSR_REG_GPA_REQ
    vmsa_gpa: int | None = None  # AP creation
    runnable: bool = False
    kicks: int = 0
    # AP reset hold (KERNEL: sev.c ap_reset_hold_type, AP_RESET_HOLD_*): how the vCPU is held,
    # and whether a wake-up (AP creation) arrived since; see kvm/exits/ap.py reset_hold()
    reset_hold: int = 0
    hold_woken: bool = False
    # where it starts (CreateVcpu reset_eip; 0: the reset vector), and its VMSA once
    # SnpLaunchFinish measured it
    reset_eip: int = 0
    vmsa: Spa = NO_PAGE
    # the exit handed to the VMM that its next KVM_RUN completes (kvm/exits/map_gpa.py), as
    # vcpu->arch.complete_userspace_io; None when the vCPU is not out in the VMM
    pending: MsrPending | GhcbPending | None = None
    # a gmem VM's exits and the VMM's RunVcpu one at a time (KERNEL: vcpu->mutex)
    mutex: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


@dataclass
class Vm:
    vm_id: str
    asid: int
    config: VmConfig
    throttle: Throttle
    # the capability CreateVm hands its caller (kvm/handles.py), and the VMM that caller was
    # ("" for a VM the host made)
    token: bytes = field(default_factory=new_token, repr=False)
    owner: str = ""
    state: VmState = VmState.CREATED
    vm_type: int = KVM_X86_SNP_VM
    memory_model: MemoryModel = MemoryModel.V5
    # KVM_CAP_EXIT_HYPERCALL: the hypercalls that exit to the VMM (kvm->arch.hypercall_exit_enabled)
    hypercall_exit_enabled: int = 0
    # KVM_SEV_INIT2 done (KERNEL: sev.c sev_snp_guest(): sev->active with SNP)
    sev_active: bool = False
    ghcb_version: int = GHCB_VERSION_DEFAULT
    # the memslots (by slot id), the translation they make, and runs of a deleted or failed
    # slot that rmp might still map (DestroyVm unmaps them)
    slots: dict[int, UserMemslot] = field(default_factory=dict)
    memslots: Memslots = field(default_factory=Memslots)
    stale_runs: list[Run] = field(default_factory=list)
    # the fds of its guest_memfds (kvm/gmem.py)
    gmem_fds: list[int] = field(default_factory=list)
    attributes: PrivateRanges = field(default_factory=PrivateRanges)
    # the e820 table of a VM made with a config (vmm/memory_layout.py); () for one made alone
    e820: tuple[E820Entry, ...] = ()
    # the VM ioctls run one at a time (KERNEL: kvm->lock for KVM_MEMORY_ENCRYPT_OP,
    # kvm->slots_lock for memslots and attributes)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # backing memory on first use runs one at a time, inside `lock` when an ioctl does it
    # (KERNEL: the guest_memfd's filemap invalidate lock, kvm->mmu_lock)
    fault_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # set (under fault_lock) once its frames went back to the host: nothing is backed again
    backing_released: bool = False
    vcpus: dict[int, Vcpu] = field(default_factory=dict)
    gctx: Spa = NO_PAGE  # the guest context page, once SNP_ACTIVATE succeeded
    vmsa_pages: list[Spa] = field(default_factory=list)
    measurement: bytes = b""
    term_reason: tuple[int, int] = (0, 0)
    ap_jump_table: int = 0
    # guest-request bounce pages: request (hypervisor page), response (firmware page)
    bounce_req: Spa = NO_PAGE
    bounce_res: Spa = NO_PAGE
    sev_features: int = 0  # SEV_FEATURES of its VMSAs, SNP_ACTIVE included, from KVM_SEV_INIT2
    # CPUID(1).EAX of its vCPUs, fixed at creation: kvm's CPUID answer and the VMSA's RDX
    cpuid_signature: int = 0

    def in_memslot(self, gpa: int) -> bool:
        return any(s.holds(gpa) for s in self.slots.values())


def new_vm_id() -> str:
    # Unique across kvm restarts: rmp keeps vCPU identities by VM id.
    return f"vm-{uuid.uuid4().hex[:12]}"
