"""The GHCB MSR protocol: requests and responses packed in the 64-bit GHCB MSR.

KERNEL: arch/x86/include/asm/sev-common.h GHCB_MSR_*; arch/x86/kvm/svm/sev.c
sev_handle_vmgexit_msr_protocol() (docs/abi.md#msr-protocol). GHCBInfo is bits 11:0.
"""

from __future__ import annotations

INFO_MASK = 0xFFF
DATA_SHIFT = 12  # GHCBData: bits 63:12
SEV_INFO_REQ, SEV_INFO_RESP = 0x002, 0x001
CPUID_REQ, CPUID_RESP = 0x004, 0x005
AP_RESET_HOLD_REQ, AP_RESET_HOLD_RESP = 0x006, 0x007
PREF_GPA_REQ, PREF_GPA_RESP = 0x010, 0x011
REG_GPA_REQ, REG_GPA_RESP = 0x012, 0x013
PSC_REQ, PSC_RESP = 0x014, 0x015
VMPL_REQ, VMPL_RESP = 0x016, 0x017
HV_FT_REQ, HV_FT_RESP = 0x080, 0x081
TERM_REQ = 0x100

GHCB_VERSION_MIN, GHCB_VERSION_MAX = 1, 2
# GHCB_HV_FT_SUPPORTED = SNP | SNP_AP_CREATION (docs/abi.md#hv-features)
HV_FT_SNP, HV_FT_SNP_AP_CREATION = 1 << 0, 1 << 1
HV_FEATURES = HV_FT_SNP | HV_FT_SNP_AP_CREATION
PREF_GPA_NONE = 0xFFFFFFFFFFFFF  # KVM has no preferred GHCB GPA
PSC_GENERIC_ERROR = (1 << 63) | PSC_RESP  # KVM's answer when the change failed

NAMES = {
    SEV_INFO_REQ: "sev_info",
    CPUID_REQ: "cpuid",
    AP_RESET_HOLD_REQ: "ap_reset_hold",
    PREF_GPA_REQ: "pref_gpa",
    REG_GPA_REQ: "reg_gpa",
    PSC_REQ: "psc",
    VMPL_REQ: "vmpl",
    HV_FT_REQ: "hv_features",
    TERM_REQ: "term",
}


def response(data: int, code: int) -> int:
    """A response carrying GHCBData `data` (bits 63:12) with GHCBInfo `code`."""
    return data << DATA_SHIFT | code


def sev_info(cbit: int, max_version: int = GHCB_VERSION_MAX) -> int:
    return max_version << 48 | GHCB_VERSION_MIN << 32 | cbit << 24 | SEV_INFO_RESP


def cpuid_request(msr: int) -> tuple[int, int]:
    """(function, register 0=EAX..3=EDX)"""
    return msr >> 32, msr >> 30 & 3


def cpuid_response(register: int, value: int) -> int:
    return (value & 0xFFFFFFFF) << 32 | register << 30 | CPUID_RESP


def gfn_of(msr: int) -> int:
    return msr >> 12


def psc_request(msr: int) -> tuple[int, int]:
    """(gfn bits 51:12, operation bits 55:52)"""
    return msr >> 12 & ((1 << 40) - 1), msr >> 52 & 0xF


def term_reason(msr: int) -> tuple[int, int]:
    """(reason set bits 15:12, reason code bits 23:16)"""
    return msr >> 12 & 0xF, msr >> 16 & 0xFF


def term_request(reason_set: int, code: int) -> int:
    """The guest's TERM_REQ: reason set in bits 15:12, reason code in bits 23:16."""
    return code << 16 | reason_set << 12 | TERM_REQ


def hv_features_of(msr: int) -> int:
    """The feature bitmap of an HV_FT_RESP (bits 63:12)."""
    return msr >> 12


def sev_info_versions(msr: int) -> tuple[int, int]:
    """(minimum, maximum) GHCB protocol version of a SEV_INFO_RESP (bits 47:32, 63:48)."""
    return msr >> 32 & 0xFFFF, msr >> 48
