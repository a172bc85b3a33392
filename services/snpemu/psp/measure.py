"""The launch digest: SHA-384 over one PAGE_INFO per launched page.

SPEC: SNP ABI 8.17.2 "Layout of the PAGE_INFO structure" (docs/abi.md#page-info); the same chaining
sev-snp-measure implements (sevsnpmeasure/gctx.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

LD_SIZE = 48
PAGE_INFO_LEN = 0x70
# Page types whose CONTENTS field is the SHA-384 of the page; the others record 48 zeros.
MEASURED_TYPES = {1, 2}  # NORMAL, VMSA

_PAGE_INFO_TAIL = struct.Struct(
    "<HBBBBBBQ"
)  # LENGTH, PAGE_TYPE, IMI, VMPL3, VMPL2, VMPL1, rsvd, GPA


def page_info(
    digest: bytes,
    contents: bytes,
    page_type: int,
    gpa: int,
    *,
    imi: bool = False,
    vmpl1: int = 0,
    vmpl2: int = 0,
    vmpl3: int = 0,
) -> bytes:
    """The 0x70-byte PAGE_INFO: DIGEST_CUR, CONTENTS, LENGTH, PAGE_TYPE, IMI_PAGE,
    VMPL3/2/1_PERMS, reserved, GPA."""
    tail = _PAGE_INFO_TAIL.pack(PAGE_INFO_LEN, page_type, int(imi), vmpl3, vmpl2, vmpl1, 0, gpa)
    info = digest + contents + tail
    assert len(info) == PAGE_INFO_LEN
    return info


@dataclass
class LaunchDigest:
    value: bytes = field(default=bytes(LD_SIZE))

    def update(
        self,
        page_type: int,
        gpa: int,
        page: bytes | None,
        *,
        vmpl_perms: tuple[int, int, int] = (0, 0, 0),
    ) -> bytes:
        if page_type in MEASURED_TYPES:
            if page is None:
                raise ValueError("measured page types need the page contents")
            contents = hashlib.sha384(page).digest()
        else:
            contents = bytes(LD_SIZE)
        info = page_info(
            self.value,
            contents,
            page_type,
            gpa,
            vmpl1=vmpl_perms[0],
            vmpl2=vmpl_perms[1],
            vmpl3=vmpl_perms[2],
        )
        self.value = hashlib.sha384(info).digest()
        return self.value
