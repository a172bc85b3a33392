"""The initial VMSA (4 KiB sev_es_save_area) of each vCPU, with QEMU's register values.

KERNEL: arch/x86/include/asm/svm.h struct sev_es_save_area; QEMU target/i386/sev.c and the
reset state KVM gives a vCPU. Values as sev-snp-measure's vmsa.py sets them (docs/abi.md#vmsa).
"""

from __future__ import annotations

import struct

VMSA_SIZE = 4096
BSP_EIP = 0xFFFFFFF0
G_PAT = 0x0007040600070406  # PAT MSR reset value. SPEC: APM vol 2, A.3

# Segment registers: {u16 selector, u16 attrib, u32 limit, u64 base}
_SEG = struct.Struct("<HHIQ")
SEGMENTS = {
    "es": 0x00,
    "cs": 0x10,
    "ss": 0x20,
    "ds": 0x30,
    "fs": 0x40,
    "gs": 0x50,
    "gdtr": 0x60,
    "ldtr": 0x70,
    "idtr": 0x80,
    "tr": 0x90,
}
U64_FIELDS = {
    "efer": 0xD0,
    "cr4": 0x148,
    "cr0": 0x158,
    "dr7": 0x160,
    "dr6": 0x168,
    "rflags": 0x170,
    "rip": 0x178,
    "g_pat": 0x268,
    "rdx": 0x310,
    "sev_features": 0x3B0,
    "xcr0": 0x3E8,
}
MXCSR, X87_FCW = 0x408, 0x410

# CPUID(1).EAX signatures of QEMU's EPYC models (sev-snp-measure vcpu_types.py).
VCPU_SIGNATURES = {
    "EPYC": 0x00800F12,
    "EPYC-Rome": 0x00830F10,
    "EPYC-Milan": 0x00A00F11,
    "EPYC-Genoa": 0x00A10F10,
    "EPYC-Turin": 0x00B00F00,
}
STEPPING_MASK = 0xF  # CPUID(1).EAX bits 3:0. SPEC: AMD CPUID Specification #25481


def vcpu_signature(vcpu_type: str, host_signature: int | None = None) -> int:
    """CPUID(1).EAX of a vCPU: what kvm answers for CPUID leaf 1 and the VMSA's RDX at reset.

    QEMU's model signature; a model of the host's own family and model takes the host's stepping, so
    the guest sees the stepping the VCEK's productName names (Milan-B0: stepping 0). With the
    default host (Milan-B1) every model keeps QEMU's signature, which is what sev-snp-measure
    --vcpu-type predicts. UNVERIFIED(vcpu-host-stepping): QEMU's named models fix the stepping
    (target/i386/cpu.c builtin_x86_defs, EPYC-Milan: 1) whatever the host's; snpemu follows the
    host's, as `-cpu host` would.
    """
    sig = VCPU_SIGNATURES[vcpu_type]
    if host_signature is not None and sig & ~STEPPING_MASK == host_signature & ~STEPPING_MASK:
        return host_signature
    return sig


def build(eip: int, vcpu_signature: int, sev_features: int) -> bytes:
    page = bytearray(VMSA_SIZE)
    segments = {
        "es": (0, 0x93, 0xFFFF, 0),
        "cs": (0xF000, 0x9B, 0xFFFF, eip & 0xFFFF0000),
        "ss": (0, 0x93, 0xFFFF, 0),
        "ds": (0, 0x93, 0xFFFF, 0),
        "fs": (0, 0x93, 0xFFFF, 0),
        "gs": (0, 0x93, 0xFFFF, 0),
        "gdtr": (0, 0, 0xFFFF, 0),
        "ldtr": (0, 0x82, 0xFFFF, 0),
        "idtr": (0, 0, 0xFFFF, 0),
        "tr": (0, 0x8B, 0xFFFF, 0),
    }
    for name, seg in segments.items():
        _SEG.pack_into(page, SEGMENTS[name], *seg)
    values = {
        "efer": 0x1000,  # EFER.SVME, set by KVM
        "cr4": 0x40,  # CR4.MCE
        "cr0": 0x10,
        "dr7": 0x400,
        "dr6": 0xFFFF0FF0,
        "rflags": 0x2,
        "rip": eip & 0xFFFF,
        "g_pat": G_PAT,
        "rdx": vcpu_signature,  # the reset value of EDX is the CPUID(1) signature
        "sev_features": sev_features,
        "xcr0": 0x1,
    }
    for name, value in values.items():
        struct.pack_into("<Q", page, U64_FIELDS[name], value)
    struct.pack_into("<I", page, MXCSR, 0x1F80)
    struct.pack_into("<H", page, X87_FCW, 0x37F)
    return bytes(page)
