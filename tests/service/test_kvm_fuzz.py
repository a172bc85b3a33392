"""Hypothesis against kvm's GHCB and PSC handling over gRPC: no crash, the exact error code,
and no change to the RMP when a request is rejected."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.abi import ghcb as g

from tests.service.host_stack import HOST, Guest, Stack, host_stack


class Live:
    """One stack and one launched guest kept alive across hypothesis examples."""

    def __init__(self, tmp: Path) -> None:
        self.runner = asyncio.Runner()
        self.cm = host_stack(tmp, memory="128M")
        self.stack: Stack = self.runner.run(self.cm.__aenter__())
        self.guest: Guest = self.runner.run(self.stack.launch(memory=32 << 20))
        self.runner.run(self.guest.register_ghcb(0x100000))

    def rmp_snapshot(self) -> list[tuple[int, bytes]]:
        async def snap() -> list[tuple[int, bytes]]:
            out: list[tuple[int, bytes]] = []
            for first in range(0, 128 << 8, 4096):
                r = await self.stack.rmp.ListRmpEntries(
                    rmp_pb2.ListRmpEntriesRequest(
                        first_pfn=first, count=4096, non_default_only=True
                    ),
                    metadata=HOST,
                )
                out += [(e.pfn, e.raw) for e in r.entries]
            return out

        return self.runner.run(snap())

    def close(self) -> None:
        self.runner.run(self.cm.__aexit__(None, None, None))
        self.runner.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    x = Live(tmp_path_factory.mktemp("fuzz"))
    yield x
    x.close()


CODES = st.sampled_from(
    [
        g.EXIT_CPUID,
        g.EXIT_PSC,
        g.EXIT_AP_CREATION,
        g.EXIT_AP_JUMP_TABLE,
        g.EXIT_HV_FEATURES,
        g.EXIT_GUEST_REQUEST,
        g.EXIT_EXT_GUEST_REQUEST,
        g.EXIT_MMIO_READ,
        0x1234,
        0x8000_00FF,
    ]
)
U64 = st.integers(0, 2**64 - 1)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    code=CODES,
    info1=U64,
    info2=U64,
    valid=st.integers(0, 2**128 - 1),
    usage=st.sampled_from([0, 0, 0, 1]),
    shared=st.binary(min_size=0, max_size=64),
    rax=U64,
    rbx=U64,
)
def test_random_ghcb_never_crashes_kvm(
    live: Live,
    code: int,
    info1: int,
    info2: int,
    valid: int,
    usage: int,
    shared: bytes,
    rax: int,
    rbx: int,
) -> None:
    page = bytearray(4096)
    for name, value in (
        ("sw_exit_code", code),
        ("sw_exit_info_1", info1),
        ("sw_exit_info_2", info2),
        ("rax", rax),
        ("rbx", rbx),
        ("sw_scratch", 0x100000 + g.SHARED_BUFFER),
    ):
        struct.pack_into("<Q", page, g.OFFSETS[name], value)
    page[g.VALID_BITMAP : g.VALID_BITMAP + 16] = valid.to_bytes(16, "little")
    page[g.SHARED_BUFFER : g.SHARED_BUFFER + len(shared)] = shared
    struct.pack_into("<HI", page, g.PROTOCOL_VERSION, 2, usage)
    before = live.rmp_snapshot()

    async def exit_once() -> tuple[int, int]:
        await live.guest.write(0x100000, bytes(page), private=False)
        r = await live.stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=live.guest.ident))
        return r.sw_exit_info_1, r.sw_exit_info_2

    try:
        info1_out, info2_out = live.runner.run(exit_once())
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        return
    assert info1_out in (g.RESP_NO_ACTION, g.RESP_MALFORMED_INPUT)
    required = all(
        valid >> g.valid_bit(f) & 1 for f in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
    )
    if usage:
        assert (info1_out, info2_out) == (2, g.ERR_INVALID_USAGE)
    elif not required:
        assert (info1_out, info2_out) == (2, g.ERR_MISSING_INPUT)
    elif code in (0x1234, 0x8000_00FF):
        assert (info1_out, info2_out) == (2, g.ERR_INVALID_EVENT)
    if info1_out == g.RESP_MALFORMED_INPUT:
        assert 1 <= info2_out <= 6
        assert live.rmp_snapshot() == before  # a rejected exit changes nothing


# KERNEL: arch/x86/include/asm/sev-common.h
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
VMGEXIT_PSC_OP_PRIVATE, VMGEXIT_PSC_OP_SHARED = 1, 2


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cur=st.integers(0, 300),
    end=st.integers(0, 300),
    hdr_reserved=st.sampled_from([0, 0, 0xFFFFFFFF]),
    entries=st.lists(
        st.tuples(
            st.integers(0, 0xFFF),
            st.integers(0x1000, 0x1FFF),
            st.integers(0, 0xF),
            st.booleans(),
            st.integers(0, 0x7F),
        ),
        max_size=12,
    ),
)
def test_random_psc_descriptor_gets_the_exact_code(
    live: Live,
    cur: int,
    end: int,
    hdr_reserved: int,
    entries: list[tuple[int, int, int, bool, int]],
) -> None:
    """The oracle is KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(), written out here on the
    raw bits of struct psc_entry / psc_hdr (arch/x86/include/asm/sev-common.h)."""
    raw = [
        cp | gfn << 12 | op << 52 | int(size) << 56 | rsvd << 57
        for cp, gfn, op, size, rsvd in entries
    ]
    buf = bytearray(g.SHARED_BUFFER_SIZE)
    struct.pack_into("<HHI", buf, 0, cur, end, hdr_reserved)
    for i, r in enumerate(raw):
        struct.pack_into("<Q", buf, 8 + 8 * i, r)
    ghcb = g.Ghcb()
    for k, v in (
        ("sw_exit_code", g.EXIT_PSC),
        ("sw_exit_info_1", 0),
        ("sw_exit_info_2", 0),
        ("sw_scratch", live.guest.ghcb_gpa + g.SHARED_BUFFER),
    ):
        ghcb.set(k, v)
    ghcb.shared = buf
    before = live.rmp_snapshot()
    r, back = live.runner.run(live.guest.vmgexit(ghcb))
    out = bytes(back.shared)
    assert r.sw_exit_info_1 == 0  # snp_complete_psc(): svm_vmgexit_no_action()
    # psc_hdr.reserved is never read, and never written
    assert struct.unpack_from("<I", out, 4)[0] == hdr_reserved
    if end >= VMGEXIT_PSC_MAX_COUNT:  # `idx_end >= VMGEXIT_PSC_MAX_COUNT`
        assert r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_INVALID_HDR
        assert live.rmp_snapshot() == before
        return
    if cur > end:  # the scan loop does not run; `idx > idx_end`: snp_complete_psc(svm, 0)
        assert r.sw_exit_info_2 == 0 and out == bytes(buf)
        assert live.rmp_snapshot() == before
        return
    # entries past the list are zero (cur_page 0, gfn 0, operation 0, 4K)
    padded = raw + [0] * VMGEXIT_PSC_MAX_COUNT

    def npages(e: int) -> int:
        return 512 if e >> 56 & 1 else 1

    def invalid(e: int) -> bool:  # cur_page > npages || !IS_ALIGNED(gfn, npages)
        return (e & 0xFFF) > npages(e) or (e >> 12 & (2**40 - 1)) % npages(e) != 0

    def changes_state(e: int) -> bool:  # the cases before `default:`
        return (e >> 52 & 0xF) in (VMGEXIT_PSC_OP_PRIVATE, VMGEXIT_PSC_OP_SHARED)

    def pending(e: int) -> bool:  # npages left after cur_page
        return (e & 0xFFF) < npages(e)

    first_bad = next((i for i in range(cur, end + 1) if invalid(padded[i])), None)
    stop = end + 1 if first_bad is None else first_bad
    # only a page state change KVM sends on can fail (VMGEXIT_PSC_ERROR_GENERIC); a range of
    # other operations is completed by __snp_complete_one_psc()
    can_fail = any(changes_state(e) and pending(e) for e in padded[cur:stop])
    cur_out = struct.unpack_from("<H", out, 0)[0]
    back_entries = struct.unpack_from(f"<{VMGEXIT_PSC_MAX_COUNT}Q", out, 8)
    if r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_GENERIC:
        assert can_fail and cur <= cur_out <= stop
        return
    if first_bad is not None:
        assert r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_INVALID_ENTRY
        assert cur_out == first_bad
    else:
        assert r.sw_exit_info_2 == 0
        assert cur_out == end + 1
    # processed entries are complete (only cur_page written), the rest as the guest wrote them
    for i, (sent, got) in enumerate(zip(padded, back_entries, strict=False)):
        if cur <= i < stop:
            assert got == sent & ~0xFFF | npages(sent), i
        else:
            assert got == sent, i
    if not can_fail:
        assert live.rmp_snapshot() == before  # nothing but completed no-op entries
