"""kvm's Page State Change handling (kvm/exits/psc.py) in process, with rmp stood in for: what
each request sends to rmp and what it writes back into the descriptor, worked out here by hand
from KVM's rules.

KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc_msr() (one 4K page by the MSR protocol: PRIVATE or
SHARED, else an error), snp_begin_psc() (INVALID_HDR when end_entry is past the entries the
scratch area holds; nothing to do when cur_entry > end_entry; INVALID_ENTRY for cur_page >
npages or a GFN not aligned to npages; PSMASH/UNSMASH/others completed without acting) and
__snp_complete_one_psc() (an entry done gets cur_page = npages, and cur_entry moves on).
KERNEL: arch/x86/include/asm/sev-common.h VMGEXIT_PSC_ERROR_INVALID_HDR ((1 << 32) | 1),
VMGEXIT_PSC_ERROR_INVALID_ENTRY ((1 << 32) | 2), VMGEXIT_PSC_ERROR_GENERIC (0x100 << 32).
"""

from __future__ import annotations

import struct
from collections import Counter
from types import SimpleNamespace
from typing import Any

from snpemu.abi import ghcb as g
from snpemu.abi import psc
from snpemu.kvm.exits.outcome import ExitResult, ExitState
from snpemu.kvm.exits.psc import PageStateChanges, result_name
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.ports import RmpState
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.vm import Vcpu, Vm

ASID = 5
INVALID_HDR, INVALID_ENTRY, GENERIC = (1 << 32) | 1, (1 << 32) | 2, 0x100 << 32
GHCB_GPA = 0x7000
PRIVATE, SHARED, PSMASH = 1, 2, 3
PAGE_4K, PAGE_2M = False, True  # RmpState.size_2m


class Rmp:
    """Stands in for kvm's RmpPort (the two methods the PSC handler uses): rmpupdate() answers
    the code `fail` gives its SPA (0 by default); the session batch answers the codes `codes`
    gives for its entries (all 0 by default)."""

    def __init__(self, fail: dict[int, int] | None = None, codes: bytes | None = None) -> None:
        self.fail = fail or {}
        self.codes = codes
        self.unary: list[tuple[int, bool, int, int, int]] = []
        self.batches: list[bytes] = []
        self.psmashes: list[int] = []

    async def rmpupdate(self, spa: int, state: RmpState) -> int:
        self.unary.append((spa, state.assigned, state.gpa, state.asid, state.size_2m))
        return self.fail.get(spa, 0)

    async def session_rmpupdate_batch(self, entries: bytes) -> bytes:
        n = len(entries) // 24
        self.batches.append(bytes(entries))
        codes, self.codes = self.codes, None  # a retry of the batch finds what it changed
        return codes or bytes(n)

    async def psmash(self, spa: int) -> int:
        """The 2M entry at spa split: its pages' updates no longer fail."""
        self.psmashes.append(spa)
        for page in [p for p in self.fail if p & ~((2 << 20) - 1) == spa]:
            del self.fail[page]
        return 0


def handler(rmp: Rmp) -> tuple[PageStateChanges, Any]:
    kvm = SimpleNamespace(
        rmp=rmp, counters=SimpleNamespace(psc_pages=Counter(), psc_requests=Counter())
    )
    return PageStateChanges(kvm, HostAccess(rmp)), kvm  # type: ignore[arg-type]


def vm() -> Vm:
    v = Vm("vm-psc", ASID, None, Throttle())
    v.memslots.add(0, list(range(0x100, 0x110)))  # GPA 0..64 KiB -> frames 0x100..
    v.memslots.add(2 << 20, list(range(0x400, 0x600)))  # a 2M GPA range on a 2M-aligned frame run
    v.memslots.add(6 << 20, list(range(0x901, 0xB01)))  # 2M GPA range, frames not 2M-aligned
    return v


def entry(cur_page: int, gfn: int, op: int, size_2m: bool = False, reserved: int = 0) -> int:
    """struct psc_entry: cur_page 11:0, gfn 51:12, operation 55:52, pagesize 56, reserved 63:57."""
    return cur_page | gfn << 12 | op << 52 | int(size_2m) << 56 | reserved << 57


def descriptor(cur: int, end: int, entries: list[int], reserved: int = 0) -> psc.Descriptor:
    raw = struct.pack("<HHI", cur, end, reserved) + struct.pack(f"<{len(entries)}Q", *entries)
    return psc.Descriptor.decode(raw + bytes(8 * (psc.MAX_ENTRIES - len(entries))))


def rmp_state(spa: int, gpa: int, assigned: bool, asid: int) -> bytes:
    """KERNEL: arch/x86/include/asm/sev.h struct rmp_state after the u64 SPA (4K, not immutable)."""
    return struct.pack("<QQBBBBI", spa, gpa, int(assigned), 0, 0, 0, asid)


# --- the MSR protocol ----------------------------------------------------------------------------


async def test_msr_private_and_shared_are_one_4k_rmpupdate() -> None:
    rmp = Rmp()
    h, kvm = handler(rmp)
    assert await h.msr(vm(), 0x3, PRIVATE) is True
    assert await h.msr(vm(), 0x4, SHARED) is True
    assert rmp.unary == [
        (0x103 << 12, True, 0x3000, ASID, PAGE_4K),
        (0x104 << 12, False, 0, 0, PAGE_4K),
    ]
    assert kvm.counters.psc_pages == Counter({("private", "4k"): 1, ("shared", "4k"): 1})


async def test_msr_refuses_other_operations_unmapped_gfns_and_failed_updates() -> None:
    rmp = Rmp(fail={0x105 << 12: 3})
    h, kvm = handler(rmp)
    assert await h.msr(vm(), 0x3, PSMASH) is False
    assert await h.msr(vm(), 0x3, 0) is False
    assert await h.msr(vm(), 0x10, PRIVATE) is False  # GPA 64 KiB: outside the memslots
    assert rmp.unary == []
    assert await h.msr(vm(), 0x5, PRIVATE) is False  # RMPUPDATE failed
    assert len(rmp.unary) == 1 and kvm.counters.psc_pages == Counter()


# --- snp_begin_psc() -----------------------------------------------------------------------------


async def test_an_end_entry_past_the_buffer_is_invalid_hdr() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    d = descriptor(0, 253, [entry(0, 1, PRIVATE)])
    assert await h.apply(vm(), d, ExitState(speculate=False)) == INVALID_HDR
    assert (d.cur_entry, d.entries[0].cur_page) == (0, 0) and rmp.batches == []
    # 252, the last entry of a full buffer, is a valid end
    d = descriptor(252, 252, [0] * 252 + [entry(0, 1, PRIVATE)])
    assert await h.apply(vm(), d, ExitState(speculate=False)) == 0
    assert d.cur_entry == 253 and d.entries[252].cur_page == 1


async def test_cur_entry_past_end_entry_does_nothing() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    d = descriptor(2, 1, [entry(0, 1, PRIVATE)] * 3)
    assert await h.apply(vm(), d, ExitState(speculate=False)) == 0
    assert d.cur_entry == 2 and [e.cur_page for e in d.entries[:3]] == [0, 0, 0]
    assert rmp.batches == [] and rmp.unary == []


async def test_4k_entries_go_as_one_batch_and_complete() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    entries = [entry(0, 0, SHARED), entry(0, 2, PRIVATE, reserved=0x41), entry(0, 9, PSMASH)]
    entries.append(entry(0, 1, PRIVATE))  # past end_entry: left alone
    d = descriptor(0, 2, entries)
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == 0
    assert rmp.batches == [
        rmp_state(0x100 << 12, 0, False, 0) + rmp_state(0x102 << 12, 0x2000, True, ASID)
    ]
    assert d.cur_entry == 3
    assert [e.cur_page for e in d.entries[:4]] == [1, 1, 1, 0]
    assert d.entries[1].reserved == 0x41  # as the guest wrote it
    assert state.psc_pages == Counter({("private", "4k"): 1, ("shared", "4k"): 1})


async def test_the_loop_starts_at_cur_entry_and_cur_page() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    # entry 0 is before cur_entry; entry 1 is a 2M entry already 510 pages in
    d = descriptor(1, 1, [entry(0, 3, PRIVATE), entry(510, 0x200, SHARED, size_2m=True)])
    assert await h.apply(vm(), d, ExitState(speculate=False)) == 0
    # two 4K pages (510, 511) of the 2M range at GPA 2 MiB (frames 0x400..), no 2M RMPUPDATE
    assert rmp.unary == []
    assert rmp.batches == [
        rmp_state(0x5FE << 12, 0, False, 0) + rmp_state(0x5FF << 12, 0, False, 0)
    ]
    assert (d.cur_entry, d.entries[0].cur_page, d.entries[1].cur_page) == (2, 0, 512)


async def test_a_2m_entry_on_a_2m_mapping_is_one_2m_rmpupdate() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    d = descriptor(0, 0, [entry(0, 0x200, PRIVATE, size_2m=True)])
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == 0
    assert rmp.unary == [(0x400 << 12, True, 2 << 20, ASID, PAGE_2M)]
    assert rmp.batches == [] and d.entries[0].cur_page == 512 and d.cur_entry == 1
    assert state.psc_pages == Counter({("private", "2m"): 1})


async def test_a_2m_entry_falls_back_to_4k_pages() -> None:
    # a range whose frames are not 2M-aligned: 512 4K RMPUPDATEs in one batch
    rmp = Rmp()
    h, _ = handler(rmp)
    d = descriptor(0, 0, [entry(0, 0x600, SHARED, size_2m=True)])
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == 0
    assert rmp.unary == []
    assert rmp.batches == [b"".join(rmp_state((0x901 + i) << 12, 0, False, 0) for i in range(512))]
    assert d.entries[0].cur_page == 512 and state.psc_pages == Counter({("shared", "4k"): 512})
    # the 2M RMPUPDATE refused (e.g. FAIL_OVERLAP): the same range page by page
    rmp = Rmp(fail={0x400 << 12: 7})
    h, _ = handler(rmp)
    d = descriptor(0, 0, [entry(0, 0x200, PRIVATE, size_2m=True)])
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == 0
    assert len(rmp.unary) == 1
    assert rmp.batches == [
        b"".join(rmp_state((0x400 + i) << 12, (2 << 20) + i * 4096, True, ASID) for i in range(512))
    ]
    assert state.psc_pages == Counter({("private", "4k"): 512})


async def test_an_invalid_entry_stops_the_loop_there() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    # entry 1: a 2M entry at a GFN not 2M-aligned
    entries = [entry(0, 1, PRIVATE), entry(0, 0x201, PRIVATE, size_2m=True), entry(0, 2, PRIVATE)]
    d = descriptor(0, 2, entries)
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == INVALID_ENTRY
    assert rmp.batches == [rmp_state(0x101 << 12, 0x1000, True, ASID)]  # the entry before it
    assert d.cur_entry == 1 and [e.cur_page for e in d.entries[:3]] == [1, 0, 0]
    # cur_page 2 on a 4K entry (npages 1) is invalid; cur_page 1 is not (it is done)
    d = descriptor(0, 1, [entry(1, 1, PRIVATE), entry(2, 2, SHARED)])
    assert await h.apply(vm(), d, ExitState(speculate=False)) == INVALID_ENTRY
    assert d.cur_entry == 1 and [e.cur_page for e in d.entries[:2]] == [1, 2]


async def test_an_unmapped_gfn_is_generic_at_that_entry() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    entries = [entry(0, 1, SHARED), entry(0, 0x10, PRIVATE), entry(0, 2, PRIVATE)]
    d = descriptor(0, 2, entries)
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == GENERIC
    assert rmp.batches == [rmp_state(0x101 << 12, 0, False, 0)]
    assert d.cur_entry == 1 and [e.cur_page for e in d.entries[:3]] == [1, 0, 0]
    assert state.psc_pages == Counter({("shared", "4k"): 1})


async def test_a_failed_page_stops_progress_at_that_page() -> None:
    # the third page of the batch (entry 1's page 1) fails; later pages are not counted
    rmp = Rmp(codes=bytes([0, 0, 6, 0, 0]))
    h, _ = handler(rmp)
    entries = [
        entry(0, 1, PRIVATE),
        entry(0x1FE, 0x200, SHARED, size_2m=True),  # pages 510, 511 of a 2M entry
        entry(0, 0x9, PSMASH),
        entry(0, 3, SHARED),
    ]
    d = descriptor(0, 3, entries)
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == GENERIC
    assert d.cur_entry == 1
    assert [e.cur_page for e in d.entries[:4]] == [1, 0x1FF, 0, 0]
    assert state.psc_pages == Counter({("private", "4k"): 1, ("shared", "4k"): 1})
    # the same with the failure on the first page of entry 0
    rmp = Rmp(codes=bytes([9, 0]))
    h, _ = handler(rmp)
    d = descriptor(0, 1, [entry(0, 1, PRIVATE), entry(0, 2, PRIVATE)])
    state = ExitState(speculate=False)
    assert await h.apply(vm(), d, state) == GENERIC
    assert (d.cur_entry, d.entries[0].cur_page, d.entries[1].cur_page) == (0, 0, 0)
    assert state.psc_pages == Counter()


async def test_a_speculating_exit_sends_no_rpc_and_known_codes_are_used() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    d = descriptor(0, 1, [entry(0, 1, PRIVATE), entry(0, 2, SHARED)])
    state = ExitState(speculate=True)
    assert await h.apply(vm(), d, state) == 0
    assert rmp.batches == [] and state.batch is not None
    assert bytes(state.batch.entries) == rmp_state(0x101 << 12, 0x1000, True, ASID) + rmp_state(
        0x102 << 12, 0, False, 0
    )
    assert d.cur_entry == 2 and state.psc_pages == Counter(
        {("private", "4k"): 1, ("shared", "4k"): 1}
    )
    # handled again with the codes rmp really answered: the second page failed
    d = descriptor(0, 1, [entry(0, 1, PRIVATE), entry(0, 2, SHARED)])
    state = ExitState(speculate=False, codes=bytes([0, 1]))
    assert await h.apply(vm(), d, state) == GENERIC
    assert rmp.batches == [] and (d.cur_entry, d.entries[0].cur_page, d.entries[1].cur_page) == (
        1,
        1,
        0,
    )


async def test_a_page_to_share_under_a_2m_entry_is_psmashed_first() -> None:
    """KERNEL (the v5 series): snp_make_page_shared(): a 4K page of an existing 2M RMP entry is
    split with PSMASH before it is made shared; RMPUPDATE of it alone fails with FAIL_OVERLAP
    (arch/x86/include/asm/sev.h RMPUPDATE_FAIL_OVERLAP, 4). A private page is not split."""
    rmp = Rmp(codes=bytes([4, 4]))  # both 4K updates hit a 2M entry
    h, _ = handler(rmp)
    d = descriptor(0, 1, [entry(0, 0x201, SHARED), entry(0, 0x202, PRIVATE)])
    assert await h.apply(vm(), d, ExitState(speculate=False)) == GENERIC
    assert rmp.psmashes == [0x400 << 12]  # the 2M-aligned head of frame 0x401, once
    assert rmp.batches[1] == rmp_state(0x401 << 12, 0, False, 0)  # the shared page again
    assert (d.cur_entry, d.entries[0].cur_page, d.entries[1].cur_page) == (1, 1, 0)
    # the MSR protocol's one page likewise
    rmp = Rmp(fail={0x105 << 12: 4})
    h, _ = handler(rmp)
    assert await h.msr(vm(), 0x5, SHARED) is True
    assert rmp.psmashes == [0] and len(rmp.unary) == 2  # frame 0x105: the 2M range from 0


# --- the PSC exit: the descriptor in the GHCB's shared buffer ------------------------------------


async def exit_with(
    desc: bytes, offset: int = 0, speculate: bool = True
) -> tuple[Any, Rmp, ExitState, bytes]:
    rmp = Rmp()
    h, _ = handler(rmp)
    ghcb = g.Ghcb()
    ghcb.shared[offset : offset + len(desc)] = desc
    ghcb.set("sw_scratch", GHCB_GPA + 0x800 + offset)
    before = bytes(ghcb.shared)
    state = ExitState(speculate=speculate)
    vcpu = Vcpu(0, b"t", ghcb_gpa=GHCB_GPA)
    return await h.exit(vm(), vcpu, ghcb, state), rmp, state, before


async def test_a_scratch_area_outside_the_ghcb_is_malformed() -> None:
    rmp = Rmp()
    h, _ = handler(rmp)
    ghcb = g.Ghcb()
    ghcb.set("sw_scratch", 0x20000)  # guest memory, not the GHCB's shared buffer
    out = await h.exit(vm(), Vcpu(0, b"t", ghcb_gpa=GHCB_GPA), ghcb, ExitState())
    assert out == (ExitResult(2, 3), {}, None)  # MALFORMED_INPUT, GHCB_ERR_INVALID_SCRATCH_AREA
    ghcb.set("sw_scratch", GHCB_GPA + 0xFF0 - 4)  # in the GHCB, but no room for the header
    out = await h.exit(vm(), Vcpu(0, b"t", ghcb_gpa=GHCB_GPA), ghcb, ExitState())
    assert out == (ExitResult(2, 3), {}, None)
    # no GHCB registered: the page of GPA 0 is not where SW_SCRATCH points
    out = await h.exit(vm(), Vcpu(0, b"t"), ghcb, ExitState())
    assert out == (ExitResult(2, 3), {}, None)


async def test_the_common_request_is_planned_and_written_back() -> None:
    raw = struct.pack("<HHI", 0, 1, 0xAB) + struct.pack(
        "<2Q", entry(0, 1, PRIVATE), entry(0, 2, SHARED)
    )
    (result, regs, buf), rmp, state, before = await exit_with(raw, offset=16)
    assert (result, regs) == (ExitResult(0, 0), {})
    want = bytearray(before)
    want[16:40] = struct.pack("<HHI", 2, 1, 0xAB) + struct.pack(
        "<2Q", entry(1, 1, PRIVATE), entry(1, 2, SHARED)
    )
    assert bytes(buf) == bytes(want)
    assert state.batch is not None and rmp.batches == []
    assert bytes(state.batch.entries) == rmp_state(0x101 << 12, 0x1000, True, ASID) + rmp_state(
        0x102 << 12, 0, False, 0
    )
    assert state.psc_pages == Counter({("private", "4k"): 1, ("shared", "4k"): 1})
    assert state.psc_requests == Counter({("ghcb", "success"): 1})


async def test_a_request_of_operations_kvm_only_completes_sends_no_batch() -> None:
    raw = struct.pack("<HHI", 0, 1, 0) + struct.pack("<2Q", entry(0, 1, PSMASH), entry(0, 2, 0))
    (result, _, buf), _, state, _ = await exit_with(raw)
    assert result == ExitResult(0, 0) and state.batch is None
    assert bytes(buf[:24]) == struct.pack("<HHI", 2, 1, 0) + struct.pack(
        "<2Q", entry(1, 1, PSMASH), entry(1, 2, 0)
    )
    assert state.psc_pages == Counter() and state.psc_requests == Counter({("ghcb", "success"): 1})


async def test_a_2m_request_goes_through_the_loop_and_stops_speculating() -> None:
    raw = struct.pack("<HHI", 0, 1, 0) + struct.pack(
        "<2Q", entry(0, 0x200, PRIVATE, size_2m=True), entry(0, 3, SHARED)
    )
    (result, _, buf), rmp, state, before = await exit_with(raw, offset=8)
    assert result == ExitResult(0, 0) and state.speculate is False
    assert rmp.unary == [(0x400 << 12, True, 2 << 20, ASID, PAGE_2M)]
    assert rmp.batches == [rmp_state(0x103 << 12, 0, False, 0)]
    want = bytearray(before)
    want[8:32] = struct.pack("<HHI", 2, 1, 0) + struct.pack(
        "<2Q", entry(512, 0x200, PRIVATE, size_2m=True), entry(1, 3, SHARED)
    )
    assert bytes(buf) == bytes(want)
    assert state.psc_requests == Counter({("ghcb", "success"): 1})


async def test_a_refused_request_is_counted_by_its_result() -> None:
    raw = struct.pack("<HHI", 0, 300, 0) + struct.pack("<Q", entry(0, 1, PRIVATE))
    (result, _, buf), rmp, state, before = await exit_with(raw)
    assert result == ExitResult(0, INVALID_HDR) and bytes(buf) == before
    assert state.psc_requests == Counter({("ghcb", "invalid_hdr"): 1}) and rmp.batches == []
    # a 4K request the plan does not take (an unmapped GFN): the loop answers GENERIC
    raw = struct.pack("<HHI", 0, 0, 0) + struct.pack("<Q", entry(0, 0x10, PRIVATE))
    (result, _, _), _, state, _ = await exit_with(raw, speculate=False)
    assert result == ExitResult(0, GENERIC)
    assert state.psc_requests == Counter({("ghcb", "generic"): 1})


def test_result_names() -> None:
    assert [result_name(r) for r in (0, INVALID_HDR, INVALID_ENTRY, GENERIC, 7)] == [
        "success",
        "invalid_hdr",
        "invalid_entry",
        "generic",
        "generic",
    ]


async def test_counts_add_up_over_requests_and_entries() -> None:
    rmp = Rmp()
    h, kvm = handler(rmp)
    assert await h.msr(vm(), 0x3, PRIVATE) and await h.msr(vm(), 0x4, PRIVATE)
    assert kvm.counters.psc_pages == Counter({("private", "4k"): 2})
    # two 2M entries in one descriptor: two 2M page changes
    v = vm()
    v.memslots.add(4 << 20, list(range(0x800, 0xA00)))  # a second 2M-aligned run
    d = descriptor(0, 1, [entry(0, 0x200, PRIVATE, True), entry(0, 0x400, PRIVATE, True)])
    state = ExitState(speculate=False)
    assert await h.apply(v, d, state) == 0
    assert state.psc_pages == Counter({("private", "2m"): 2})


async def test_a_descriptor_at_an_unaligned_offset_is_planned_the_same() -> None:
    """setup_vmgexit_scratch() asks no alignment of SW_SCRATCH: the descriptor may start at any
    byte of the shared buffer."""
    raw = struct.pack("<HHI", 0, 0, 0) + struct.pack("<Q", entry(0, 1, PRIVATE))
    (result, _, buf), _, state, before = await exit_with(raw, offset=3)
    assert result == ExitResult(0, 0) and state.batch is not None
    want = bytearray(before)
    want[3:19] = struct.pack("<HHI", 1, 0, 0) + struct.pack("<Q", entry(1, 1, PRIVATE))
    assert bytes(buf) == bytes(want)


async def test_end_entry_253_of_a_full_buffer_is_invalid_hdr() -> None:
    # the shared buffer at offset 0 holds (2032 - 8) / 8 = 253 entries: 0..252
    raw = struct.pack("<HHI", 0, 253, 0) + struct.pack("<Q", entry(0, 1, PRIVATE))
    (result, _, buf), _, state, before = await exit_with(raw)
    assert result == ExitResult(0, INVALID_HDR) and bytes(buf) == before and state.batch is None
