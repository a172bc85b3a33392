"""The GHCB page (4 KiB) and the codes KVM answers with.

Layout: arch/x86/include/asm/svm.h struct ghcb / ghcb_save_area (docs/abi.md#ghcb-page). A field at
offset o is valid when bit o/8 of the 128-bit valid bitmap at 0x3F0 is set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

GHCB_SIZE = 4096
SHARED_BUFFER = 0x800
SHARED_BUFFER_SIZE = 0x7F0  # 2032
RESERVED_0XFF0 = SHARED_BUFFER + SHARED_BUFFER_SIZE  # struct ghcb reserved_0xff0: buffer end
VALID_BITMAP = 0x3F0
PROTOCOL_VERSION = 0xFFA
GHCB_USAGE = 0xFFC

# save-area fields used by the NAE events KVM handles
OFFSETS = {
    "cpl": 0x0CB,
    "xss": 0x140,
    "dr7": 0x160,
    "rip": 0x178,
    "rsp": 0x1D8,
    "rax": 0x1F8,
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    "sw_exit_code": 0x390,
    "sw_exit_info_1": 0x398,
    "sw_exit_info_2": 0x3A0,
    "sw_scratch": 0x3A8,
    "xcr0": 0x3E8,
}

# sw_exit_info_1 on return (KERNEL: arch/x86/include/asm/svm.h GHCB_HV_RESP_*)
RESP_NO_ACTION = 0
RESP_ISSUE_EXCEPTION = 1
RESP_MALFORMED_INPUT = 2
# sw_exit_info_2 low 32 bits with MALFORMED_INPUT (KERNEL: arch/x86/include/asm/sev-common.h)
ERR_NOT_REGISTERED = 1
ERR_INVALID_USAGE = 2
ERR_INVALID_SCRATCH_AREA = 3
ERR_MISSING_INPUT = 4
ERR_INVALID_INPUT = 5
ERR_INVALID_EVENT = 6
# sw_exit_info_2 with ISSUE_EXCEPTION: an event injection (KERNEL: arch/x86/include/asm/svm.h
# SVM_EVTINJ_*; arch/x86/kvm/svm/svm.h svm_vmgexit_inject_exception())
EVTINJ_VALID = 1 << 31
EVTINJ_TYPE_EXEPT = 3 << 8
VECTOR_UD, VECTOR_GP = 6, 13  # X86_TRAP_UD, X86_TRAP_GP
# SVM_EXIT_IOIO sw_exit_info_1 (KERNEL: arch/x86/include/asm/svm.h SVM_IOIO_*)
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_SIZE_SHIFT, IOIO_SIZE_MASK = 4, 7 << 4

# NAE exit codes (KERNEL: arch/x86/include/uapi/asm/svm.h SVM_EXIT_*, SVM_VMGEXIT_*;
# docs/abi.md#nae-events)
EXIT_READ_DR7 = 0x27
EXIT_WRITE_DR7 = 0x37
EXIT_RDTSC = 0x6E
EXIT_RDPMC = 0x6F
EXIT_CPUID = 0x72
EXIT_INVD = 0x76
EXIT_IOIO = 0x7B
EXIT_MSR = 0x7C
EXIT_VMMCALL = 0x81
EXIT_RDTSCP = 0x87
EXIT_WBINVD = 0x89
EXIT_MONITOR = 0x8A
EXIT_MWAIT = 0x8B
EXIT_MMIO_READ = 0x8000_0001
EXIT_MMIO_WRITE = 0x8000_0002
EXIT_NMI_COMPLETE = 0x8000_0003
EXIT_AP_HLT_LOOP = 0x8000_0004
EXIT_AP_JUMP_TABLE = 0x8000_0005
EXIT_PSC = 0x8000_0010
EXIT_GUEST_REQUEST = 0x8000_0011
EXIT_EXT_GUEST_REQUEST = 0x8000_0012
EXIT_AP_CREATION = 0x8000_0013
EXIT_HV_FEATURES = 0x8000_FFFD
EXIT_TERM_REQUEST = 0x8000_FFFE
EXIT_UNSUPPORTED_EVENT = 0x8000_FFFF

EXIT_NAMES = {
    EXIT_READ_DR7: "read_dr7",
    EXIT_WRITE_DR7: "write_dr7",
    EXIT_RDTSC: "rdtsc",
    EXIT_RDPMC: "rdpmc",
    EXIT_CPUID: "cpuid",
    EXIT_INVD: "invd",
    EXIT_IOIO: "ioio",
    EXIT_MSR: "msr",
    EXIT_VMMCALL: "vmmcall",
    EXIT_RDTSCP: "rdtscp",
    EXIT_WBINVD: "wbinvd",
    EXIT_MONITOR: "monitor",
    EXIT_MWAIT: "mwait",
    EXIT_MMIO_READ: "mmio_read",
    EXIT_MMIO_WRITE: "mmio_write",
    EXIT_NMI_COMPLETE: "nmi_complete",
    EXIT_AP_HLT_LOOP: "ap_hlt_loop",
    EXIT_AP_JUMP_TABLE: "ap_jump_table",
    EXIT_PSC: "psc",
    EXIT_GUEST_REQUEST: "guest_request",
    EXIT_EXT_GUEST_REQUEST: "ext_guest_request",
    EXIT_AP_CREATION: "ap_creation",
    EXIT_HV_FEATURES: "hv_features",
    EXIT_TERM_REQUEST: "term_request",
    EXIT_UNSUPPORTED_EVENT: "unsupported_event",
}


def valid_bit(name: str) -> int:
    return OFFSETS[name] // 8


@dataclass
class Ghcb:
    """A decoded GHCB: the save-area fields KVM reads, the bitmap, the shared buffer."""

    fields: dict[str, int] = field(default_factory=dict)
    valid: int = 0  # 128-bit bitmap
    shared: bytearray = field(default_factory=lambda: bytearray(SHARED_BUFFER_SIZE))
    version: int = 2
    usage: int = 0

    @classmethod
    def decode(cls, page: bytes) -> Ghcb:
        if len(page) != GHCB_SIZE:
            raise ValueError(f"a GHCB is {GHCB_SIZE} bytes")
        valid = int.from_bytes(page[VALID_BITMAP : VALID_BITMAP + 16], "little")
        fields = {}
        for name, off in OFFSETS.items():
            size = 1 if name == "cpl" else 8
            fields[name] = int.from_bytes(page[off : off + size], "little")
        version, usage = struct.unpack_from("<HI", page, PROTOCOL_VERSION)
        shared = bytearray(page[SHARED_BUFFER : SHARED_BUFFER + SHARED_BUFFER_SIZE])
        return cls(fields, valid, shared, version, usage)

    def is_valid(self, name: str) -> bool:
        return bool(self.valid >> valid_bit(name) & 1)

    def get(self, name: str) -> int:
        return self.fields.get(name, 0)

    def set(self, name: str, value: int) -> None:
        self.fields[name] = value & (0xFF if name == "cpl" else 2**64 - 1)
        self.valid |= 1 << valid_bit(name)

    def encode(self) -> bytes:
        page = bytearray(GHCB_SIZE)
        for name, value in self.fields.items():
            off = OFFSETS[name]
            size = 1 if name == "cpl" else 8
            page[off : off + size] = value.to_bytes(size, "little")
        page[VALID_BITMAP : VALID_BITMAP + 16] = self.valid.to_bytes(16, "little")
        page[SHARED_BUFFER : SHARED_BUFFER + SHARED_BUFFER_SIZE] = self.shared
        struct.pack_into("<HI", page, PROTOCOL_VERSION, self.version, self.usage)
        return bytes(page)
