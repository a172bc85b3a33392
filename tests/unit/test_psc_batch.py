"""kvm's array-planned 4K PSC against its entry-by-entry loop: the same RMPUPDATEs, the same
descriptor written back, the same page counts, for every request the plan takes."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from snp.rmp.v1 import rmp_pb2
from snpemu.abi import psc
from snpemu.kvm.exits import Exits, ExitState
from snpemu.kvm.psc_batch import plan_4k
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.vm import PAGE, Vm

ASID = 9


class Host:
    """Stands in for rmp: every RMPUPDATE succeeds; the batches are kept."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []

    async def call(self, op: str, request: Any) -> Any:
        assert op == "rmp_update_batch"
        self.batches.append(bytes(request.entries))
        return rmp_pb2.RmpUpdateBatchResponse(codes=bytes(len(request.entries) // 24))


def vm() -> Vm:
    v = Vm("vm-t", ASID, None, Throttle())
    # GPAs 0..1 MiB and 4..5 MiB mapped, to frames that are not in GPA order
    v.memslots.add(0, list(range(0x800, 0x900)))
    v.memslots.add(4 << 20, list(range(0x300, 0x400)))
    return v


entry = st.builds(
    lambda gfn, op, size_2m, cur_page: psc.Entry(cur_page, gfn, op, size_2m).encode(),
    st.one_of(st.integers(0, 0xFF), st.integers(0x400, 0x4FF), st.integers(0, 0x2000)),
    st.sampled_from([1, 1, 1, 2, 2, 2, 3, 4, 7]),
    st.sampled_from([False] * 12 + [True]),
    st.sampled_from([0] * 12 + [1]),
)


# what set_memory_encrypted()/decrypted() sends: mapped 4K pages at cur_page 0
plain = st.builds(
    lambda gfn, op: psc.Entry(0, gfn, op, False).encode(),
    st.one_of(st.integers(0, 0xFF), st.integers(0x400, 0x4FF)),
    st.sampled_from([1, 2]),
)


@settings(max_examples=300, deadline=None)
@given(
    entries=st.one_of(
        st.lists(plain, min_size=1, max_size=psc.MAX_ENTRIES),
        st.lists(entry, min_size=1, max_size=psc.MAX_ENTRIES),
    ),
    cur=st.integers(0, 4),
    end_delta=st.integers(-3, 3),
)
# a PSMASH entry past end_entry: KVM leaves it alone (the loop once marked it done)
@example(entries=[1 << 52, 3 << 52], cur=0, end_delta=-1)
def test_the_plan_equals_the_loop(entries: list[int], cur: int, end_delta: int) -> None:
    end = max(0, len(entries) - 1 + end_delta)
    raw = struct.pack("<HHI", cur, end, 0) + b"".join(e.to_bytes(8, "little") for e in entries)
    raw += bytes(8 + 8 * psc.MAX_ENTRIES - len(raw))
    v = vm()
    fast = plan_4k(raw, v.memslots.translate_many, ASID)
    host = Host()
    exits = Exits(SimpleNamespace(host=host))  # type: ignore[arg-type]
    desc = psc.Descriptor.decode(raw)
    state = ExitState(speculate=False)
    result = asyncio.run(exits.apply_psc(v, desc, state))
    if fast is None:
        return  # the loop alone answers this one
    assert result == 0
    out = bytearray(raw)
    desc.encode_into(out)
    assert fast.descriptor == bytes(out)
    assert [fast.entries] == (host.batches or [b""])
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
    assert (int(first[0]), int(first[1])) == (0x300 << 12, 0x400 * PAGE)  # SPA, GPA


def test_translate_many_equals_translate() -> None:
    v = vm()
    gpas = np.array([0, 0xFFFFF, 0x100000, 4 << 20, (5 << 20) - 1, 5 << 20, 1 << 40])
    want = [v.memslots.translate(int(g)) for g in gpas]
    assert list(v.memslots.translate_many(gpas)) == [-1 if w is None else w for w in want]


def test_the_loop_marks_only_entries_before_the_one_that_stopped_it() -> None:
    """KVM completes PSMASH/UNSMASH ranges as it reaches them and stops at an invalid entry:
    a PSMASH before it is done, one after it is left as the guest wrote it."""
    entries = [psc.Entry(0, 0, op, False).encode() for op in (3, 7, 3)]
    raw = struct.pack("<HHI", 0, 2, 0) + b"".join(e.to_bytes(8, "little") for e in entries)
    desc = psc.Descriptor.decode(raw + bytes(8 * (psc.MAX_ENTRIES - 3)))
    exits = Exits(SimpleNamespace(host=Host()))  # type: ignore[arg-type]
    result = asyncio.run(exits.apply_psc(vm(), desc, ExitState(speculate=False)))
    assert result == psc.PSC_ERROR_INVALID_ENTRY and desc.cur_entry == 1
    assert [e.cur_page for e in desc.entries[:3]] == [1, 0, 0]
