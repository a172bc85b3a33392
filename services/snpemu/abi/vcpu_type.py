"""The vCPU models a guest may be launched as: QEMU's -cpu names for SNP and the values of
snp.kvm.v1.VcpuType. The model decides the VMSA's RDX (the CPUID(1) signature), so it is part
of the launch measurement. SPEC: sev-snp-measure sevsnpmeasure/vcpu_types.py (CPU_SIGS).
"""

from __future__ import annotations

VCPU_TYPES = {1: "EPYC", 2: "EPYC-Rome", 3: "EPYC-Milan", 4: "EPYC-Genoa", 5: "EPYC-Turin"}
DEFAULT_VCPU_TYPE = 3  # EPYC-Milan, when a config names none


def vcpu_type_of(name: str) -> int:
    """The VcpuType value of a QEMU -cpu name; KeyError for a name that is not one."""
    return {n: v for v, n in VCPU_TYPES.items()}[name]
