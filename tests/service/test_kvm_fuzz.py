"""Hypothesis against kvm's GHCB and PSC handling over gRPC: no crash, the exact answer, the
exact descriptor written back, and the RMP as predicted: unchanged when an exit is refused, and
changed for exactly the pages a page state change went through.

The oracles are written here from upstream, not taken from snpemu:
- the GHCB layout and valid bitmap: KERNEL arch/x86/include/asm/svm.h struct ghcb /
  struct ghcb_save_area, and the GHCB spec's rule that a save-area field at offset o is valid
  when bit o / 8 of the valid bitmap is set (SPEC: GHCB specification, "GHCB Layout" / valid
  bitmap);
- which exits are refused and how: KERNEL arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit(),
  setup_vmgexit_scratch(), sev_handle_vmgexit();
- the PSC descriptor and KVM's walk of it: KERNEL arch/x86/include/asm/sev-common.h struct
  psc_hdr / struct psc_entry (cur_page:12, gfn:40, operation:4, pagesize:1, reserved:7),
  VMGEXIT_PSC_ERROR_*; arch/x86/kvm/svm/sev.c snp_begin_psc(), __snp_complete_one_psc(),
  snp_complete_psc();
- what a page state change does to the RMP: KERNEL arch/x86/virt/svm/sev.c rmp_make_private()
  (assigned, the guest's ASID, the page's GPA) and rmp_make_shared() (a cleared entry).
Where snpemu knowingly differs (docs/fidelity.md), the oracle follows the marked difference and
says so: UNVERIFIED psc-scratch-in-ghcb, psc-per-page, guest-req-page-unmapped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from snp.kvm.v1 import kvm_pb2
from snpemu.runtime.status import error_info

from tests.conftest import examples
from tests.service.host_stack import HOST
from tests.service.live import Live, PageView, Snapshot


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    x = Live(tmp_path_factory.mktemp("fuzz"))
    yield x
    x.close()


# --- the GHCB page, from KERNEL arch/x86/include/asm/svm.h ---------------------------------------

GHCB = 0x100000  # where the fixture's vCPU registered its GHCB
# struct ghcb_save_area offsets of the fields the exits here use
OFF = {
    "cpl": 0x0CB,
    "rax": 0x1F8,
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    "sw_exit_code": 0x390,
    "sw_exit_info_1": 0x398,
    "sw_exit_info_2": 0x3A0,
    "sw_scratch": 0x3A8,
    "xcr0": 0x3E8,
}
VALID_BITMAP = 0x3F0  # u8 valid_bitmap[16]
# SPEC: GHCB specification: the field at save-area offset o is valid when bit o / 8 is set
BIT = {name: off // 8 for name, off in OFF.items()}
# struct ghcb: shared_buffer[0x7F0] at 0x800, then reserved_0xff0; protocol_version (u16) at
# 0xFFA and ghcb_usage (u32) at 0xFFC
SHARED_BUFFER, SHARED_BUFFER_END = 0x800, 0xFF0
PROTOCOL_VERSION, GHCB_USAGE = 0xFFA, 0xFFC


def ghcb_page(
    fields: dict[str, int], valid: int, shared: bytes = b"", usage: int = 0, version: int = 2
) -> bytes:
    """A GHCB page: `fields` written at their offsets, `valid` as the bitmap."""
    page = bytearray(4096)
    for name, value in fields.items():
        size = 1 if name == "cpl" else 8
        page[OFF[name] : OFF[name] + size] = (value % (1 << 8 * size)).to_bytes(size, "little")
    page[VALID_BITMAP : VALID_BITMAP + 16] = valid.to_bytes(16, "little")
    page[SHARED_BUFFER : SHARED_BUFFER + len(shared)] = shared
    struct.pack_into("<H", page, PROTOCOL_VERSION, version)
    struct.pack_into("<I", page, GHCB_USAGE, usage)
    return bytes(page)


def bitmap(valid: set[str], noise: int = 0) -> int:
    """The valid bitmap marking exactly `valid` among the fields above; other bits from noise."""
    ours = sum(1 << b for b in BIT.values())
    return noise & ~ours | sum(1 << BIT[f] for f in valid)


def valid_fields(bits: int) -> set[str]:
    return {name for name, b in BIT.items() if bits >> b & 1}


def exit_raw(live: Live, page: bytes) -> tuple[object, bytes]:
    """Write the GHCB, VMGEXIT, read the GHCB back: ((SW_EXIT_INFO_1, SW_EXIT_INFO_2) or the
    reason the run failed, the page as the guest then sees it)."""

    async def go() -> tuple[object, bytes]:
        await live.guest.write(GHCB, page, private=False)
        try:
            r = await live.stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=live.guest.ident))
            got: object = (r.sw_exit_info_1, r.sw_exit_info_2)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            got = error_info(e).reason  # type: ignore[union-attr]
        back = (await live.guest.read(GHCB, 4096, private=False)).data
        return got, bytes(back)

    return live.run(go())


def vm_state(live: Live) -> tuple[object, ...]:
    vm = live.run(live.stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=live.guest.vm), metadata=HOST)).vm
    return vm.state, vm.term_reason_set, vm.term_reason_code


# --- the PSC oracle ------------------------------------------------------------------------------

# KERNEL: arch/x86/include/asm/sev-common.h
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
VMGEXIT_PSC_OP_PRIVATE, VMGEXIT_PSC_OP_SHARED = 1, 2
PSC_HDR_SIZE, PSC_ENTRY_SIZE = 8, 8  # sizeof(struct psc_hdr), sizeof(struct psc_entry)
# KERNEL: arch/x86/include/asm/svm.h GHCB_HV_RESP_MALFORMED_INPUT; sev-common.h GHCB_ERR_*
MALFORMED = 2
ERR_INVALID_USAGE, ERR_INVALID_SCRATCH_AREA, ERR_MISSING_INPUT = 2, 3, 4
ERR_INVALID_INPUT, ERR_INVALID_EVENT = 5, 6


def psc_entry(raw: int) -> tuple[int, int, int, int]:
    """struct psc_entry's bitfields (x86 packs them from bit 0): cur_page 11:0, gfn 51:12,
    operation 55:52, pagesize 56 (reserved 63:57 is never read): (cur_page, gfn, op, npages)."""
    return raw & 0xFFF, raw >> 12 & (1 << 40) - 1, raw >> 52 & 0xF, 512 if raw >> 56 & 1 else 1


@dataclass
class PscAnswer:
    info2: int  # SW_EXIT_INFO_2 (SW_EXIT_INFO_1 is 0: snp_complete_psc() answers no action)
    back: bytes  # the descriptor area as the guest reads it afterwards
    # the page state changes made, in order: (gfn, private)
    changes: list[tuple[int, bool]] = field(default_factory=list)


def psc_answer(area: bytes, mapped: Callable[[int], bool]) -> PscAnswer:
    """KVM's walk of the descriptor at the start of `area` (the bytes from SW_SCRATCH to the
    end of the shared buffer), written from snp_begin_psc() and __snp_complete_one_psc():

    - `idx_end >= max_nr_entries` (the entries the area holds; VMGEXIT_PSC_MAX_COUNT for a
      descriptor at the buffer's start): INVALID_HDR, nothing written;
    - idx_start > idx_end: the scan does not run, snp_complete_psc(svm, 0), nothing written;
    - entries are walked from cur_entry to end_entry, hdr->cur_entry advancing with them; an
      entry with cur_page > npages or a GFN not aligned to npages: INVALID_ENTRY, cur_entry
      left on it; a range of PRIVATE/SHARED pages goes to the VMM (the page state changes),
      any other operation is completed without one; a completed entry's cur_page becomes
      npages; one with nothing left (cur_page == npages) is skipped as it is.
    - UNVERIFIED(psc-per-page): a page outside the memslots fails the request with
      VMGEXIT_PSC_ERROR_GENERIC: snpemu stops at that exact page, the pages before it in the
      entry changed and its cur_page on it (KVM answers GENERIC for the whole merged range).
    """
    buf = bytearray(area)
    max_nr = (len(area) - PSC_HDR_SIZE) // PSC_ENTRY_SIZE
    cur, end = struct.unpack_from("<HH", area, 0)
    if end >= max_nr:
        return PscAnswer(VMGEXIT_PSC_ERROR_INVALID_HDR, bytes(area))
    if cur > end:
        return PscAnswer(0, bytes(area))
    entries = list(struct.unpack_from(f"<{max_nr}Q", area, PSC_HDR_SIZE))
    changes: list[tuple[int, bool]] = []
    result = 0
    idx = cur
    while idx <= end:
        raw = entries[idx]
        cur_page, gfn, op, npages = psc_entry(raw)
        if cur_page > npages or gfn % npages:
            result = VMGEXIT_PSC_ERROR_INVALID_ENTRY
            break
        if op in (VMGEXIT_PSC_OP_PRIVATE, VMGEXIT_PSC_OP_SHARED):
            failed = next((p for p in range(cur_page, npages) if not mapped((gfn + p) << 12)), None)
            done = npages if failed is None else failed
            changes += [(gfn + p, op == VMGEXIT_PSC_OP_PRIVATE) for p in range(cur_page, done)]
            if failed is not None:
                entries[idx] = raw & ~0xFFF | failed
                result = VMGEXIT_PSC_ERROR_GENERIC
                break
        entries[idx] = raw & ~0xFFF | npages
        idx += 1
    struct.pack_into("<H", buf, 0, idx)
    struct.pack_into(f"<{max_nr}Q", buf, PSC_HDR_SIZE, *entries)
    return PscAnswer(result, bytes(buf), changes)


def after_psc(
    before: dict[int, PageView], changes: list[tuple[int, bool]], asid: int
) -> tuple[dict[int, PageView], dict[int, tuple[bool, int, int]]]:
    """The guest's pages expected after `changes`: (pages not changed: their whole state as
    before; pages changed: (assigned, asid, gpa) of rmp_make_private() / rmp_make_shared())."""
    last: dict[int, bool] = {}
    for gfn, private in changes:
        last[gfn] = private
    kept = {gfn: view for gfn, view in before.items() if gfn not in last}
    made = {
        gfn: (True, asid, gfn << 12) if private else (False, 0, 0) for gfn, private in last.items()
    }
    return kept, made


def check_rmp(live: Live, before: Snapshot, changes: list[tuple[int, bool]]) -> None:
    """The RMP after an exit: byte for byte as before when nothing changed page state;
    otherwise the changed pages as predicted, every other guest page as before, and every entry
    outside the guest's memory byte for byte as before."""
    after = live.rmp_snapshot()
    if not changes:
        assert after == before
        return
    regions = live.regions()
    kept, made = after_psc(live.guest_pages(before, regions), changes, live.asid)
    pages = live.guest_pages(after, regions)
    assert {gfn: pages[gfn] for gfn in kept} == kept
    assert {gfn: pages[gfn][:3] for gfn in made} == made
    inside = live.guest_pfns(regions)
    assert [e for e in after if e[0] not in inside] == [e for e in before if e[0] not in inside]


# --- random GHCBs over the events that change or guard state ------------------------------------

EXIT_CPUID, EXIT_MMIO_READ = 0x72, 0x8000_0001
EXIT_AP_JUMP_TABLE, EXIT_PSC = 0x8000_0005, 0x8000_0010
EXIT_GUEST_REQUEST, EXIT_EXT_GUEST_REQUEST = 0x8000_0011, 0x8000_0012
EXIT_AP_CREATION, EXIT_HV_FEATURES = 0x8000_0013, 0x8000_FFFD
CODES = st.sampled_from(
    [
        EXIT_CPUID,
        EXIT_PSC,
        EXIT_AP_CREATION,
        EXIT_AP_JUMP_TABLE,
        EXIT_HV_FEATURES,
        EXIT_GUEST_REQUEST,
        EXIT_EXT_GUEST_REQUEST,
        EXIT_MMIO_READ,
        0x1234,
        0x8000_00FF,
    ]
)
U64 = st.integers(0, 2**64 - 1)
# request/response GPAs: page aligned or not, equal or not, inside guest memory or past it
REQ_GPA = st.sampled_from([0x120000, 0x121000, 0x120008, 0x7FFF_0000, 0]) | U64


def guest_request_answer(live: Live, info1: int, info2: int) -> object:
    """sev_es_validate_vmgexit() SVM_VMGEXIT_GUEST_REQUEST / EXT_GUEST_REQUEST: both GPAs page
    aligned and distinct, else GHCB_ERR_MISSING_INPUT (the `reason` still set there).
    UNVERIFIED(guest-req-page-unmapped): a page outside the memslots is answered
    GHCB_ERR_INVALID_INPUT (KVM fails the run with -EIO). None: the request reaches the
    firmware (not this oracle's business)."""
    if info1 % 4096 or info2 % 4096 or info1 == info2:
        return (MALFORMED, ERR_MISSING_INPUT)
    if not (live.mapped(info1) and live.mapped(info2)):
        return (MALFORMED, ERR_INVALID_INPUT)
    return None


@settings(
    max_examples=examples(80),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    code=CODES,
    info1=REQ_GPA,
    info2=REQ_GPA,
    # mostly every field valid, sometimes one or two not; the bits of other offsets random
    dropped=st.sets(st.sampled_from(sorted(BIT)), max_size=2),
    noise=st.integers(0, 2**128 - 1),
    usage=st.sampled_from([0] * 7 + [1]),
    shared=st.binary(min_size=0, max_size=64),
    rax=U64,
    rbx=U64,
)
def test_random_ghcb_gets_the_exact_answer(
    live: Live,
    code: int,
    info1: int,
    info2: int,
    dropped: set[str],
    noise: int,
    usage: int,
    shared: bytes,
    rax: int,
    rbx: int,
) -> None:
    """A random valid bitmap and usage over the exits: the exact (SW_EXIT_INFO_1, _2), a PSC's
    descriptor written back exactly, and the RMP and the VM unchanged when the exit is refused
    (changed, for a PSC, by exactly its pages)."""
    valid = bitmap(set(BIT) - dropped, noise)
    have = valid_fields(valid)
    regs = {"rax": rax, "rbx": rbx, "sw_scratch": GHCB + SHARED_BUFFER}
    page = ghcb_page(
        {"sw_exit_code": code, "sw_exit_info_1": info1, "sw_exit_info_2": info2, **regs},
        valid,
        shared,
        usage,
    )
    psc: PscAnswer | None = None
    expect: object
    if usage:
        expect = (MALFORMED, ERR_INVALID_USAGE)  # the first check
    elif not {"sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"} <= have:
        expect = (MALFORMED, ERR_MISSING_INPUT)
    elif code == EXIT_PSC:
        if "sw_scratch" not in have:
            expect = (MALFORMED, ERR_MISSING_INPUT)
        else:  # SW_SCRATCH at the shared buffer's start: the whole buffer is the area
            area = page[SHARED_BUFFER:SHARED_BUFFER_END]
            psc = psc_answer(area, live.mapped)
            expect = (0, psc.info2)
    elif code in (EXIT_GUEST_REQUEST, EXIT_EXT_GUEST_REQUEST):
        expect = guest_request_answer(live, info1, info2)
        assume(expect is not None)
    else:
        nae_regs = {"rcx": 0, "rdx": 0, "cpl": 0, "xcr0": 0, **regs}
        table = jump_table(live) if code == EXIT_AP_JUMP_TABLE and info1 == 1 else 0
        expect = nae_answer(have, code, info1, info2, nae_regs, 0, mapped_ranges(live), table)
    refused = isinstance(expect, str) or expect[0] == MALFORMED  # type: ignore[index]
    before = live.rmp_snapshot()
    state = vm_state(live)
    got, back = exit_raw(live, page)
    assert got == expect, (hex(code), hex(info1), hex(info2), sorted(have))
    if psc is not None:
        assert back[SHARED_BUFFER:SHARED_BUFFER_END] == psc.back
        check_rmp(live, before, psc.changes)
    elif refused:
        assert back[SHARED_BUFFER:SHARED_BUFFER_END] == page[SHARED_BUFFER:SHARED_BUFFER_END]
        check_rmp(live, before, [])
        assert vm_state(live) == state


# --- random PSC descriptors anywhere in the shared buffer -----------------------------------------

ENTRY = st.tuples(
    # cur_page: mostly none done, or all (1 of a 4K, 512 of a 2M page), or one past
    st.sampled_from([0] * 6 + [1, 1, 512, 512, 2, 513]) | st.integers(0, 0xFFF),
    # gfn: guest memory is GFNs 0..0x1FFF; 2M-aligned ones, and some past the end (GENERIC)
    st.integers(0x1000, 0x1FFF)
    | st.sampled_from([0x1000, 0x1200, 0x1E00, 0x1FFF, 0x2000, 0x2200, 0x7_0000]),
    st.sampled_from([1, 1, 2, 2]) | st.integers(0, 0xF),  # operation
    st.booleans(),  # pagesize
    st.integers(0, 0x7F),  # reserved 63:57
)


@settings(
    max_examples=examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    # the descriptor's offset in the shared buffer: at its start, at the edges, or anywhere
    off=st.sampled_from([0] * 8 + [8, 1024, 2016, 2024, 2025, 2032, -8]) | st.integers(0, 2032),
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
    """KERNEL: arch/x86/kvm/svm/sev.c sev_handle_vmgexit() SVM_VMGEXIT_PSC: the exact code,
    the descriptor as KVM writes it back, the bytes around it untouched, and the RMP changed for
    exactly the pages the walk went through (unchanged on every refusal)."""
    # mostly within the drawn entries, sometimes anywhere (past them, past the area)
    near = st.integers(0, len(entries) + 1)
    last = max(len(entries) - 1, 0)
    cur = data.draw(st.sampled_from([0, 0, 0, 1]) | near | st.integers(0, 300), label="cur")
    end = data.draw(st.sampled_from([last] * 3) | near | st.integers(0, 300), label="end")
    raw = [
        cp | gfn << 12 | op << 52 | int(size) << 56 | rsvd << 57
        for cp, gfn, op, size, rsvd in entries
    ]
    area = SHARED_BUFFER_END - SHARED_BUFFER - off  # bytes from the descriptor to the end
    buf = bytearray(SHARED_BUFFER_END - SHARED_BUFFER)
    if off >= 0 and area >= PSC_HDR_SIZE:
        struct.pack_into("<HHI", buf, off, cur, end, hdr_reserved)
        for i, r in enumerate(raw[: (area - PSC_HDR_SIZE) // PSC_ENTRY_SIZE]):
            struct.pack_into("<Q", buf, off + 8 + 8 * i, r)
    fields = {
        "sw_exit_code": EXIT_PSC,
        "sw_exit_info_1": 0,
        "sw_exit_info_2": 0,
        "sw_scratch": GHCB + SHARED_BUFFER + off,
    }
    page = ghcb_page(fields, bitmap(set(fields)), bytes(buf))
    before = live.rmp_snapshot()
    got, back = exit_raw(live, page)
    out = back[SHARED_BUFFER:SHARED_BUFFER_END]
    if off < 0 or area < PSC_HDR_SIZE:
        # setup_vmgexit_scratch(): outside the shared buffer, or no room for the header.
        # UNVERIFIED(psc-scratch-in-ghcb): as kernels whose setup_vmgexit_scratch() takes
        # sizeof(struct psc_hdr) as the least length for a PSC
        assert got == (MALFORMED, ERR_INVALID_SCRATCH_AREA)
        assert out == bytes(buf)
        check_rmp(live, before, [])
        return
    want = psc_answer(bytes(buf[off:]), live.mapped)
    assert got == (0, want.info2)  # snp_complete_psc(): svm_vmgexit_no_action()
    assert out[:off] == bytes(buf[:off])  # the bytes before the descriptor are the guest's
    assert out[off:] == want.back
    # psc_hdr.reserved is never read, and never written
    assert struct.unpack_from("<I", out, off + 4)[0] == hdr_reserved
    check_rmp(live, before, want.changes)


# --- every NAE event sev_es_validate_vmgexit() accepts -------------------------------------------
# The oracle below is written from arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit(),
# setup_vmgexit_scratch(), sev_es_string_io() and sev_snp_ap_creation(), with the answers of the
# handlers behind them; constants from arch/x86/include/uapi/asm/svm.h and asm/sev-common.h.

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


def mapped_ranges(live: Live) -> list[tuple[int, int]]:
    return [(gpa, gpa + size) for gpa, size in live.slots]


def jump_table(live: Live) -> int:
    """AP_JUMP_TABLE get (SW_EXIT_INFO_1 = 1): what the last set stored."""
    fields = {"sw_exit_code": EXIT_AP_JUMP_TABLE, "sw_exit_info_1": 1, "sw_exit_info_2": 0}
    got, _ = exit_raw(live, ghcb_page(fields, bitmap(set(fields))))
    assert isinstance(got, tuple) and got[0] == 0, got
    return int(got[1])


@settings(
    max_examples=examples(250),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
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
    page = ghcb_page(
        {"sw_exit_code": code, "sw_exit_info_1": info1, "sw_exit_info_2": info2, **regs},
        bitmap(valid, noise),
        usage=usage,
    )

    def state() -> tuple[object, ...]:
        window = live.run(live.guest.read(0x200000, 2 * 4096, private=False)).data
        return vm_state(live), jump_table(live), bytes(window)

    expect = nae_answer(
        valid, code, info1, info2, regs, usage, mapped_ranges(live), jump_table(live)
    )
    refused = isinstance(expect, str) or expect[0] == MALFORMED  # type: ignore[index]
    if refused:
        before = (live.rmp_snapshot(), state())
    got, back = exit_raw(live, page)
    assert got == expect, (hex(code), hex(info1), hex(info2), sorted(valid))
    if refused:
        assert back[SHARED_BUFFER:SHARED_BUFFER_END] == page[SHARED_BUFFER:SHARED_BUFFER_END]
        assert (live.rmp_snapshot(), state()) == before
