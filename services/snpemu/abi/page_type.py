"""SNP_LAUNCH_UPDATE page types. KERNEL: include/linux/psp-sev.h SNP_PAGE_TYPE_*; SPEC: SNP ABI
"SNP_LAUNCH_UPDATE" PAGE_TYPE (docs/abi.md#page-info). The values match snp.psp.v1.PageType."""

from __future__ import annotations

import enum


class PageType(enum.IntEnum):
    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6
