"""The buffer SNP_PLATFORM_STATUS writes: struct sev_user_data_snp_status (0x20 bytes).

KERNEL: include/uapi/linux/psp-sev.h struct sev_user_data_snp_status; SPEC: SNP ABI
"SNP_PLATFORM_STATUS" (docs/abi.md#firmware-commands):
    u8 api_major, u8 api_minor, u8 state, u8 is_rmp_initialized (bit 0), u32 build_id,
    u32 flags (StatusFlag), u32 guest_count, u64 current_tcb_version, u64 reported_tcb_version
`state` is enum sev_state (0 UNINIT, 1 INIT, 2 WORKING).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

LAYOUT = struct.Struct("<BBBBIIIQQ")
SIZE = LAYOUT.size  # 0x20


class StatusFlag(enum.IntFlag):
    """The bit fields of the u32 after build_id."""

    MASK_CHIP_ID = 1 << 0
    MASK_CHIP_KEY = 1 << 1
    VLEK_EN = 1 << 2
    FEATURE_INFO = 1 << 3
    RAPL_DIS = 1 << 4
    CIPHERTEXT_HIDING_CAP = 1 << 5
    CIPHERTEXT_HIDING_EN = 1 << 6


@dataclass(frozen=True)
class PlatformStatus:
    api_major: int
    api_minor: int
    state: int  # enum sev_state
    is_rmp_initialized: bool
    build_id: int
    flags: StatusFlag
    guest_count: int
    current_tcb: int
    reported_tcb: int

    def pack(self) -> bytes:
        return LAYOUT.pack(
            self.api_major,
            self.api_minor,
            self.state,
            int(self.is_rmp_initialized),
            self.build_id,
            int(self.flags),
            self.guest_count,
            self.current_tcb,
            self.reported_tcb,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> PlatformStatus:
        major, minor, state, rmp_init, build, flags, guests, cur, rep = LAYOUT.unpack_from(raw, 0)
        return cls(
            api_major=major,
            api_minor=minor,
            state=state,
            is_rmp_initialized=bool(rmp_init & 1),
            build_id=build,
            flags=StatusFlag(flags),
            guest_count=guests,
            current_tcb=cur,
            reported_tcb=rep,
        )


class PlatformState(enum.IntEnum):
    """The legacy SEV platform state: KERNEL: drivers/crypto/ccp/sev-dev.h enum sev_state, plus
    one (matches snp.psp.v1.PlatformState)."""

    UNINIT = 1
    INIT = 2
    WORKING = 3
