"""A gmem VM's GHCB PSC walked as KVM walks it (kvm/exits/map_gpa.py): forwarded range by
range, each answered 0, any descriptor KVM accepts ends with every entry done, and the pages
the VMM is asked to change are exactly the entries' own (for entries not partly done: KVM's
merge compares with the first entry's gfn, which misses for a partly done one).

KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(), snp_complete_one_psc(),
__snp_complete_one_psc(); the validity rules (check_entry, check_header) are abi/psc.py's.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import psc
from snpemu.kvm.exits import map_gpa
from snpemu.kvm.uapi import KVM_MAP_GPA_RANGE_ENCRYPTED

from tests.conftest import examples

VM: Any = SimpleNamespace(hypercall_exit_enabled=1 << 12)


@st.composite
def entries(draw: st.DrawFn, partial: bool) -> psc.Entry:
    huge = draw(st.booleans())
    n = 512 if huge else 1
    # gfns near each other, so that adjacent entries are common
    gfn = draw(st.integers(0, 8)) * n + (draw(st.integers(0, 4)) * 512 if not huge else 0)
    cur = draw(st.integers(0, n)) if partial else 0
    return psc.Entry(cur, gfn, draw(st.sampled_from([1, 2, 3, 4, 0, 9])), huge)


def walk(desc: psc.Descriptor) -> tuple[int, list[map_gpa.Hypercall]]:
    """The PSC to its end with every range answered 0: its result and the exits."""
    seen = []
    step = map_gpa.begin(VM, desc)
    while isinstance(step, map_gpa.Forward):
        seen.append(step.hypercall)
        assert len(seen) <= len(desc.entries), "a range was forwarded twice"
        step = map_gpa.resume(VM, desc, step.idx, step.inflight, 0)
    return step, seen


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(entries(partial=True), min_size=1, max_size=12), st.data())
def test_every_entry_ends_done(es: list[psc.Entry], data: st.DataObject) -> None:
    cur = data.draw(st.integers(0, len(es)))
    desc = psc.Descriptor(cur, len(es) - 1, 0, [psc.Entry(**vars(e)) for e in es])
    result, _ = walk(desc)
    assert result == 0
    assert desc.cur_entry == max(cur, len(es))
    assert all(e.cur_page == e.npages for e in desc.entries[cur:])
    assert [vars(e) for e in desc.entries[:cur]] == [vars(e) for e in es[:cur]]


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(entries(partial=False), min_size=1, max_size=12))
def test_the_vmm_is_asked_for_exactly_the_entries_pages(es: list[psc.Entry]) -> None:
    desc = psc.Descriptor(0, len(es) - 1, 0, es)
    wanted: Counter[tuple[int, bool]] = Counter()
    for e in es:
        if e.op in psc.STATE_CHANGES:
            for i in range(e.npages):
                wanted[(e.gfn + i, e.op == psc.Op.PRIVATE)] += 1
    _, seen = walk(desc)
    asked: Counter[tuple[int, bool]] = Counter()
    for hc in seen:
        gpa, npages, attrs = hc.args[:3]
        for i in range(npages):
            asked[(gpa // 4096 + i, bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED))] += 1
    assert asked == wanted


def test_a_bad_entry_stops_the_walk_with_invalid_entry() -> None:
    # KERNEL: snp_begin_psc(): a 2M entry whose gfn is not 2M aligned, after one skipped
    # (done) entry, which advances cur_entry before the refusal
    desc = psc.Descriptor(0, 1, 0, [psc.Entry(1, 7, 1, False), psc.Entry(0, 3, 2, True)])
    assert map_gpa.begin(VM, desc) == psc.PSC_ERROR_INVALID_ENTRY
    assert desc.cur_entry == 1


def test_without_the_exit_enabled_every_psc_is_generic() -> None:
    off: Any = SimpleNamespace(hypercall_exit_enabled=0)
    desc = psc.Descriptor(0, 0, 0, [psc.Entry(0, 7, 1, False)])
    assert map_gpa.begin(off, desc) == psc.PSC_ERROR_GENERIC
    assert map_gpa.begin_msr(off, 7, 1) is None
