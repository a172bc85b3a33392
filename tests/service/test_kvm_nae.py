"""Every NAE event kvm accepts in a full-GHCB exit, AP creation and the AP reset hold, over gRPC.

The expected values are written here from upstream, not taken from snpemu:
arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit(), setup_vmgexit_scratch(), sev_handle_vmgexit(),
sev_snp_ap_creation(), sev_handle_vmgexit_msr_protocol(), sev_vcpu_deliver_sipi_vector();
arch/x86/include/uapi/asm/svm.h (exit codes); arch/x86/kvm/svm/svm.h
svm_vmgexit_inject_exception(); arch/x86/kvm/x86.c ____kvm_emulate_hypercall().
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from snp.kvm.v1 import kvm_pb2
from snpemu.abi import ghcb as g
from snpemu.runtime.status import error_info

from tests.service import live as live_stack
from tests.service.host_stack import Guest

# arch/x86/include/uapi/asm/svm.h
READ_DR7, WRITE_DR7, RDTSC, RDPMC, CPUID, INVD = 0x27, 0x37, 0x6E, 0x6F, 0x72, 0x76
IOIO, MSR, VMMCALL, RDTSCP, WBINVD, MONITOR, MWAIT = 0x7B, 0x7C, 0x81, 0x87, 0x89, 0x8A, 0x8B
MMIO_READ, MMIO_WRITE, NMI_COMPLETE = 0x8000_0001, 0x8000_0002, 0x8000_0003
AP_HLT_LOOP, AP_JUMP_TABLE, AP_CREATION, HV_FEATURES = (
    0x8000_0004,
    0x8000_0005,
    0x8000_0013,
    0x8000_FFFD,
)
# arch/x86/include/asm/sev-common.h GHCB_ERR_*; arch/x86/include/asm/svm.h GHCB_HV_RESP_*
MISSING_INPUT, INVALID_INPUT, INVALID_SCRATCH_AREA = 4, 5, 3
MALFORMED, ISSUE_EXCEPTION = 2, 1
# SVM_EVTINJ_VALID | SVM_EVTINJ_TYPE_EXEPT | X86_TRAP_GP / X86_TRAP_UD
INJECT_GP, INJECT_UD = 1 << 31 | 3 << 8 | 13, 1 << 31 | 3 << 8 | 6
GHCB_GPA, AP_GHCB_GPA = 0x100000, 0x110000
# GHCB_MSR_AP_RESET_HOLD_REQ/RESP, GHCB_MSR_REG_GPA_REQ/RESP
HOLD_REQ, HOLD_RESP, REG_GPA_REQ, REG_GPA_RESP = 0x006, 0x007, 0x012, 0x013


async def call(rpc: Any, request: Any) -> Any:
    return await rpc(request)


class Live(live_stack.Live):
    """The module's stack and 2-vCPU guest; each vCPU registers a GHCB."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, vcpus=2, ghcbs=(GHCB_GPA, AP_GHCB_GPA))
        self.bsp, self.ap = self.guests
        self.exits: Any = self.stack.runtimes["kvm"].impl.servicer.exits  # type: ignore[attr-defined]

    def exit(
        self,
        code: int,
        info1: int = 0,
        info2: int = 0,
        *,
        on: Guest | None = None,
        shared: bytes = b"",
        **regs: int,
    ) -> tuple[tuple[int, int], g.Ghcb]:
        x = g.Ghcb()
        for k, v in (("sw_exit_code", code), ("sw_exit_info_1", info1), ("sw_exit_info_2", info2)):
            x.set(k, v)
        for k, v in regs.items():
            x.set(k, v)
        x.shared[: len(shared)] = shared
        r, back = self.run((on or self.bsp).vmgexit(x))
        return (r.sw_exit_info_1, r.sw_exit_info_2), back

    def msr(self, value: int, on: Guest | None = None) -> int:
        return int(self.run((on or self.bsp).msr(value)).ghcb_msr)

    def failed(self, code: int, **regs: int) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            self.exit(code, **regs)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        return str(error_info(info.value).reason)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    x = Live(tmp_path_factory.mktemp("nae"))
    yield x
    x.close()


# sev_es_validate_vmgexit(): each event's required fields beyond the three exit fields
REQUIRED = {
    READ_DR7: (),
    WRITE_DR7: ("rax",),
    RDPMC: ("rcx",),
    CPUID: ("rax", "rcx"),
    INVD: (),
    VMMCALL: ("rax", "cpl"),
    RDTSCP: (),
    WBINVD: (),
    MONITOR: ("rax", "rcx", "rdx"),
    MWAIT: ("rax", "rcx"),
    MMIO_READ: ("sw_scratch",),
    MMIO_WRITE: ("sw_scratch",),
    NMI_COMPLETE: (),
    HV_FEATURES: (),
}


def test_each_event_needs_its_fields_valid(live: Live) -> None:
    """sev_es_validate_vmgexit(): a missing field is (2, GHCB_ERR_MISSING_INPUT)."""
    full = {"rax": 1, "rcx": 0, "rdx": 0, "cpl": 0, "sw_scratch": GHCB_GPA + 0x800}
    for code, need in REQUIRED.items():
        for drop in need:
            regs = {k: full[k] for k in need if k != drop}
            assert live.exit(code, **regs)[0] == (MALFORMED, MISSING_INPUT), (hex(code), drop)
        assert live.exit(code, **{k: full[k] for k in need})[0][0] != MALFORMED, hex(code)


def test_cpuid_leaf_0xd_needs_xcr0(live: Live) -> None:
    """sev_es_validate_vmgexit() SVM_EXIT_CPUID: XCR0 is required when the 64-bit RAX is 0xD."""
    assert live.exit(CPUID, rax=0xD, rcx=0)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(CPUID, rax=0xD, rcx=0, xcr0=1)[0] == (0, 0)
    assert live.exit(CPUID, rax=1 << 32 | 0xD, rcx=0)[0] == (0, 0)  # RAX is not 0xD


def test_ioio(live: Live) -> None:
    """SVM_EXIT_IOIO: RAX for OUT, SW_SCRATCH for string IO (sev_es_validate_vmgexit());
    IN of an unclaimed port reads all ones, merged below 4 bytes (complete_fast_pio_in())."""
    port = 0x510 << 16
    out, inb = port | 1 << 4, port | 1 << 4 | 1
    assert live.exit(IOIO, out)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(IOIO, out, rax=0x41)[0] == (0, 0)
    r, back = live.exit(IOIO, inb)  # RAX not valid: reads as 0
    assert (r, back.get("rax")) == ((0, 0), 0xFF)
    rax = 0x1234_5678_9ABC_DEF0
    assert live.exit(IOIO, port | 2 << 4 | 1, rax=rax)[1].get("rax") == 0x1234_5678_9ABC_FFFF
    assert live.exit(IOIO, port | 4 << 4 | 1, rax=rax)[1].get("rax") == 0xFFFF_FFFF
    # string IO: INS of 3 words into the shared buffer
    ins = port | 2 << 4 | 1 << 2 | 1
    assert live.exit(IOIO, ins, 3)[0] == (MALFORMED, MISSING_INPUT)
    r, back = live.exit(IOIO, ins, 3, sw_scratch=GHCB_GPA + 0x800, shared=bytes(8))
    assert (r, bytes(back.shared[:8])) == ((0, 0), b"\xff" * 6 + bytes(2))
    # OUTS ending past the shared buffer (GHCB + 0xFF0)
    outs = port | 2 << 4 | 1 << 2
    assert live.exit(IOIO, outs, 3, sw_scratch=GHCB_GPA + 0xFF0 - 4)[0] == (
        MALFORMED,
        INVALID_SCRATCH_AREA,
    )
    big = {"sw_exit_info_1": outs, "sw_exit_info_2": 2**31, "sw_scratch": GHCB_GPA + 0x800}
    assert live.failed(IOIO, **big) == "STRING_IO_COUNT"  # sev_es_string_io(): -EINVAL


def test_msr(live: Live) -> None:
    """SVM_EXIT_MSR needs RCX, and RAX and RDX to write; an MSR kvm does not know, and every
    write, is #GP as svm_complete_emulated_msr() gives it: (1, VALID | EXEPT | 13)."""
    assert live.exit(MSR, 0)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(MSR, 1, rcx=0x10, rax=0)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(MSR, 0, rcx=0xC001_0131)[0] == (ISSUE_EXCEPTION, INJECT_GP)
    assert live.exit(MSR, 1, rcx=0x10, rax=0, rdx=0)[0] == (ISSUE_EXCEPTION, INJECT_GP)
    live.exits.tsc = lambda: 0x1_2345_6789  # the injected TSC
    r, back = live.exit(MSR, 0, rcx=0x10)
    assert (r, back.get("rax"), back.get("rdx")) == ((0, 0), 0x2345_6789, 1)
    # MSR_IA32_APICBASE at reset: 0xFEE00000 | ENABLE (bit 11) | BSP (bit 8) on vCPU 0
    assert live.exit(MSR, 0, rcx=0x1B)[1].get("rax") == 0xFEE0_0900
    assert live.exit(MSR, 0, rcx=0x1B, on=live.ap)[1].get("rax") == 0xFEE0_0800


def test_vmmcall_and_the_small_events(live: Live) -> None:
    """____kvm_emulate_hypercall(): -KVM_ENOSYS (1000) for an unknown number, 0 for
    KVM_HC_VAPIC_POLL_IRQ (1), -KVM_EPERM (1) from CPL 3. RDTSCP is #UD
    (kvm_handle_invalid_op()), RDPMC #GP, RDTSC has no handler (svm_invoke_exit_handler())."""
    assert live.exit(VMMCALL, rax=0x1234, cpl=0)[1].get("rax") == 2**64 - 1000
    assert live.exit(VMMCALL, rax=1, cpl=0)[1].get("rax") == 0
    assert live.exit(VMMCALL, rax=1, cpl=3)[1].get("rax") == 2**64 - 1
    assert live.exit(RDTSCP)[0] == (ISSUE_EXCEPTION, INJECT_UD)
    assert live.exit(RDPMC, rcx=0)[0] == (ISSUE_EXCEPTION, INJECT_GP)
    for code in (INVD, WBINVD, READ_DR7, NMI_COMPLETE):
        assert live.exit(code)[0] == (0, 0), hex(code)
    assert live.exit(WRITE_DR7, rax=0x400)[0] == (0, 0)
    assert live.exit(MONITOR, rax=0, rcx=0, rdx=0)[0] == (0, 0)
    assert live.exit(MWAIT, rax=0, rcx=0)[0] == (0, 0)
    assert live.failed(RDTSC) == "UNEXPECTED_EXIT_REASON"


def test_mmio_scratch_area(live: Live) -> None:
    """setup_vmgexit_scratch(): in the GHCB page only [0x800, 0xFF0); elsewhere up to 16 pages
    of guest memory; 0 and a wrapping end refused with GHCB_ERR_INVALID_SCRATCH_AREA. An MMIO
    read of an unclaimed address reads all ones."""
    bad = (MALFORMED, INVALID_SCRATCH_AREA)
    assert live.exit(MMIO_READ, 0xFEB0_0000, 8)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(MMIO_READ, 0xFEB0_0000, 8, sw_scratch=0)[0] == bad
    assert live.exit(MMIO_READ, 0xFEB0_0000, 8, sw_scratch=GHCB_GPA + 0x7F8)[0] == bad
    assert live.exit(MMIO_READ, 0xFEB0_0000, 8, sw_scratch=GHCB_GPA + 0xFEC)[0] == bad
    assert live.exit(MMIO_READ, 0, 16, sw_scratch=2**64 - 8)[0] == bad
    assert live.exit(MMIO_WRITE, 0, 16 * 4096 + 1, sw_scratch=0x200000)[0] == bad
    r, back = live.exit(MMIO_READ, 0xFEB0_0000, 8, sw_scratch=GHCB_GPA + 0xFE8)
    assert (r, bytes(back.shared[-8:])) == ((0, 0), b"\xff" * 8)
    # outside the GHCB: 16 pages from an unaligned GPA (17 pieces), written back
    live.run(live.bsp.write(0x200000, bytes(17 * 4096), private=False))
    assert live.exit(MMIO_READ, 0xFEB0_0000, 16 * 4096, sw_scratch=0x200010)[0] == (0, 0)
    data = bytes(live.run(live.bsp.read(0x200000, 17 * 4096, private=False)).data)
    assert data == bytes(16) + b"\xff" * 16 * 4096 + bytes(4096 - 16)
    assert live.exit(MMIO_WRITE, 0xFEB0_0000, 8, sw_scratch=0x200000)[0] == (0, 0)
    assert live.failed(MMIO_READ, sw_exit_info_2=8, sw_scratch=0x7FFF_0000) == "SCRATCH_NOT_MAPPED"


def test_ap_creation_checks_in_upstream_order(live: Live) -> None:
    """sev_es_validate_vmgexit() wants RAX for any request but DESTROY (MISSING_INPUT) before
    sev_snp_ap_creation() looks at the APIC ID; the VMSA GPA needs page_address_valid() only."""
    create = 1 << 32 | 1
    assert live.exit(AP_CREATION, 9 << 32 | 1, 0x301000)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(AP_CREATION, 1 << 32 | 7, 0x301000)[0] == (MALFORMED, MISSING_INPUT)
    assert live.exit(AP_CREATION, 9 << 32 | 2)[0] == (MALFORMED, INVALID_INPUT)  # DESTROY
    assert live.exit(AP_CREATION, 9 << 32 | 1, 0x301000, rax=1)[0] == (MALFORMED, INVALID_INPUT)
    # outside every memslot, aligned, below MAXPHYADDR: accepted
    assert live.exit(AP_CREATION, create, 0x7FFF_1000, rax=1)[0] == (0, 0)
    assert live.exit(AP_CREATION, create, 1 << 51 | 0x7FFF_1000, rax=1)[0] == (0, 0)  # C-bit
    for gpa in (0x301008, 1 << 48 | 0x1000, 1 << 63 | 0x1000, 0x400000):
        assert live.exit(AP_CREATION, create, gpa, rax=1)[0] == (MALFORMED, INVALID_INPUT), hex(gpa)


def test_ap_reset_hold(live: Live) -> None:
    """kvm_emulate_ap_reset_hold() holds the AP with the result 0; the BSP's AP creation wakes
    it and the result reads 1 (sev_vcpu_deliver_sipi_vector()), for the MSR protocol (result in
    bits 63:12) and the AP_HLT_LOOP event (SW_EXIT_INFO_2)."""
    ap = live.ap
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP  # still held
    assert live.exit(AP_CREATION, 1 << 32, 0x301000, rax=1)[0] == (0, 0)  # ON_INIT: no wake
    assert live.exit(AP_CREATION, 1 << 32 | 1, 0x7FFF_1000, rax=1)[0] == (0, 0)  # no memslot
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP
    assert live.exit(AP_CREATION, 1 << 32 | 1, 0x301000, rax=1)[0] == (0, 0)
    assert live.msr(HOLD_REQ, ap) == 1 << 12 | HOLD_RESP
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP  # a new hold
    # AP_HLT_LOOP: a hold entered by the MSR protocol goes on as a NAE hold
    assert live.exit(AP_HLT_LOOP, on=ap)[0] == (0, 0)
    live.exit(AP_CREATION, 1 << 32 | 1, 0x301000, rax=1)
    assert live.exit(AP_HLT_LOOP, on=ap)[0] == (0, 1)
    # any other exit means the AP ran: the hold is gone and a later wake-up finds nothing
    assert live.exit(AP_HLT_LOOP, on=ap)[0] == (0, 0)
    assert live.exit(HV_FEATURES, on=ap)[0] == (0, 3)
    live.exit(AP_CREATION, 1 << 32 | 1, 0x301000, rax=1)
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP
    # so does a nested page fault
    npf = kvm_pb2.NestedPageFaultRequest(identity=ap.ident, gpa=0x300000, error_code=0)
    live.run(call(live.stack.kvm.NestedPageFault, npf))
    live.exit(AP_CREATION, 1 << 32 | 1, 0x301000, rax=1)
    assert live.msr(HOLD_REQ, ap) == HOLD_RESP


def test_reg_gpa_echoes_any_gfn(live: Live) -> None:
    """GHCB_MSR_REG_GPA_REQ records and echoes any GFN; a GHCB exit with it unmapped fails."""
    ap = live.ap
    assert live.msr((2**52 - 1) << 12 | REG_GPA_REQ, ap) == (2**52 - 1) << 12 | REG_GPA_RESP
    assert live.msr(0x7FFF_0000 | REG_GPA_REQ, ap) == 0x7FFF_0000 | REG_GPA_RESP
    with pytest.raises(grpc.aio.AioRpcError) as info:
        live.run(call(live.stack.kvm.Vmgexit, kvm_pb2.VmgexitRequest(identity=ap.ident)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "GHCB_NOT_MAPPED"  # type: ignore[union-attr]
    live.run(ap.register_ghcb(AP_GHCB_GPA))
    assert live.exit(HV_FEATURES, on=ap)[0] == (0, 3)


def test_ghcb_written_back_with_kvm_valid_bits(live: Live) -> None:
    """sev_es_sync_from_ghcb() clears the guest's bitmap; ghcb_set_sw_exit_info_1/2() and
    sev_es_sync_to_ghcb() (RAX, RBX, RCX, RDX) set the fields KVM writes back with their valid
    bits, a register the exit left alone going back as given (0 when it was not valid). Linux's
    sev_es_ap_hlt_loop() needs the SW_EXIT_INFO_2 bit."""
    # bit = offset / 8: sw_exit_info_1 0x398, sw_exit_info_2 0x3A0, rax 0x1F8, rcx 0x308,
    # rdx 0x310, rbx 0x318 (struct ghcb_save_area)
    bits = sum(1 << off // 8 for off in (0x398, 0x3A0, 0x1F8, 0x308, 0x310, 0x318))
    r, back = live.exit(HV_FEATURES, rcx=0x55, xcr0=1)
    assert (r, back.valid) == ((0, 3), bits)
    assert (back.get("rax"), back.get("rbx"), back.get("rcx"), back.get("rdx")) == (0, 0, 0x55, 0)
    r, back = live.exit(CPUID, rax=0x8000_001F, rcx=0)
    assert back.valid == bits and back.get("rbx") & 0x3F == 51
    r, back = live.exit(MSR, 0, rcx=0xC001_0131)  # refused: #GP, registers as given
    assert (r, back.valid, back.get("rcx")) == ((ISSUE_EXCEPTION, INJECT_GP), bits, 0xC001_0131)
