"""kvm's array-planned 4K PSC against its entry-by-entry loop: the same RMPUPDATEs, the same
descriptor written back, the same page counts, for every request the plan takes."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from snpemu.abi import psc
from snpemu.abi.addr import PAGE_SIZE
from snpemu.kvm.exits import Exits
from snpemu.kvm.exits.outcome import ExitState
from snpemu.kvm.exits.psc import plan_4k
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.vm import Vm

from tests.conftest import examples

ASID = 9


class Host:
    """Stands in for kvm's RmpPort (the session batch the PSC loop sends): every RMPUPDATE
    succeeds; the batches are kept."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []

    async def session_rmpupdate_batch(self, entries: bytes) -> bytes:
        self.batches.append(bytes(entries))
        return bytes(len(entries) // 24)


def vm() -> Vm:
    v = Vm("vm-t", ASID, None, Throttle())
    # GPAs 0..1 MiB and 4..5 MiB mapped, to frames that are not in GPA order
    v.memslots.add(0, list(range(0x800, 0x900)))
    v.memslots.add(4 << 20, list(range(0x300, 0x400)))
    return v


def raw_entry(cur_page: int, gfn: int, op: int, size_2m: bool, reserved: int = 0) -> int:
    """KERNEL: arch/x86/include/asm/sev-common.h struct psc_entry: cur_page 12, gfn 40,
    operation 4, pagesize 1, reserved 7 bits, from bit 0 up."""
    return cur_page | gfn << 12 | op << 52 | int(size_2m) << 56 | reserved << 57


# PRIVATE (1) and SHARED (2) mostly; any other 4-bit operation is one KVM only completes
OPS = st.one_of(st.sampled_from([1, 1, 1, 2, 2, 2]), st.integers(0, 0xF))
RESERVED = st.one_of(st.just(0), st.integers(0, 0x7F))  # bits 63:57, never read by KVM

entry = st.builds(
    raw_entry,
    st.sampled_from([0] * 12 + [1]),
    st.one_of(st.integers(0, 0xFF), st.integers(0x400, 0x4FF), st.integers(0, 0x2000)),
    OPS,
    st.sampled_from([False] * 12 + [True]),
    RESERVED,
)


# what set_memory_encrypted()/decrypted() sends: mapped 4K pages at cur_page 0 (and, drawn
# now and then, an operation KVM only completes or reserved bits set)
plain = st.builds(
    lambda gfn, op, reserved: raw_entry(0, gfn, op, False, reserved),
    st.one_of(st.integers(0, 0xFF), st.integers(0x400, 0x4FF)),
    st.one_of(st.sampled_from([1, 2] * 8), st.integers(0, 0xF)),
    st.one_of(st.just(0), st.just(0), st.integers(0, 0x7F)),
)


# what set_memory_encrypted()/decrypted() sends, built valid on purpose so that most examples
# of this branch are plans the fast path must take: 4K PRIVATE/SHARED entries at cur_page 0
# on mapped GFNs, the whole descriptor in range
valid = st.builds(
    lambda gfn, op, reserved: raw_entry(0, gfn, op, False, reserved),
    st.one_of(st.integers(0, 0xFF), st.integers(0x400, 0x4FF)),
    st.sampled_from([1, 2]),
    st.one_of(st.just(0), st.integers(0, 0x7F)),
)

# The VM's memory as vm() maps it, written out here: GFN -> frame
FRAMES = {**{g: 0x800 + g for g in range(0x100)}, **{0x400 + i: 0x300 + i for i in range(0x100)}}
INVALID_HDR, INVALID_ENTRY, GENERIC = (1 << 32) | 1, (1 << 32) | 2, 0x100 << 32


def kernel_outcome(padded: list[int], cur: int, end: int) -> tuple[int, int, dict[int, int]]:
    """What snp_begin_psc() answers for this descriptor when every RMPUPDATE succeeds:
    (sw_exit_info_2, cur_entry written back, {entry index: cur_page written back}), from
    KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() and arch/x86/include/asm/sev-common.h:
    - end_entry >= VMGEXIT_PSC_MAX_COUNT (253) is VMGEXIT_PSC_ERROR_INVALID_HDR, nothing written;
    - cur_entry > end_entry: nothing to process, 0, nothing written;
    - an entry with cur_page > npages or a GFN not aligned to npages (512 for a 2M entry) is
      VMGEXIT_PSC_ERROR_INVALID_ENTRY with cur_entry at it, the entries before it complete;
    - PRIVATE (1) and SHARED (2) convert pages cur_page..npages-1; any other operation is
      completed without acting (`default:`); a conversion the VMM cannot do (a GFN outside
      every memslot) is VMGEXIT_PSC_ERROR_GENERIC (snp_complete_one_psc(): hypercall.ret != 0)
      with cur_entry at that entry; snpemu keeps the pages before the failing one done and
      cur_page at it (its per-page rule, UNVERIFIED(psc-per-page) in kvm/exits/psc.py);
    - a completed entry gets cur_page = npages; only cur_page and cur_entry are written."""
    if end >= 253:
        return INVALID_HDR, cur, {}
    if cur > end:
        return 0, cur, {}
    pages: dict[int, int] = {}
    for idx in range(cur, end + 1):
        e = padded[idx]
        cur_page, gfn, op, huge = e & 0xFFF, e >> 12 & (2**40 - 1), e >> 52 & 0xF, e >> 56 & 1
        npages = 512 if huge else 1
        if cur_page > npages or gfn % npages:
            return INVALID_ENTRY, idx, pages
        if op in (1, 2):
            for page in range(cur_page, npages):
                if gfn + page not in FRAMES:
                    if page > cur_page:
                        pages[idx] = page
                    return GENERIC, idx, pages
        pages[idx] = npages
    return 0, end + 1, pages


def converted(padded: list[int], pages: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """The 4K RMPUPDATEs those cur_pages imply, in order: (spa, gpa, assigned, asid).
    KERNEL: arch/x86/kvm/svm/sev.c: rmp_make_private(pfn, gpa, PG_LEVEL_4K, asid, false) for
    PRIVATE, rmp_make_shared(pfn, PG_LEVEL_4K) (gpa 0, asid 0) for SHARED."""
    out = []
    for idx, upto in pages.items():
        e = padded[idx]
        cur_page, gfn, op = e & 0xFFF, e >> 12 & (2**40 - 1), e >> 52 & 0xF
        if op not in (1, 2):
            continue
        for page in range(cur_page, upto):
            gpa = (gfn + page) << 12
            private = op == 1
            out.append(
                (FRAMES[gfn + page] << 12, gpa if private else 0, int(private), ASID * private)
            )
    return out


def batch_rows(batches: list[bytes]) -> list[tuple[int, int, int, int]]:
    """KERNEL: arch/x86/include/asm/sev.h struct rmp_state after a u64 SPA (rmp.proto's
    RmpUpdateBatchRequest.entries): u64 spa; u64 gpa; u8 assigned, pagesize, immutable, rsvd;
    u32 asid."""
    rows = []
    for b in batches:
        for off in range(0, len(b), 24):
            spa, gpa, assigned, pagesize, immutable, _, asid = struct.unpack_from(
                "<QQBBBBI", b, off
            )
            assert (pagesize, immutable) == (0, 0)
            rows.append((spa, gpa, assigned, asid))
    return rows


@settings(max_examples=examples(300), deadline=None)
@given(
    entries=st.one_of(
        st.lists(valid, min_size=1, max_size=psc.MAX_ENTRIES),
        st.lists(plain, min_size=1, max_size=psc.MAX_ENTRIES),
        st.lists(entry, min_size=1, max_size=psc.MAX_ENTRIES),
    ),
    cur=st.one_of(st.just(0), st.integers(0, 4)),
    end_delta=st.one_of(st.just(0), st.integers(-3, 3)),
    hdr_reserved=st.sampled_from([0, 0, 0xFFFFFFFF]),
)
# a PSMASH entry past end_entry: KVM leaves it alone (the loop once marked it done)
@example(entries=[1 << 52, 3 << 52], cur=0, end_delta=-1, hdr_reserved=0)
# an unknown operation and reserved bits on a PRIVATE entry: planned, not refused
@example(entries=[1 << 52 | 0x7F << 57, 9 << 52], cur=0, end_delta=0, hdr_reserved=7)
# only operations KVM completes without acting: no RMPUPDATE at all
@example(entries=[3 << 52, 0, 15 << 52 | 0x3000 << 12], cur=0, end_delta=0, hdr_reserved=0)
# declined: a 2M entry, a cur_page past npages, an unmapped PRIVATE GFN, end past the buffer
@example(entries=[1 << 52 | 1 << 56], cur=0, end_delta=0, hdr_reserved=0)
@example(entries=[2 << 52, 2 | 1 << 52], cur=0, end_delta=0, hdr_reserved=0)
@example(entries=[1 << 52, 1 << 52 | 0x200 << 12], cur=0, end_delta=0, hdr_reserved=0)
@example(entries=[1 << 52] * psc.MAX_ENTRIES, cur=0, end_delta=1, hdr_reserved=0)
async def test_the_plan_equals_the_loop(
    entries: list[int], cur: int, end_delta: int, hdr_reserved: int
) -> None:
    """Both follow KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() (reserved bits unread, any
    operation but PRIVATE/SHARED completed by the `default:` branch); the loop, whether the
    plan took the request or declined it, gives what kernel_outcome() predicts."""
    end = max(0, len(entries) - 1 + end_delta)
    raw = struct.pack("<HHI", cur, end, hdr_reserved) + b"".join(
        e.to_bytes(8, "little") for e in entries
    )
    raw += bytes(8 + 8 * psc.MAX_ENTRIES - len(raw))
    v = vm()
    fast = plan_4k(raw, v.memslots.translate_many, ASID)
    host = Host()
    exits = Exits(SimpleNamespace(rmp=host))  # type: ignore[arg-type]
    desc = psc.Descriptor.decode(raw)
    state = ExitState(speculate=False)
    result = await exits.psc.apply(v, desc, state)
    out = bytearray(raw)
    desc.encode_into(out)
    padded = entries + [0] * psc.MAX_ENTRIES
    # the loop against the kernel's rule, for every request (taken by the plan or not)
    want_result, want_cur, want_pages = kernel_outcome(padded, cur, end)
    assert result == want_result
    assert batch_rows(host.batches) == converted(padded, want_pages)
    if want_result == INVALID_HDR or (want_result == 0 and cur > end):
        assert bytes(out) == raw  # nothing written
    else:
        cur_back, end_back, rsvd_back = struct.unpack_from("<HHI", out)
        assert (cur_back, end_back, rsvd_back) == (want_cur, end, hdr_reserved)
        back = struct.unpack_from(f"<{psc.MAX_ENTRIES}Q", out, 8)
        for i, (was, now) in enumerate(zip(padded, back, strict=False)):
            # only cur_page (bits 11:0) is written, and only where the kernel completes work
            assert now >> 12 == was >> 12
            assert now & 0xFFF == want_pages.get(i, was & 0xFFF), i
    # the plan's contract (module docstring): it takes every request of 4K entries at cur_page
    # 0 whose PRIVATE/SHARED pages are mapped, whatever the other operations and reserved bits
    in_range = padded[cur : end + 1]
    common = cur <= end < psc.MAX_ENTRIES and all(
        e & 0xFFF == 0
        and not e >> 56 & 1
        and (e >> 52 & 0xF not in (1, 2) or e >> 12 & (2**40 - 1) in FRAMES)
        for e in in_range
    )
    assert (fast is not None) == common
    if fast is None:
        # a decline must be a request outside the plan's contract, which the loop answered
        # as the kernel does (checked above); say why, for the statistics
        names = {0: "success", INVALID_HDR: "invalid hdr", INVALID_ENTRY: "invalid entry"}
        event(f"declined, loop answers {names.get(want_result, 'generic')}")
        return
    event("planned")
    assert result == 0
    assert fast.descriptor == bytes(out)
    assert [fast.entries] == (host.batches or [b""])
    assert batch_rows([fast.entries]) == converted(padded, want_pages)
    assert (fast.private, fast.shared) == (
        state.psc_pages[("private", "4k")],
        state.psc_pages[("shared", "4k")],
    )


def test_the_plan_takes_the_common_request() -> None:
    """253 4K entries at cur_page 0, as set_memory_encrypted() sends: planned, not refused."""
    raw = struct.pack("<HHI", 0, 252, 0) + b"".join(
        psc.Entry(0, 0x400 + i, psc.Op.PRIVATE, False).encode().to_bytes(8, "little")
        for i in range(253)
    )
    fast = plan_4k(raw, vm().memslots.translate_many, ASID)
    assert fast is not None and fast.private == 253
    first = np.frombuffer(fast.entries, dtype="<u8", count=2)
    assert (int(first[0]), int(first[1])) == (0x300 << 12, 0x400 * PAGE_SIZE)  # SPA, GPA


def test_translate_many_equals_translate() -> None:
    v = vm()
    gpas = np.array([0, 0xFFFFF, 0x100000, 4 << 20, (5 << 20) - 1, 5 << 20, 1 << 40])
    want = [v.memslots.translate(int(g)) for g in gpas]
    assert list(v.memslots.translate_many(gpas)) == [-1 if w is None else w for w in want]


async def test_the_loop_marks_only_entries_before_the_one_that_stopped_it() -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): KVM completes PSMASH/UNSMASH ranges
    (`default:`) as it reaches them and stops at an invalid entry (here cur_page 2 > npages 1):
    a PSMASH before it is done, one after it is left as the guest wrote it."""
    entries = [raw_entry(0, 0, 3, False), raw_entry(2, 0, 1, False), raw_entry(0, 0, 3, False)]
    raw = struct.pack("<HHI", 0, 2, 0) + b"".join(e.to_bytes(8, "little") for e in entries)
    desc = psc.Descriptor.decode(raw + bytes(8 * (psc.MAX_ENTRIES - 3)))
    exits = Exits(SimpleNamespace(rmp=Host()))  # type: ignore[arg-type]
    result = await exits.psc.apply(vm(), desc, ExitState(speculate=False))
    assert result == (1 << 32) | 2 and desc.cur_entry == 1  # VMGEXIT_PSC_ERROR_INVALID_ENTRY
    assert [e.cur_page for e in desc.entries[:3]] == [1, 2, 0]


def test_the_plan_completes_unknown_operations_without_an_rmpupdate() -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() `default:` -> __snp_complete_one_psc():
    an entry whose operation is not PRIVATE/SHARED gets cur_page = 1 (4K) and no page state
    change, even at a GFN outside the memslots; bits 63:57 are not read and stay as written."""
    entries = [
        raw_entry(0, 0x400, 1, False, 0x7F),  # PRIVATE, every reserved bit set
        raw_entry(0, 0x80000, 0, False),  # operation 0, a GFN no memslot maps
        raw_entry(0, 0x401, 15, False, 1),
        raw_entry(0, 0x402, 2, False),
    ]
    raw = struct.pack("<HHI", 0, 3, 0) + b"".join(e.to_bytes(8, "little") for e in entries)
    fast = plan_4k(raw, vm().memslots.translate_many, ASID)
    assert fast is not None
    assert (fast.private, fast.shared) == (1, 1)
    assert len(fast.entries) == 2 * 24  # two RMPUPDATEs: the PRIVATE and the SHARED entry
    cur_entry, end_entry, _ = struct.unpack_from("<HHI", fast.descriptor)
    back = struct.unpack_from("<4Q", fast.descriptor, 8)
    assert (cur_entry, end_entry) == (4, 3)
    assert list(back) == [e | 1 for e in entries]  # cur_page 1, every other bit as written
