"""The ABI constants and layouts snpemu's code uses, against values written here from upstream.

Many tests compare what a service answers with a constant of the module that produced it
(`psc.PSC_ERROR_INVALID_HDR`, `SevStatus.INVALID_PAGE_STATE`, `msr.PSC_RESP`, ...); those tests
are only as right as the constants. This file pins each constant to the value the kernel (or
the third-party tool named) defines, typed in from the source, and rebuilds the bit-field and
packed structures with ctypes from the kernel's struct definitions, so a wrong constant fails
here whatever the code does with it. The facts are collected in docs/abi.md.
"""

from __future__ import annotations

import ctypes
import uuid

import pytest
from snpemu.abi import cert_table, ghcb, policy, psc
from snpemu.abi import guest_message as gm
from snpemu.abi import msr_protocol as msr
from snpemu.abi import npf as abi_npf
from snpemu.abi import rmp as abi_rmp
from snpemu.abi.page_type import PageType
from snpemu.abi.policy import GuestPolicy
from snpemu.psp.status import SevStatus
from snpemu.rmp import entry as rmp_entry

# KERNEL: include/uapi/linux/psp-sev.h enum sev_ret_code (explicit values; docs/abi.md#status-codes)
SEV_RET_CODE = {
    "SUCCESS": 0x00,
    "INVALID_PLATFORM_STATE": 0x01,
    "INVALID_GUEST_STATE": 0x02,
    "INVALID_CONFIG": 0x03,
    "INVALID_LEN": 0x04,
    "ALREADY_OWNED": 0x05,
    "INVALID_CERTIFICATE": 0x06,
    "POLICY_FAILURE": 0x07,
    "INACTIVE": 0x08,
    "INVALID_ADDRESS": 0x09,
    "BAD_SIGNATURE": 0x0A,
    "BAD_MEASUREMENT": 0x0B,
    "ASID_OWNED": 0x0C,
    "INVALID_ASID": 0x0D,
    "WBINVD_REQUIRED": 0x0E,
    "DFFLUSH_REQUIRED": 0x0F,
    "INVALID_GUEST": 0x10,
    "INVALID_COMMAND": 0x11,
    "ACTIVE": 0x12,
    "HWSEV_RET_PLATFORM": 0x13,
    "HWSEV_RET_UNSAFE": 0x14,
    "UNSUPPORTED": 0x15,
    "INVALID_PARAM": 0x16,
    "RESOURCE_LIMIT": 0x17,
    "SECURE_DATA_INVALID": 0x18,
    "INVALID_PAGE_SIZE": 0x19,
    "INVALID_PAGE_STATE": 0x1A,
    "INVALID_MDATA_ENTRY": 0x1B,
    "INVALID_PAGE_OWNER": 0x1C,
    "AEAD_OFLOW": 0x1D,
    "EXIT_RING_BUFFER": 0x1F,
    "RMP_INIT_REQUIRED": 0x20,
    "BAD_SVN": 0x21,
    "BAD_VERSION": 0x22,
    "SHUTDOWN_REQUIRED": 0x23,
    "UPDATE_FAILED": 0x24,
    "RESTORE_REQUIRED": 0x25,
    "RMP_INITIALIZATION_FAILED": 0x26,
    "INVALID_KEY": 0x27,
}


def test_firmware_status_codes_are_the_kernels() -> None:
    assert {s.name: int(s) for s in SevStatus} == SEV_RET_CODE


def test_launch_update_page_types_are_the_kernels() -> None:
    # KERNEL: include/linux/psp-sev.h SNP_PAGE_TYPE_*
    want = {"NORMAL": 1, "VMSA": 2, "ZERO": 3, "UNMEASURED": 4, "SECRETS": 5, "CPUID": 6}
    assert {t.name: int(t) for t in PageType} == want
    assert abi_rmp.VMSA_GPA == 0xFFFFFFFFF000  # sev-snp-measure gctx.py GCTX.VMSA_GPA


def test_guest_policy_bits_are_the_kernels() -> None:
    # KERNEL: include/linux/psp-sev.h SNP_POLICY_MASK_SMT BIT_ULL(16), _RSVD_MBO BIT_ULL(17),
    # _MIGRATE_MA BIT_ULL(18), _DEBUG BIT_ULL(19), _SINGLE_SOCKET BIT_ULL(20); the highest
    # defined bit is _PAGE_SWAP_DISABLE BIT_ULL(25), so 63:26 are reserved
    assert GuestPolicy.SMT == 0x1_0000
    assert GuestPolicy.RSVD_MBO == 0x2_0000
    assert GuestPolicy.MIGRATE_MA == 0x4_0000
    assert GuestPolicy.DEBUG == 0x8_0000
    assert GuestPolicy.SINGLE_SOCKET == 0x10_0000
    assert policy.RESERVED_MASK == 0xFFFF_FFFF_FC00_0000


def test_rmp_instruction_codes_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/sev.h PVALIDATE_FAIL_SIZEMISMATCH 6, PVALIDATE_FAIL_NOUPDATE
    # 255, RMPUPDATE_FAIL_OVERLAP 4, PSMASH_FAIL_INUSE 3; SPEC: APM vol. 3 PVALIDATE/RMPADJUST
    # FAIL_INPUT 1, FAIL_PERMISSION 2
    assert {c.name: int(c) for c in abi_rmp.Code} == {
        "SUCCESS": 0,
        "FAIL_INPUT": 1,
        "FAIL_PERMISSION": 2,
        "FAIL_INUSE": 3,
        "FAIL_OVERLAP": 4,
        "FAIL_SIZEMISMATCH": 6,
        "FAIL_NOUPDATE": 255,
    }


class RmpEntryRaw(ctypes.LittleEndianStructure):
    """KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw, the lo u64's bit fields."""

    _fields_ = [
        ("assigned", ctypes.c_uint64, 1),
        ("pagesize", ctypes.c_uint64, 1),
        ("immutable", ctypes.c_uint64, 1),
        ("rsvd1", ctypes.c_uint64, 9),
        ("gpa", ctypes.c_uint64, 39),
        ("asid", ctypes.c_uint64, 10),
        ("vmsa", ctypes.c_uint64, 1),
        ("validated", ctypes.c_uint64, 1),
        ("rsvd2", ctypes.c_uint64, 1),
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"assigned": True},
        {"assigned": False, "page_size_2m": True},
        {"assigned": True, "immutable": True, "asid": 1},
        {"assigned": True, "gpa": 0xF_FFFF_FFFF_F000, "asid": 0x3FF},
        {"assigned": True, "asid": 7, "gpa": 0x1234_5000, "vmsa": True, "validated": True},
    ],
)
def test_rmp_entry_encoding_is_the_kernels_bit_fields(fields: dict[str, object]) -> None:
    raw = RmpEntryRaw(
        assigned=int(bool(fields.get("assigned"))),
        pagesize=int(bool(fields.get("page_size_2m"))),
        immutable=int(bool(fields.get("immutable"))),
        gpa=int(fields.get("gpa", 0)) >> 12,  # type: ignore[call-overload]
        asid=int(fields.get("asid", 0)),  # type: ignore[call-overload]
        vmsa=int(bool(fields.get("vmsa"))),
        validated=int(bool(fields.get("validated"))),
    )
    assert rmp_entry.encode(**fields) == int.from_bytes(bytes(raw), "little")  # type: ignore[arg-type]


def test_rmp_state_and_vmsa_gpa_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/sev.h struct rmp_state {u64 gpa; u8 assigned; u8 pagesize;
    # u8 immutable; u8 rsvd; u32 asid;} __packed
    class RmpState(ctypes.LittleEndianStructure):
        _pack_ = 1
        _fields_ = [
            ("gpa", ctypes.c_uint64),
            ("assigned", ctypes.c_uint8),
            ("pagesize", ctypes.c_uint8),
            ("immutable", ctypes.c_uint8),
            ("rsvd", ctypes.c_uint8),
            ("asid", ctypes.c_uint32),
        ]

    want = bytes(RmpState(gpa=0x7000, assigned=1, pagesize=1, immutable=1, asid=9))
    assert rmp_entry.RMP_STATE.pack(0x7000, 1, 1, 1, 0, 9) == want
    # KERNEL: arch/x86/kvm/svm/sev.c INITIAL_VMSA_GPA; sev-snp-measure gctx.py GCTX.VMSA_GPA
    assert abi_rmp.VMSA_GPA == 0xFFFFFFFFF000


def test_npf_error_code_bits_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/kvm_host.h PFERR_*_BIT
    assert (abi_npf.PFERR_PRESENT, abi_npf.PFERR_WRITE, abi_npf.PFERR_USER) == (1, 2, 4)
    assert abi_npf.PFERR_GUEST_RMP == 1 << 31
    assert abi_npf.PFERR_GUEST_FINAL == 1 << 32
    assert abi_npf.PFERR_GUEST_PAGE == 1 << 33
    assert abi_npf.PFERR_GUEST_ENC == 1 << 34
    assert abi_npf.PFERR_GUEST_SIZEM == 1 << 35
    assert abi_npf.PFERR_GUEST_VMPL == 1 << 36


def test_msr_protocol_codes_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/sev-common.h GHCB_MSR_*
    assert msr.INFO_MASK == 0xFFF
    assert (msr.SEV_INFO_REQ, msr.SEV_INFO_RESP) == (0x002, 0x001)
    assert (msr.CPUID_REQ, msr.CPUID_RESP) == (0x004, 0x005)
    assert (msr.AP_RESET_HOLD_REQ, msr.AP_RESET_HOLD_RESP) == (0x006, 0x007)
    assert (msr.PREF_GPA_REQ, msr.PREF_GPA_RESP) == (0x010, 0x011)
    assert (msr.REG_GPA_REQ, msr.REG_GPA_RESP) == (0x012, 0x013)
    assert (msr.PSC_REQ, msr.PSC_RESP) == (0x014, 0x015)
    assert (msr.VMPL_REQ, msr.VMPL_RESP) == (0x016, 0x017)
    assert (msr.HV_FT_REQ, msr.HV_FT_RESP) == (0x080, 0x081)
    assert msr.TERM_REQ == 0x100
    assert msr.PREF_GPA_NONE == 0xFFFFFFFFFFFFF  # GHCB_MSR_PREF_GPA_NONE
    assert msr.PSC_GENERIC_ERROR == 0x8000_0000_0000_0015  # GHCB_MSR_PSC_RESP_ERROR
    # GHCB_HV_FT_SNP BIT_ULL(0), GHCB_HV_FT_SNP_AP_CREATION BIT_ULL(1); KVM advertises both
    # (arch/x86/kvm/svm/sev.c GHCB_HV_FT_SUPPORTED) and speaks GHCB versions 1..2
    assert msr.HV_FEATURES == 0b11
    assert (msr.GHCB_VERSION_MIN, msr.GHCB_VERSION_MAX) == (1, 2)
    # GHCB_MSR_SEV_INFO(_max, _min, _cbit): [63:48] max, [47:32] min, [31:24] C-bit, | 0x001
    assert msr.sev_info(51) == 0x0002_0001_3300_0001


class GhcbSaveArea(ctypes.LittleEndianStructure):
    """KERNEL: arch/x86/include/asm/svm.h struct ghcb_save_area (the reserved members' names
    carry their offsets)."""

    _pack_ = 1
    _fields_ = [
        ("reserved_0x0", ctypes.c_uint8 * 203),
        ("cpl", ctypes.c_uint8),
        ("reserved_0xcc", ctypes.c_uint8 * 116),
        ("xss", ctypes.c_uint64),
        ("reserved_0x148", ctypes.c_uint8 * 24),
        ("dr7", ctypes.c_uint64),
        ("reserved_0x168", ctypes.c_uint8 * 16),
        ("rip", ctypes.c_uint64),
        ("reserved_0x180", ctypes.c_uint8 * 88),
        ("rsp", ctypes.c_uint64),
        ("reserved_0x1e0", ctypes.c_uint8 * 24),
        ("rax", ctypes.c_uint64),
        ("reserved_0x200", ctypes.c_uint8 * 264),
        ("rcx", ctypes.c_uint64),
        ("rdx", ctypes.c_uint64),
        ("rbx", ctypes.c_uint64),
        ("reserved_0x320", ctypes.c_uint8 * 8),
        ("rbp", ctypes.c_uint64),
        ("rsi", ctypes.c_uint64),
        ("rdi", ctypes.c_uint64),
        *[(f"r{n}", ctypes.c_uint64) for n in range(8, 16)],
        ("reserved_0x380", ctypes.c_uint8 * 16),
        ("sw_exit_code", ctypes.c_uint64),
        ("sw_exit_info_1", ctypes.c_uint64),
        ("sw_exit_info_2", ctypes.c_uint64),
        ("sw_scratch", ctypes.c_uint64),
        ("reserved_0x3b0", ctypes.c_uint8 * 56),
        ("xcr0", ctypes.c_uint64),
        ("valid_bitmap", ctypes.c_uint8 * 16),
        ("x87_state_gpa", ctypes.c_uint64),
    ]


class Ghcb(ctypes.LittleEndianStructure):
    """KERNEL: arch/x86/include/asm/svm.h struct ghcb."""

    _pack_ = 1
    _fields_ = [
        ("save", GhcbSaveArea),
        ("reserved_save", ctypes.c_uint8 * (2048 - ctypes.sizeof(GhcbSaveArea))),
        ("shared_buffer", ctypes.c_uint8 * 2032),  # GHCB_SHARED_BUF_SIZE
        ("reserved_0xff0", ctypes.c_uint8 * 10),
        ("protocol_version", ctypes.c_uint16),
        ("ghcb_usage", ctypes.c_uint32),
    ]


def test_ghcb_layout_is_the_kernels() -> None:
    assert ctypes.sizeof(GhcbSaveArea) == 1032  # EXPECTED_GHCB_SAVE_AREA_SIZE
    assert ctypes.sizeof(Ghcb) == ghcb.GHCB_SIZE == 4096  # EXPECTED_GHCB_SIZE
    for name, offset in ghcb.OFFSETS.items():
        assert getattr(GhcbSaveArea, name).offset == offset, name
    assert GhcbSaveArea.valid_bitmap.offset == ghcb.VALID_BITMAP
    assert Ghcb.shared_buffer.offset == ghcb.SHARED_BUFFER
    assert Ghcb.shared_buffer.size == ghcb.SHARED_BUFFER_SIZE
    assert Ghcb.reserved_0xff0.offset == ghcb.RESERVED_0XFF0
    assert Ghcb.protocol_version.offset == ghcb.PROTOCOL_VERSION
    assert Ghcb.ghcb_usage.offset == ghcb.GHCB_USAGE


def test_ghcb_answers_and_exit_codes_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/svm.h GHCB_HV_RESP_NO_ACTION 0, _ISSUE_EXCEPTION 1,
    # _MALFORMED_INPUT 2; arch/x86/include/asm/sev-common.h GHCB_ERR_* 1..6
    assert (ghcb.RESP_NO_ACTION, ghcb.RESP_ISSUE_EXCEPTION, ghcb.RESP_MALFORMED_INPUT) == (0, 1, 2)
    errors = (
        ghcb.ERR_NOT_REGISTERED,
        ghcb.ERR_INVALID_USAGE,
        ghcb.ERR_INVALID_SCRATCH_AREA,
        ghcb.ERR_MISSING_INPUT,
        ghcb.ERR_INVALID_INPUT,
        ghcb.ERR_INVALID_EVENT,
    )
    assert errors == (1, 2, 3, 4, 5, 6)
    # KERNEL: arch/x86/include/uapi/asm/svm.h SVM_EXIT_* and SVM_VMGEXIT_*
    assert {
        "READ_DR7": ghcb.EXIT_READ_DR7,
        "WRITE_DR7": ghcb.EXIT_WRITE_DR7,
        "RDTSC": ghcb.EXIT_RDTSC,
        "RDPMC": ghcb.EXIT_RDPMC,
        "CPUID": ghcb.EXIT_CPUID,
        "INVD": ghcb.EXIT_INVD,
        "IOIO": ghcb.EXIT_IOIO,
        "MSR": ghcb.EXIT_MSR,
        "VMMCALL": ghcb.EXIT_VMMCALL,
        "RDTSCP": ghcb.EXIT_RDTSCP,
        "WBINVD": ghcb.EXIT_WBINVD,
        "MONITOR": ghcb.EXIT_MONITOR,
        "MWAIT": ghcb.EXIT_MWAIT,
        "MMIO_READ": ghcb.EXIT_MMIO_READ,
        "MMIO_WRITE": ghcb.EXIT_MMIO_WRITE,
        "NMI_COMPLETE": ghcb.EXIT_NMI_COMPLETE,
        "AP_HLT_LOOP": ghcb.EXIT_AP_HLT_LOOP,
        "AP_JUMP_TABLE": ghcb.EXIT_AP_JUMP_TABLE,
        "PSC": ghcb.EXIT_PSC,
        "GUEST_REQUEST": ghcb.EXIT_GUEST_REQUEST,
        "EXT_GUEST_REQUEST": ghcb.EXIT_EXT_GUEST_REQUEST,
        "AP_CREATION": ghcb.EXIT_AP_CREATION,
        "HV_FEATURES": ghcb.EXIT_HV_FEATURES,
        "TERM_REQUEST": ghcb.EXIT_TERM_REQUEST,
        "UNSUPPORTED_EVENT": ghcb.EXIT_UNSUPPORTED_EVENT,
    } == {
        "READ_DR7": 0x027,
        "WRITE_DR7": 0x037,
        "RDTSC": 0x06E,
        "RDPMC": 0x06F,
        "CPUID": 0x072,
        "INVD": 0x076,
        "IOIO": 0x07B,
        "MSR": 0x07C,
        "VMMCALL": 0x081,
        "RDTSCP": 0x087,
        "WBINVD": 0x089,
        "MONITOR": 0x08A,
        "MWAIT": 0x08B,
        "MMIO_READ": 0x80000001,
        "MMIO_WRITE": 0x80000002,
        "NMI_COMPLETE": 0x80000003,
        "AP_HLT_LOOP": 0x80000004,
        "AP_JUMP_TABLE": 0x80000005,
        "PSC": 0x80000010,
        "GUEST_REQUEST": 0x80000011,
        "EXT_GUEST_REQUEST": 0x80000012,
        "AP_CREATION": 0x80000013,
        "HV_FEATURES": 0x8000FFFD,
        "TERM_REQUEST": 0x8000FFFE,
        "UNSUPPORTED_EVENT": 0x8000FFFF,
    }


class PscEntry(ctypes.LittleEndianStructure):
    """KERNEL: arch/x86/include/asm/sev-common.h struct psc_entry."""

    _fields_ = [
        ("cur_page", ctypes.c_uint64, 12),
        ("gfn", ctypes.c_uint64, 40),
        ("operation", ctypes.c_uint64, 4),
        ("pagesize", ctypes.c_uint64, 1),
        ("reserved", ctypes.c_uint64, 7),
    ]


@pytest.mark.parametrize(
    ("cur_page", "gfn", "op", "size_2m", "reserved"),
    [(0, 0, 1, False, 0), (512, 0xFF_FFFF_FE00, 2, True, 0), (0xFFF, 0x12345, 0xF, True, 0x7F)],
)
def test_psc_entry_is_the_kernels_bit_fields(
    cur_page: int, gfn: int, op: int, size_2m: bool, reserved: int
) -> None:
    raw = int.from_bytes(bytes(PscEntry(cur_page, gfn, op, int(size_2m), reserved)), "little")
    assert psc.Entry(cur_page, gfn, op, size_2m, reserved).encode() == raw
    assert psc.Entry.decode(raw) == psc.Entry(cur_page, gfn, op, size_2m, reserved)


def test_psc_constants_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/sev-common.h VMGEXIT_PSC_MAX_COUNT 253,
    # VMGEXIT_PSC_ERROR_GENERIC (0x100UL << 32), _INVALID_HDR ((1UL << 32) | 1),
    # _INVALID_ENTRY ((1UL << 32) | 2), VMGEXIT_PSC_OP_PRIVATE 1, _SHARED 2
    assert psc.MAX_ENTRIES == 253
    assert psc.PSC_ERROR_GENERIC == 0x0000_0100_0000_0000
    assert psc.PSC_ERROR_INVALID_HDR == 0x0000_0001_0000_0001
    assert psc.PSC_ERROR_INVALID_ENTRY == 0x0000_0001_0000_0002
    assert (psc.Op.PRIVATE, psc.Op.SHARED, psc.Op.PSMASH, psc.Op.UNSMASH) == (1, 2, 3, 4)
    assert psc.HDR.size == 8  # struct psc_hdr {u16 cur_entry; u16 end_entry; u32 reserved;}


def test_guest_message_constants_are_the_kernels() -> None:
    # KERNEL: arch/x86/include/asm/sev.h AUTHTAG_LEN 16, MSG_HDR_VER 1, enum aead_algo
    # (SNP_AEAD_AES_256_GCM 1), sizeof(struct snp_guest_msg_hdr) 0x60, enum msg_type
    assert (gm.AUTHTAG_LEN, gm.MSG_HDR_VER, gm.AEAD_ALGO_AES_256_GCM) == (16, 1, 1)
    assert (gm.HDR_SIZE, gm.MAX_PAYLOAD) == (0x60, 4000)
    assert {t.name: int(t) for t in gm.MsgType} == {
        "INVALID": 0,
        "CPUID_REQ": 1,
        "CPUID_RSP": 2,
        "KEY_REQ": 3,
        "KEY_RSP": 4,
        "REPORT_REQ": 5,
        "REPORT_RSP": 6,
        "EXPORT_REQ": 7,
        "EXPORT_RSP": 8,
        "IMPORT_REQ": 9,
        "IMPORT_RSP": 10,
        "ABSORB_REQ": 11,
        "ABSORB_RSP": 12,
        "VMRK_REQ": 13,
        "VMRK_RSP": 14,
        "TSC_INFO_REQ": 17,
        "TSC_INFO_RSP": 18,
    }


def test_certificate_guids_are_go_sev_guests() -> None:
    # SPEC: google/go-sev-guest abi/abi.go VcekGUID, VlekGUID, AskGUID, ArkGUID
    assert uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd") == cert_table.VCEK
    assert uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1") == cert_table.VLEK
    assert uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782") == cert_table.ASK
    assert uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae") == cert_table.ARK
    assert cert_table.ENTRY.size == 24  # abi.CertTableEntrySize
