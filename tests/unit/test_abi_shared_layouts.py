"""The layouts psp, kvm and the guest share (abi/), against literals typed in from the kernel
headers and the SNP ABI named next to each: never from snpemu.abi itself."""

from __future__ import annotations

import struct

from snp.guest.v1 import guest_pb2
from snpemu.abi import guest_payload, platform_status, policy, report, secrets
from snpemu.abi.page_type import PageType

# --- ATTESTATION_REPORT's one table --------------------------------------------------------------


def test_the_report_table_is_in_offset_order_without_overlaps() -> None:
    end = 0
    for f in report.FIELDS:
        assert f.offset >= end, f.name
        end = f.end
    assert end == 0x4A0  # SPEC: the signature runs to the end of the 4A0h-byte report


def test_parse_returns_what_the_guest_api_carries() -> None:
    # snp.guest.v1.ReportFields is built with parse()'s dict as keyword arguments
    summary = {f.name for f in report.FIELDS if f.summary}
    assert summary == {f.name for f in guest_pb2.ReportFields.DESCRIPTOR.fields}


def test_decode_reads_the_one_byte_fields() -> None:
    raw = bytearray(0x4A0)
    raw[0x188:0x18B] = bytes([0x19, 0x11, 0x02])  # SPEC: CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP
    raw[0x1E8:0x1EB] = bytes([21, 55, 1])  # CURRENT_BUILD, CURRENT_MINOR, CURRENT_MAJOR
    raw[0x1EC:0x1EF] = bytes([20, 54, 1])  # COMMITTED_BUILD, _MINOR, _MAJOR
    got = report.decode(bytes(raw))
    assert (got["cpuid_fam_id"], got["cpuid_mod_id"], got["cpuid_step"]) == (0x19, 0x11, 0x02)
    assert (got["current_build"], got["current_minor"], got["current_major"]) == (21, 55, 1)
    assert (got["committed_build"], got["committed_minor"], got["committed_major"]) == (20, 54, 1)


def test_pack_leaves_version_3_fields_zero_in_a_version_2_report() -> None:
    out = report.pack({"version": 2, "cpuid_fam_id": 0x19})
    assert out[0x188] == 0 and out[0:4] == (2).to_bytes(4, "little")
    assert report.pack({"version": 3, "cpuid_fam_id": 0x19})[0x188] == 0x19


# --- MSG_REPORT_* / MSG_KEY_* (KERNEL: include/uapi/linux/sev-guest.h) ----------------------------


def test_report_request_is_user_data_vmpl_and_28_reserved_bytes() -> None:
    packed = guest_payload.ReportRequest(b"abc", 2).pack()
    assert packed == b"abc".ljust(64, b"\0") + struct.pack("<I", 2) + bytes(28)  # 96 bytes
    assert guest_payload.ReportRequest.unpack(packed) == guest_payload.ReportRequest(
        b"abc".ljust(64, b"\0"), 2
    )


def test_report_response_has_a_0x20_byte_header() -> None:
    rsp = guest_payload.report_response(0, b"R" * 0x4A0)
    assert rsp[:8] == struct.pack("<II", 0, 0x4A0) and rsp[8:0x20] == bytes(24)
    assert guest_payload.report_from_response(rsp) == (0, b"R" * 0x4A0)
    assert guest_payload.report_response(0x16) == struct.pack("<II", 0x16, 0) + bytes(24)


def test_key_request_and_response() -> None:
    req = guest_payload.KeyRequest(0, 0b101, 1, 7, 0x1122).pack()
    # struct snp_derived_key_req, then the 8 bytes the guest sends zero
    assert req == struct.pack("<IIQIIQQ", 0, 0, 0b101, 1, 7, 0x1122, 0)
    assert guest_payload.KeyRequest.unpack(req) == guest_payload.KeyRequest(0, 0b101, 1, 7, 0x1122)
    rsp = guest_payload.key_response(0, b"K" * 32)
    assert rsp == struct.pack("<I", 0) + bytes(28) + b"K" * 32  # struct snp_derived_key_resp
    assert guest_payload.key_from_response(rsp) == (0, b"K" * 32)


def test_key_field_select_bits() -> None:
    # SPEC: SNP ABI "MSG_KEY_REQ" GUEST_FIELD_SELECT bits 0..5 (docs/abi.md#payloads)
    assert {f.name: int(f) for f in guest_payload.KeyField} == {
        "POLICY": 1,
        "IMAGE_ID": 2,
        "FAMILY_ID": 4,
        "MEASUREMENT": 8,
        "GUEST_SVN": 16,
        "TCB_VERSION": 32,
    }


# --- the secrets page (KERNEL: arch/x86/include/asm/sev.h struct snp_secrets_page) -------------


def test_secrets_page_offsets() -> None:
    keys = tuple(bytes([i + 1]) * 32 for i in range(4))
    page = secrets.SecretsPage(3, True, 0x00A00F11, b"G" * 16, keys).pack()
    assert len(page) == 4096
    assert page[0:12] == struct.pack("<III", 3, 1, 0x00A00F11)
    assert page[0x10:0x20] == b"G" * 16
    for i in range(4):  # vmpck0..3 at 0x20, 0x40, 0x60, 0x80
        assert page[0x20 + 32 * i : 0x40 + 32 * i] == keys[i]
    assert page[0xA0:] == bytes(4096 - 0xA0)
    seqnos = bytearray(page)
    seqnos[0xA8:0xAC] = (9).to_bytes(4, "little")  # secrets_os_area.msg_seqno_2
    assert secrets.SecretsPage.unpack(bytes(seqnos)).msg_seqnos == (0, 0, 9, 0)
    assert secrets.msg_seqno_offset(2) == 0xA8 and secrets.vmpck_offset(3) == 0x80


# --- SNP_PLATFORM_STATUS (KERNEL: include/uapi/linux/psp-sev.h sev_user_data_snp_status) -------


def test_platform_status_buffer() -> None:
    flags = platform_status.StatusFlag.MASK_CHIP_KEY | platform_status.StatusFlag.FEATURE_INFO
    st = platform_status.PlatformStatus(1, 55, 2, True, 21, flags, 3, 0x11, 0x22)
    raw = st.pack()
    assert raw == bytes([1, 55, 2, 1]) + struct.pack("<IIIQQ", 21, 0b1010, 3, 0x11, 0x22)
    assert len(raw) == 0x20 and platform_status.PlatformStatus.unpack(raw) == st


# --- GUEST_POLICY and page types (KERNEL: include/linux/psp-sev.h) ------------------------------


def test_guest_policy_fields() -> None:
    assert policy.abi_version(0x30000 | 1 << 8 | 55) == (1, 55)
    assert policy.DEFAULT == 0x30000  # QEMU DEFAULT_SEV_SNP_POLICY
    assert policy.GuestPolicy.PAGE_SWAP_DISABLE == 1 << 25
    # KERNEL: arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_VALID
    assert policy.KVM_VALID_MASK == 0xFF | 0xFF << 8 | 1 << 16 | 1 << 17 | 1 << 19 | 1 << 20
    raw = 0x30000 | 1 << 19 | 1 << 40
    assert policy.GuestPolicy.from_int(raw).to_int() == raw
    assert policy.reserved_bits(raw) == 1 << 40


def test_page_types() -> None:
    assert [int(t) for t in PageType] == [1, 2, 3, 4, 5, 6]
