"""What a vCPU's CPUID and MSR_AMD64_SEV read: the few values a booting SNP guest asks kvm for.

CPUID reaches kvm as a full-GHCB exit (SVM_EXIT_CPUID) and by the MSR protocol
(GHCB_MSR_CPUID_REQ, msr.py); both answer from cpuid() here.
"""

from __future__ import annotations

from snpemu.abi import ghcb as g
from snpemu.kvm.exits.outcome import ExitResult, ExitState, Outcome
from snpemu.kvm.machine import CBIT
from snpemu.kvm.vm import Vcpu, Vm

# CPUID 0x8000001F EBX: C-bit position 5:0, physical address bit reduction 11:6, number of
# VMPLs 15:12 (AMD APM vol. 3, CPUID Fn8000_001F)
PHYS_ADDR_REDUCTION_SHIFT, VMPL_COUNT_SHIFT = 6, 12


def cpuid(vm: Vm, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The few CPUID leaves a booting SNP guest asks the hypervisor for (the rest are zero)."""
    sig = vm.cpuid_signature  # vmsa.vcpu_signature(), fixed at creation: the VMSA's RDX
    if leaf == 0x0:
        return 0x10, 0x68747541, 0x444D4163, 0x69746E65  # max leaf, "AuthenticAMD"
    if leaf == 0x1:
        return sig, len(vm.vcpus) << 16, 1 << 31, 0x178BFBFF  # ECX bit 31: hypervisor present
    if leaf == 0x8000_0000:
        return 0x8000_001F, 0x68747541, 0x444D4163, 0x69746E65
    if leaf == 0x8000_001F:
        # SEV, SEV-ES, SNP, VMPL supported; C-bit 51, 1 bit of address reduction, 4 VMPLs
        ebx = CBIT | 1 << PHYS_ADDR_REDUCTION_SHIFT | 4 << VMPL_COUNT_SHIFT
        return 0x0001_003A | 0x2, ebx, 99, 100
    return 0, 0, 0, 0


def sev_status(vm: Vm) -> int:
    """MSR_AMD64_SEV (0xC0010131): SEV | SEV-ES | SNP, then SEV_FEATURES bits shifted by 2."""
    return 0b111 | (vm.sev_features >> 1) << 3


async def cpuid_exit(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    eax, ebx, ecx, edx = cpuid(vm, ghcb.get("rax") & 0xFFFFFFFF, ghcb.get("rcx") & 0xFFFFFFFF)
    return ExitResult(), {"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx}, None
