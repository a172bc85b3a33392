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
from snpemu.runtime.status import error_info

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
GHCB_HV_RESP_MALFORMED_INPUT, GHCB_ERR_INVALID_SCRATCH_AREA = 2, 3
# KERNEL: arch/x86/include/asm/svm.h struct ghcb: shared_buffer at 0x800, reserved_0xff0 after it
SHARED_BUFFER, SHARED_BUFFER_END = 0x800, 0xFF0
PSC_HDR_SIZE, PSC_ENTRY_SIZE = 8, 8

ENTRY = st.tuples(
    st.integers(0, 0xFFF) | st.sampled_from([0, 0, 1, 512]),  # cur_page
    st.integers(0x1000, 0x1FFF) | st.sampled_from([0x1000, 0x1200]),  # gfn (2M-aligned too)
    st.integers(0, 0xF) | st.sampled_from([1, 2]),  # operation
    st.booleans(),  # pagesize
    st.integers(0, 0x7F),  # reserved 63:57
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    # the descriptor's offset in the shared buffer: at its start, at the edges, or anywhere
    off=st.sampled_from([0, 0, 0, 8, 2016, 2024, 2025, 2032, -8]) | st.integers(0, 2032),
    entries=st.lists(ENTRY, max_size=12),
    data=st.data(),
    hdr_reserved=st.sampled_from([0, 0, 0xFFFFFFFF]),
)
def test_random_psc_descriptor_gets_the_exact_code(
    live: Live,
    off: int,
    entries: list[tuple[int, int, int, bool, int]],
    data: st.DataObject,
    hdr_reserved: int,
) -> None:
    """The oracle is KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit() SVM_VMGEXIT_PSC
    (setup_vmgexit_scratch() of sizeof(struct psc_hdr), inside the GHCB for GHCB v2) and
    snp_begin_psc() (`idx_end >= max_nr_entries`, the entry checks, the `default:` branch),
    written out here on the raw bits of struct psc_entry / psc_hdr."""
    # mostly within the drawn entries, sometimes anywhere (past them, past the area)
    near = st.integers(0, len(entries) + 1)
    cur = data.draw(near | st.integers(0, 300), label="cur_entry")
    end = data.draw(near | near | st.integers(0, 300), label="end_entry")
    raw = [
        cp | gfn << 12 | op << 52 | int(size) << 56 | rsvd << 57
        for cp, gfn, op, size, rsvd in entries
    ]
    area = SHARED_BUFFER_END - SHARED_BUFFER - off  # bytes from the descriptor to the end
    buf = bytearray(g.SHARED_BUFFER_SIZE)
    if off >= 0 and area >= PSC_HDR_SIZE:
        struct.pack_into("<HHI", buf, off, cur, end, hdr_reserved)
        for i, r in enumerate(raw[: (area - PSC_HDR_SIZE) // PSC_ENTRY_SIZE]):
            struct.pack_into("<Q", buf, off + 8 + 8 * i, r)
    ghcb = g.Ghcb()
    for k, v in (
        ("sw_exit_code", g.EXIT_PSC),
        ("sw_exit_info_1", 0),
        ("sw_exit_info_2", 0),
        ("sw_scratch", live.guest.ghcb_gpa + SHARED_BUFFER + off),
    ):
        ghcb.set(k, v)
    ghcb.shared = buf
    before = live.rmp_snapshot()
    r, back = live.runner.run(live.guest.vmgexit(ghcb))
    out = bytes(back.shared)
    if off < 0 or area < PSC_HDR_SIZE:  # outside the shared buffer, or no room for the header
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (
            GHCB_HV_RESP_MALFORMED_INPUT,
            GHCB_ERR_INVALID_SCRATCH_AREA,
        )
        assert out == bytes(buf) and live.rmp_snapshot() == before
        return
    max_nr_entries = (area - PSC_HDR_SIZE) // PSC_ENTRY_SIZE
    assert r.sw_exit_info_1 == 0  # snp_complete_psc(): svm_vmgexit_no_action()
    # psc_hdr.reserved is never read, and never written
    assert struct.unpack_from("<I", out, off + 4)[0] == hdr_reserved
    if end >= max_nr_entries:  # `idx_end >= max_nr_entries`
        assert r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_INVALID_HDR
        assert out == bytes(buf) and live.rmp_snapshot() == before
        return
    if cur > end:  # the scan loop does not run; `idx > idx_end`: snp_complete_psc(svm, 0)
        assert r.sw_exit_info_2 == 0 and out == bytes(buf)
        assert live.rmp_snapshot() == before
        return
    # entries past the list are zero (cur_page 0, gfn 0, operation 0, 4K)
    padded = (raw + [0] * max_nr_entries)[:max_nr_entries]

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
    cur_out = struct.unpack_from("<H", out, off)[0]
    back_entries = struct.unpack_from(f"<{max_nr_entries}Q", out, off + 8)
    # the bytes before the descriptor are the guest's, untouched
    assert out[:off] == bytes(buf[:off])
    if r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_GENERIC:
        # a page that could not change (a GFN outside the memslots): entries before the one
        # that failed are complete, it and those after it as the guest wrote them (except its
        # cur_page, which may have advanced)
        assert can_fail and cur <= cur_out < stop
        failed = padded[cur_out]
        assert changes_state(failed) and pending(failed)
        for i in range(cur, cur_out):
            assert back_entries[i] == padded[i] & ~0xFFF | npages(padded[i]), i
        for i in range(cur_out + 1, max_nr_entries):
            assert back_entries[i] == padded[i], i
        assert back_entries[cur_out] & ~0xFFF == failed & ~0xFFF
        return
    if first_bad is not None:
        assert r.sw_exit_info_2 == VMGEXIT_PSC_ERROR_INVALID_ENTRY
        assert cur_out == first_bad
    else:
        assert r.sw_exit_info_2 == 0
        assert cur_out == end + 1
    # processed entries are complete (only cur_page written), the rest as the guest wrote them
    for i, (sent, got) in enumerate(zip(padded, back_entries, strict=True)):
        if cur <= i < stop:
            assert got == sent & ~0xFFF | npages(sent), i
        else:
            assert got == sent, i
    if not can_fail:
        assert live.rmp_snapshot() == before  # nothing but completed no-op entries


# --- every NAE event sev_es_validate_vmgexit() accepts -------------------------------------------
# The oracle below is written from arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit(),
# setup_vmgexit_scratch(), sev_es_string_io() and sev_snp_ap_creation(), with the answers of the
# handlers behind them; constants from arch/x86/include/uapi/asm/svm.h and asm/sev-common.h.

GHCB = 0x100000
NAE_REQUIRED = {
    0x27: (),  # SVM_EXIT_READ_DR7
    0x37: ("rax",),  # SVM_EXIT_WRITE_DR7
    0x6E: (),  # SVM_EXIT_RDTSC
    0x6F: ("rcx",),  # SVM_EXIT_RDPMC
    0x72: ("rax", "rcx"),  # SVM_EXIT_CPUID (+ XCR0 when RAX == 0xD)
    0x76: (),  # SVM_EXIT_INVD
    0x7B: (),  # SVM_EXIT_IOIO (SW_SCRATCH for string IO, RAX for OUT)
    0x7C: ("rcx",),  # SVM_EXIT_MSR (+ RAX, RDX to write)
    0x81: ("rax", "cpl"),  # SVM_EXIT_VMMCALL
    0x87: (),  # SVM_EXIT_RDTSCP
    0x89: (),  # SVM_EXIT_WBINVD
    0x8A: ("rax", "rcx", "rdx"),  # SVM_EXIT_MONITOR
    0x8B: ("rax", "rcx"),  # SVM_EXIT_MWAIT
    0x8000_0001: ("sw_scratch",),  # SVM_VMGEXIT_MMIO_READ
    0x8000_0002: ("sw_scratch",),  # SVM_VMGEXIT_MMIO_WRITE
    0x8000_0003: (),  # SVM_VMGEXIT_NMI_COMPLETE
    0x8000_0004: (),  # SVM_VMGEXIT_AP_HLT_LOOP
    0x8000_0005: (),  # SVM_VMGEXIT_AP_JUMP_TABLE
    0x8000_0013: (),  # SVM_VMGEXIT_AP_CREATION (+ RAX unless AP_DESTROY)
    0x8000_FFFD: (),  # SVM_VMGEXIT_HV_FEATURES
}
FIELDS = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2", "rax", "rcx", "rdx", "cpl")
FIELDS += ("sw_scratch", "xcr0")
GP, UD = 1 << 31 | 3 << 8 | 13, 1 << 31 | 3 << 8 | 6  # SVM_EVTINJ_VALID | TYPE_EXEPT | vector
# a field is valid when bit offset/8 of the bitmap is set (struct ghcb_save_area offsets)
BIT = {"cpl": 0xCB // 8, "rax": 0x1F8 // 8, "rcx": 0x308 // 8, "rdx": 0x310 // 8}
BIT |= {"sw_exit_code": 0x390 // 8, "sw_exit_info_1": 0x398 // 8, "sw_exit_info_2": 0x3A0 // 8}
BIT |= {"sw_scratch": 0x3A8 // 8, "xcr0": 0x3E8 // 8}


def nae_validation(valid: set[str], code: int, info1: int, rax: int, usage: int) -> int:
    """sev_es_validate_vmgexit(): 0 or the GHCB_ERR_* reason."""
    if usage:
        return 2  # GHCB_ERR_INVALID_USAGE
    if not {"sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"} <= valid:
        return 4  # GHCB_ERR_MISSING_INPUT
    if code not in NAE_REQUIRED:
        return 6  # GHCB_ERR_INVALID_EVENT
    need = set(NAE_REQUIRED[code])
    if code == 0x72 and "rax" in valid and rax == 0xD:
        need.add("xcr0")
    if code == 0x7B and info1 & 4:  # SVM_IOIO_STR_MASK
        need.add("sw_scratch")
    elif code == 0x7B and not info1 & 1:  # SVM_IOIO_TYPE_MASK clear: OUT
        need.add("rax")
    if code == 0x7C and info1:
        need |= {"rax", "rdx"}
    if code == 0x8000_0013 and info1 & 0xFFFFFFFF != 2:
        need.add("rax")
    return 0 if need <= valid else 4


def scratch_answer(scratch: int, length: int, mapped: list[tuple[int, int]]) -> object:
    """setup_vmgexit_scratch(): (2, 3) for a refused area; "unmapped" when kvm_read_guest() of
    an area outside the GHCB fails (-EFAULT: the run fails); else (0, 0)."""
    end = scratch + length
    if not scratch or end >= 2**64:
        return (2, 3)
    if scratch & ~0xFFF == GHCB:
        return (0, 0) if scratch >= GHCB + 0x800 and end <= GHCB + 0xFF0 else (2, 3)
    if length > 16 * 4096:
        return (2, 3)
    pages = range(scratch >> 12, (end + 4095) >> 12) if length else range(0)
    inside = all(any(lo <= p << 12 < hi for lo, hi in mapped) for p in pages)
    return (0, 0) if inside else "SCRATCH_NOT_MAPPED"


def nae_answer(
    valid: set[str],
    code: int,
    info1: int,
    info2: int,
    regs: dict[str, int],
    usage: int,
    mapped: list[tuple[int, int]],
    jump_table: int,
) -> object:
    """The whole answer: (SW_EXIT_INFO_1, SW_EXIT_INFO_2) or the reason the run fails."""
    rax = regs["rax"] if "rax" in valid else 0
    reason = nae_validation(valid, code, info1, rax, usage)
    if reason:
        return (2, reason)
    scratch = regs["sw_scratch"] if "sw_scratch" in valid else 0
    if code == 0x6E:
        return "UNEXPECTED_EXIT_REASON"  # svm_exit_handlers[] has no RDTSC entry
    if code == 0x87:
        return (1, UD)  # kvm_handle_invalid_op()
    if code == 0x6F:
        return (1, GP)  # kvm_emulate_rdpmc(): no vPMU
    if code == 0x7C:
        index = (regs["rcx"] if "rcx" in valid else 0) & 0xFFFFFFFF
        return (0, 0) if not info1 and index in (0x10, 0x1B) else (1, GP)
    if code == 0x7B and info1 & 4:
        size = (info1 >> 4) & 7
        if info2 > 2**31 - 1 or info2 * size > 2**31 - 1:
            return "STRING_IO_COUNT"  # sev_es_string_io(): -EINVAL
        return scratch_answer(scratch, info2 * size, mapped)
    if code in (0x8000_0001, 0x8000_0002):
        return scratch_answer(scratch, info2, mapped)
    if code == 0x8000_0005:
        return {0: (0, 0), 1: (0, jump_table)}.get(info1, (2, 5))
    if code == 0x8000_FFFD:
        return (0, 3)  # GHCB_HV_FT_SUPPORTED = SNP | SNP_AP_CREATION
    if code == 0x8000_0013:  # sev_snp_ap_creation(), one vCPU: APIC ID 0
        op, apic = info1 & 0xFFFFFFFF, info1 >> 32
        if apic != 0 or op not in (0, 1, 2):
            return (2, 5)
        if op == 2:
            return (0, 0)
        reserved = ((1 << 64) - (1 << 48)) & ~(1 << 51)  # MAXPHYADDR 48, C-bit 51
        if rax != 1 or info2 % 4096 or info2 & reserved or info2 % (2 << 20) == 0:
            return (2, 5)
        return (0, 0)
    return (0, 0)  # DR7, CPUID, INVD, port IO, VMMCALL, WBINVD, MONITOR, MWAIT, NMI, AP_HLT_LOOP


NAE_CODES = st.one_of(
    st.sampled_from([*NAE_REQUIRED, 0x0, 0x1234, 0x6D, 0x8000_0006, 0x8000_00FF]),
    st.sampled_from([0x7B, 0x7C, 0x8000_0001, 0x8000_0002, 0x8000_0005, 0x8000_0013]),
)
SCRATCH = st.one_of(
    st.sampled_from([0, GHCB, GHCB + 0x800, GHCB + 0x7F8, GHCB + 0xFE8, GHCB + 0xFF0]),
    st.integers(GHCB, GHCB + 0xFFF),
    st.integers(0x200000, 0x201000),  # guest memory outside the GHCB
    st.integers(0x7FFF_0000, 0x7FFF_1000),  # outside every memslot
    st.integers(2**64 - 0x20000, 2**64 - 1),  # ends past 2^64
)
INFO1 = st.one_of(
    st.sampled_from([0, 1, 2, 7, 1 << 32 | 1]),
    st.builds(
        lambda op, apic: apic << 32 | op, st.integers(0, 3), st.sampled_from([0, 1, 2**32 - 1])
    ),
    st.builds(  # IOIO: port, size, string, IN
        lambda port, size, s, i: port << 16 | size << 4 | s << 2 | i,
        st.integers(0, 0xFFFF),
        st.integers(0, 7),
        st.integers(0, 1),
        st.integers(0, 1),
    ),
    U64,
)
INFO2 = st.one_of(
    st.sampled_from([0, 1, 3, 8, 0x7F0, 16 * 4096, 16 * 4096 + 1, 2**31, 0x301000, 0x400000]),
    U64,
)
REGS = st.fixed_dictionaries(
    {
        "rax": st.one_of(st.sampled_from([0, 1, 0xD, 1 << 32 | 0xD]), U64),
        "rcx": st.one_of(st.sampled_from([0x10, 0x1B, 0xC001_0131]), U64),
        "rdx": U64,
        "cpl": st.sampled_from([0, 3]),
        "sw_scratch": SCRATCH,
        "xcr0": U64,
    }
)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    code=NAE_CODES,
    info1=INFO1,
    info2=INFO2,
    regs=REGS,
    dropped=st.sets(st.sampled_from(FIELDS), max_size=2),
    noise=st.integers(0, 2**128 - 1),
    usage=st.sampled_from([0] * 9 + [1]),
)
def test_random_nae_event_gets_the_exact_answer(
    live: Live,
    code: int,
    info1: int,
    info2: int,
    regs: dict[str, int],
    dropped: set[str],
    noise: int,
    usage: int,
) -> None:
    """Random valid bitmaps, exit codes and scratch pointers over every event the oracle knows:
    no crash, the exact answer, and a refused exit changes nothing kvm or rmp shows."""
    valid = set(FIELDS) - dropped
    bitmap = noise & ~sum(1 << b for b in BIT.values()) | sum(1 << BIT[f] for f in valid)
    page = bytearray(4096)
    for name, value in (
        ("sw_exit_code", code),
        ("sw_exit_info_1", info1),
        ("sw_exit_info_2", info2),
    ):
        struct.pack_into("<Q", page, g.OFFSETS[name], value)
    for name, value in regs.items():
        size = 1 if name == "cpl" else 8
        page[g.OFFSETS[name] : g.OFFSETS[name] + size] = value.to_bytes(size, "little")
    page[g.VALID_BITMAP : g.VALID_BITMAP + 16] = bitmap.to_bytes(16, "little")
    struct.pack_into("<HI", page, g.PROTOCOL_VERSION, 2, usage)

    async def memory_map() -> list[tuple[int, int]]:
        r = await live.stack.kvm.GetMemoryMap(
            kvm_pb2.GetMemoryMapRequest(vm=live.guest.vm), metadata=HOST
        )
        return [(x.gpa, x.gpa + x.size) for x in r.regions]

    async def jump_table() -> int:
        # AP_JUMP_TABLE get: what the last set stored
        x = g.Ghcb()
        for k in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"):
            x.set(k, {"sw_exit_code": 0x8000_0005, "sw_exit_info_1": 1}.get(k, 0))
        r, _ = await live.guest.vmgexit(x)
        return int(r.sw_exit_info_2)

    async def state() -> tuple[object, ...]:
        vm = (await live.stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=live.guest.vm), metadata=HOST)).vm
        window = (await live.guest.read(0x200000, 2 * 4096, private=False)).data
        return vm.state, vm.term_reason_set, await jump_table(), bytes(window)

    mapped = live.runner.run(memory_map())
    expect = nae_answer(
        valid, code, info1, info2, regs, usage, mapped, live.runner.run(jump_table())
    )
    refused = isinstance(expect, str) or expect[0] == 2  # type: ignore[index]
    if refused:
        before = (live.rmp_snapshot(), live.runner.run(state()))

    async def exit_once() -> tuple[int, int]:
        await live.guest.write(GHCB, bytes(page), private=False)
        r = await live.stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=live.guest.ident))
        return r.sw_exit_info_1, r.sw_exit_info_2

    try:
        got: object = live.runner.run(exit_once())
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        got = error_info(e).reason  # type: ignore[union-attr]
    assert got == expect, (hex(code), hex(info1), hex(info2), sorted(valid))
    if refused:
        assert (live.rmp_snapshot(), live.runner.run(state())) == before
