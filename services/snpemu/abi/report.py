"""Parse the 1184-byte ATTESTATION_REPORT (layout: docs/abi.md#report; build: snpemu.psp.report)."""

from __future__ import annotations

import struct
from typing import Any

REPORT_SIZE = 0x4A0


def parse(report: bytes) -> dict[str, Any]:
    if len(report) != REPORT_SIZE:
        raise ValueError(f"an attestation report is {REPORT_SIZE} bytes, got {len(report)}")

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", report, off)[0])

    def u64(off: int) -> int:
        return int(struct.unpack_from("<Q", report, off)[0])

    return {
        "version": u32(0x000),
        "guest_svn": u32(0x004),
        "policy": u64(0x008),
        "family_id": report[0x010:0x020],
        "image_id": report[0x020:0x030],
        "vmpl": u32(0x030),
        "signature_algo": u32(0x034),
        "current_tcb": u64(0x038),
        "platform_info": u64(0x040),
        "signer_info": u32(0x048),
        "report_data": report[0x050:0x090],
        "measurement": report[0x090:0x0C0],
        "host_data": report[0x0C0:0x0E0],
        "id_key_digest": report[0x0E0:0x110],
        "author_key_digest": report[0x110:0x140],
        "report_id": report[0x140:0x160],
        "report_id_ma": report[0x160:0x180],
        "reported_tcb": u64(0x180),
        "chip_id": report[0x1A0:0x1E0],
        "committed_tcb": u64(0x1E0),
        "launch_tcb": u64(0x1F0),
    }
