"""The NAE events of a full-GHCB VMGEXIT: which fields each needs valid, how the GHCB goes back,
and what kvm does for the small ones (the rest: the modules of this package, and
scratch.py for IOIO and MMIO).

KERNEL: arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit() (REQUIRED below), sev_handle_vmgexit()
(its default case hands the SVM_EXIT_* codes to svm_invoke_exit_handler()), and the handlers of
arch/x86/kvm/svm/svm.c svm_exit_handlers[] with arch/x86/kvm/x86.c behind them.

What each event does here:

  READ_DR7, WRITE_DR7   nothing (dr_interception() returns at once for an SEV-ES guest)
  RDTSC                 fails the vCPU run: svm_exit_handlers[] has no RDTSC entry, so
                        svm_invoke_exit_handler() reports an unexpected exit reason
  RDTSCP                #UD (kvm_handle_invalid_op())
  RDPMC                 #GP: no virtual PMU (kvm_emulate_rdpmc() with kvm_rdpmc() failing)
  INVD, WBINVD          no-ops that complete (kvm_emulate_invd(), kvm_emulate_wbinvd())
  MONITOR, MWAIT        no-ops (kvm_emulate_monitor_mwait() with KVM's default quirks, which
                        include KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS)
  VMMCALL               KVM's hypercall ABI: RAX = 0 for KVM_HC_VAPIC_POLL_IRQ, -KVM_ENOSYS for
                        other numbers, -KVM_EPERM from CPL > 0 (____kvm_emulate_hypercall())
  MSR                   RDMSR of the TSC and APIC base; #GP for other MSRs and every WRMSR,
                        given as svm_complete_emulated_msr() does (ISSUE_EXCEPTION, #GP)
  IOIO                  no device claims a port: IN reads all ones, OUT is dropped
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from snpemu.abi import ghcb as g
from snpemu.abi.addr import page_aligned
from snpemu.errors import WrongState
from snpemu.kvm.exits.ap import AP_DESTROY
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.vm import Vcpu

# sev_es_validate_vmgexit(): the fields each event needs valid besides SW_EXIT_CODE and
# SW_EXIT_INFO_1/2 (those always). Conditional needs are in _conditional(). An exit code that
# is not a key is GHCB_ERR_INVALID_EVENT.
REQUIRED: dict[int, tuple[str, ...]] = {
    g.EXIT_READ_DR7: (),
    g.EXIT_WRITE_DR7: ("rax",),
    g.EXIT_RDTSC: (),
    g.EXIT_RDPMC: ("rcx",),
    g.EXIT_CPUID: ("rax", "rcx"),  # and XCR0 when RAX = 0xD
    g.EXIT_INVD: (),
    g.EXIT_IOIO: (),  # SW_SCRATCH for string IO, RAX for OUT
    g.EXIT_MSR: ("rcx",),  # and RAX, RDX for a write (SW_EXIT_INFO_1 != 0)
    g.EXIT_VMMCALL: ("rax", "cpl"),
    g.EXIT_RDTSCP: (),
    g.EXIT_WBINVD: (),
    g.EXIT_MONITOR: ("rax", "rcx", "rdx"),
    g.EXIT_MWAIT: ("rax", "rcx"),
    g.EXIT_MMIO_READ: ("sw_scratch",),
    g.EXIT_MMIO_WRITE: ("sw_scratch",),
    g.EXIT_AP_CREATION: (),  # RAX unless the request is AP_DESTROY
    g.EXIT_NMI_COMPLETE: (),
    g.EXIT_AP_HLT_LOOP: (),
    g.EXIT_AP_JUMP_TABLE: (),
    g.EXIT_UNSUPPORTED_EVENT: (),
    g.EXIT_HV_FEATURES: (),
    g.EXIT_TERM_REQUEST: (),
    g.EXIT_PSC: ("sw_scratch",),
    g.EXIT_GUEST_REQUEST: (),  # and page-aligned, distinct request/response GPAs
    g.EXIT_EXT_GUEST_REQUEST: (),
}


def _conditional(code: int, x: g.Ghcb) -> tuple[str, ...]:
    info1 = x.get("sw_exit_info_1")
    if code == g.EXIT_CPUID and x.is_valid("rax") and x.get("rax") == 0xD:
        return ("xcr0",)  # KVM compares the whole 64-bit RAX
    if code == g.EXIT_IOIO:
        if info1 & g.IOIO_STR:
            return ("sw_scratch",)
        return () if info1 & g.IOIO_TYPE_IN else ("rax",)
    if code == g.EXIT_MSR and info1:
        return ("rax", "rdx")
    if code == g.EXIT_AP_CREATION and info1 & 0xFFFFFFFF != AP_DESTROY:
        return ("rax",)
    return ()


def validate(x: g.Ghcb) -> int:
    """0, or the GHCB_ERR_* KVM answers with SW_EXIT_INFO_1 = 2 (the exit does nothing else).

    KERNEL: arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit(): usage first, then the three exit
    fields, then the event's own fields."""
    if x.usage:
        return g.ERR_INVALID_USAGE
    if not all(x.is_valid(f) for f in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")):
        return g.ERR_MISSING_INPUT
    code = x.get("sw_exit_code")
    need = REQUIRED.get(code)
    if need is None:
        return g.ERR_INVALID_EVENT
    if not all(x.is_valid(f) for f in need + _conditional(code, x)):
        return g.ERR_MISSING_INPUT
    if code in (g.EXIT_GUEST_REQUEST, g.EXIT_EXT_GUEST_REQUEST):
        req, res = x.get("sw_exit_info_1"), x.get("sw_exit_info_2")
        if not page_aligned(req) or not page_aligned(res) or req == res:
            return g.ERR_MISSING_INPUT
    return 0


@dataclass
class Reply:
    """SW_EXIT_INFO_1/2 and the registers written back to the GHCB."""

    info1: int = 0
    info2: int = 0
    regs: dict[str, int] = field(default_factory=dict)
    shared: bytearray | None = None  # the GHCB's shared buffer, when the event wrote it


SYNCED = ("rax", "rbx", "rcx", "rdx")


def write_back(x: g.Ghcb, regs: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The valid bitmap and registers of the GHCB as KVM writes it back.

    KERNEL: sev.c sev_es_sync_from_ghcb() clears the guest's bitmap; svm_vmgexit_set_return_code()
    (ghcb_set_sw_exit_info_1/2) and sev_es_unmap_ghcb() -> sev_es_sync_to_ghcb() (RAX, RBX, RCX,
    RDX) set what they write, valid bits included (asm/svm.h ghcb_set_*()). A register the
    exit did not change goes back as the guest gave it, or 0 if it was not valid."""
    out = {r: _reg(x, r) for r in SYNCED} | regs
    bits = sum(1 << g.valid_bit(f) for f in ("sw_exit_info_1", "sw_exit_info_2", *SYNCED))
    return bits, out


def inject(vector: int) -> Reply:
    """KERNEL: arch/x86/kvm/svm/svm.h svm_vmgexit_inject_exception()."""
    return Reply(g.RESP_ISSUE_EXCEPTION, g.EVTINJ_VALID | g.EVTINJ_TYPE_EXEPT | vector)


# --- the SVM exits KVM emulates ------------------------------------------------------------------

MSR_IA32_TSC, MSR_IA32_APICBASE = 0x10, 0x1B  # KERNEL: arch/x86/include/asm/msr-index.h
APIC_DEFAULT_PHYS_BASE = 0xFEE00000  # KERNEL: arch/x86/include/asm/apicdef.h
APICBASE_BSP, APICBASE_ENABLE = 1 << 8, 1 << 11
KVM_HC_VAPIC_POLL_IRQ = 1  # KERNEL: include/uapi/linux/kvm_para.h
KVM_ENOSYS, KVM_EPERM = 1000, 1
U64 = (1 << 64) - 1


def _reg(x: g.Ghcb, name: str) -> int:
    """sev_es_sync_from_ghcb(): a register the guest did not mark valid reads 0."""
    return x.get(name) if x.is_valid(name) else 0


def rdmsr(vcpu: Vcpu, index: int, tsc: Callable[[], int]) -> int | None:
    """The few MSRs kvm answers; None is #GP.

    KERNEL: arch/x86/kvm/x86.c kvm_get_msr_common() MSR_IA32_TSC (the guest's TSC) and
    MSR_IA32_APICBASE, at its arch/x86/kvm/lapic.c kvm_lapic_reset() value (default base,
    enabled, BSP on vCPU 0).
    UNVERIFIED(msr-read-few): KVM answers many more (svm_get_msr(), kvm_get_msr_common():
    x2APIC, PAT, the KVM PV MSRs, ...) and the VMM may set the APIC base; snpemu gives #GP for
    the rest."""
    if index == MSR_IA32_TSC:
        return tsc() & U64
    if index == MSR_IA32_APICBASE:
        return APIC_DEFAULT_PHYS_BASE | APICBASE_ENABLE | (APICBASE_BSP if vcpu.vcpu_id == 0 else 0)
    return None


def msr(vcpu: Vcpu, x: g.Ghcb, tsc: Callable[[], int]) -> Reply:
    """KERNEL: svm.c msr_interception() (SW_EXIT_INFO_1 != 0 is WRMSR), x86.c
    kvm_emulate_rdmsr()/kvm_emulate_wrmsr(), svm.c svm_complete_emulated_msr()."""
    index = _reg(x, "rcx") & 0xFFFFFFFF
    if x.get("sw_exit_info_1"):
        # UNVERIFIED(msr-write-gp): KVM accepts WRMSR of the MSRs kvm_set_msr_common() and
        # svm_set_msr() know; snpemu keeps no guest MSR state and gives #GP for every write.
        return inject(g.VECTOR_GP)
    data = rdmsr(vcpu, index, tsc)
    if data is None:
        return inject(g.VECTOR_GP)
    return Reply(regs={"rax": data & 0xFFFFFFFF, "rdx": data >> 32})


def vmmcall(x: g.Ghcb) -> Reply:
    """KERNEL: arch/x86/kvm/x86.c ____kvm_emulate_hypercall(): 64-bit (guest state is
    protected), CPL from the GHCB. UNVERIFIED(vmmcall-few): KVM_HC_KICK_CPU,
    CLOCK_PAIRING, SEND_IPI, SCHED_YIELD and MAP_GPA_RANGE are not emulated: they answer
    -KVM_ENOSYS here."""
    if x.get("cpl"):
        return Reply(regs={"rax": -KVM_EPERM & U64})
    if _reg(x, "rax") == KVM_HC_VAPIC_POLL_IRQ:
        return Reply(regs={"rax": 0})
    return Reply(regs={"rax": -KVM_ENOSYS & U64})


def ioio_size(info1: int) -> int:
    return (info1 & g.IOIO_SIZE_MASK) >> g.IOIO_SIZE_SHIFT


def port_in(x: g.Ghcb) -> Reply:
    """A non-string IN from a port no device claims: all ones, merged into RAX below 4 bytes
    and zero-extended at 4 (KERNEL: x86.c complete_fast_pio_in()).
    UNVERIFIED(ioio-all-ones): the all-ones value is what QEMU's unassigned_io_read() gives
    the VMM's exit."""
    size = ioio_size(x.get("sw_exit_info_1"))
    val = _reg(x, "rax") if size < 4 else 0
    ones = (1 << 8 * size) - 1
    return Reply(regs={"rax": val & ~ones | ones})


def unexpected_exit(code: int) -> WrongState:
    """KERNEL: svm.c svm_invoke_exit_handler() for a code with no svm_exit_handlers[] entry:
    KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON) to the VMM."""
    return WrongState(
        f"exit code {code:#x} has no KVM handler: the vCPU run fails",
        reason=ExitReason.UNEXPECTED_EXIT_REASON,
    )


def simple(code: int, vcpu: Vcpu, x: g.Ghcb, tsc: Callable[[], int]) -> Reply | None:
    """The events answered from the GHCB alone; None for the others."""
    if code in (g.EXIT_READ_DR7, g.EXIT_WRITE_DR7):
        return Reply()  # KERNEL: svm.c dr_interception(): an SEV-ES guest's DR7 is its own
    if code in (g.EXIT_INVD, g.EXIT_WBINVD, g.EXIT_MONITOR, g.EXIT_MWAIT, g.EXIT_NMI_COMPLETE):
        return Reply()
    if code == g.EXIT_RDTSC:
        raise unexpected_exit(code)
    if code == g.EXIT_RDTSCP:
        # UNVERIFIED(exception-via-ghcb): KVM queues the #UD as an event injection on the next
        # VMRUN (GHCB answer 0); snpemu, having no event channel, answers ISSUE_EXCEPTION.
        return inject(g.VECTOR_UD)
    if code == g.EXIT_RDPMC:
        # UNVERIFIED(exception-via-ghcb): as for RDTSCP, KVM queues #GP(0) (kvm_inject_gp()).
        return inject(g.VECTOR_GP)
    if code == g.EXIT_VMMCALL:
        return vmmcall(x)
    if code == g.EXIT_MSR:
        return msr(vcpu, x, tsc)
    return None
