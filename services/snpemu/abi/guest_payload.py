"""The plaintext payloads of the guest messages: MSG_REPORT_REQ/RSP and MSG_KEY_REQ/RSP.

KERNEL: include/uapi/linux/sev-guest.h struct snp_report_req, snp_report_resp,
snp_derived_key_req, snp_derived_key_resp; SPEC: SNP ABI tables "MSG_REPORT_REQ",
"MSG_REPORT_RSP", "MSG_KEY_REQ", "MSG_KEY_RSP" (docs/abi.md#payloads):
    MSG_REPORT_REQ  user_data[64], u32 vmpl, rsvd[28]                          (96 bytes)
    MSG_REPORT_RSP  u32 status, u32 report_size, rsvd[24], report[report_size]
    MSG_KEY_REQ     u32 root_key_select, u32 rsvd, u64 guest_field_select, u32 vmpl,
                    u32 guest_svn, u64 tcb_version, then 8 bytes the guest sends zero
    MSG_KEY_RSP     u32 status, rsvd[28], key[32]                              (64 bytes)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

USER_DATA_SIZE = 64
REPORT_REQ = struct.Struct("<64sI28x")  # user_data, vmpl
REPORT_RSP_HDR = struct.Struct("<II24x")  # status, report_size
REPORT_OFFSET = REPORT_RSP_HDR.size  # 0x20
# The firmware reads the first 0x20 bytes but wants 0x28 (the guest's request is that long).
KEY_REQ = struct.Struct("<IIQIIQ")  # root_key_select, rsvd, field_select, vmpl, svn, tcb
KEY_REQ_SIZE = 0x28
KEY_RSP_HDR = struct.Struct("<I28x")  # status
KEY_OFFSET = KEY_RSP_HDR.size  # 0x20
KEY_SIZE = 32
ROOT_KEY_VMRK = 1  # root_key_select bit 0: the VM root key (needs a migration agent)


class KeyField(enum.IntFlag):
    """MSG_KEY_REQ guest_field_select: what the derived key mixes in. SPEC: SNP ABI
    "MSG_KEY_REQ" (docs/abi.md#payloads; the kernel passes the bits through unnamed)."""

    POLICY = 1 << 0
    IMAGE_ID = 1 << 1
    FAMILY_ID = 1 << 2
    MEASUREMENT = 1 << 3
    GUEST_SVN = 1 << 4
    TCB_VERSION = 1 << 5


KEY_FIELD_BITS = 6  # bits 63:6 of guest_field_select are reserved


@dataclass(frozen=True)
class ReportRequest:
    user_data: bytes
    vmpl: int

    def pack(self) -> bytes:
        return REPORT_REQ.pack(self.user_data.ljust(USER_DATA_SIZE, b"\0"), self.vmpl)

    @classmethod
    def unpack(cls, payload: bytes) -> ReportRequest:
        """ValueError when the payload is shorter than 96 bytes."""
        if len(payload) < REPORT_REQ.size:
            raise ValueError(f"MSG_REPORT_REQ is {REPORT_REQ.size} bytes, got {len(payload)}")
        user_data, vmpl = REPORT_REQ.unpack_from(payload, 0)
        return cls(user_data, vmpl)


def report_response(status: int, report: bytes = b"") -> bytes:
    return REPORT_RSP_HDR.pack(status, len(report)) + report


def report_from_response(payload: bytes) -> tuple[int, bytes]:
    """(status, report): the report is report_size bytes after the 0x20-byte header."""
    status, size = REPORT_RSP_HDR.unpack_from(payload, 0)
    return status, payload[REPORT_OFFSET : REPORT_OFFSET + size]


@dataclass(frozen=True)
class KeyRequest:
    root_key_select: int
    field_select: int
    vmpl: int
    guest_svn: int
    tcb_version: int

    def pack(self) -> bytes:
        return KEY_REQ.pack(
            self.root_key_select, 0, self.field_select, self.vmpl, self.guest_svn, self.tcb_version
        ) + bytes(KEY_REQ_SIZE - KEY_REQ.size)

    @classmethod
    def unpack(cls, payload: bytes) -> KeyRequest:
        """ValueError when the payload is shorter than 0x28 bytes."""
        if len(payload) < KEY_REQ_SIZE:
            raise ValueError(f"MSG_KEY_REQ is {KEY_REQ_SIZE:#x} bytes, got {len(payload)}")
        root, _, select, vmpl, svn, tcb = KEY_REQ.unpack_from(payload, 0)
        return cls(root, select, vmpl, svn, tcb)


def key_response(status: int, key: bytes = bytes(KEY_SIZE)) -> bytes:
    return KEY_RSP_HDR.pack(status) + key


def key_from_response(payload: bytes) -> tuple[int, bytes]:
    (status,) = KEY_RSP_HDR.unpack_from(payload, 0)
    return status, payload[KEY_OFFSET : KEY_OFFSET + KEY_SIZE]


def status_of(payload: bytes) -> int:
    """The u32 status both responses start with."""
    return int(struct.unpack_from("<I", payload, 0)[0])
