"""The emulated platform's SNP ASID range, which kvm allocates from and the firmware checks.

SNP and SEV-ES guests use ASIDs 1..min_sev_asid-1, min_sev_asid being CPUID 0x8000001F EDX
(KERNEL: arch/x86/kvm/svm/sev.c sev_hardware_setup()); kvm reports MAX_SNP_ASID + 1 there.
"""

from __future__ import annotations

MIN_SNP_ASID = 1
MAX_SNP_ASID = 99
