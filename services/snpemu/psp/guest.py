"""One guest's context inside the firmware, and the launch-time structures it checks or fills:
the secrets page, the CPUID page, the ID block and ID auth, derived keys."""

from __future__ import annotations

import enum
import hashlib
import secrets
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from snpemu.abi import policy as guest_policy
from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.guest_payload import KeyField
from snpemu.abi.policy import GuestPolicy
from snpemu.abi.secrets import SecretsPage
from snpemu.psp.measure import LaunchDigest
from snpemu.psp.status import SevStatus, fail
from snpemu.psp.tcb import Product, Tcb


class GuestState(enum.IntEnum):
    """GSTATE_* (SNP ABI ch. 4); values +1 to match snp.psp.v1.GuestState."""

    INIT = 1
    LAUNCH = 2
    RUNNING = 3


@dataclass
class GuestContext:
    gctx_paddr: int
    state: GuestState = GuestState.INIT
    policy: int = 0
    asid: int = 0
    digest: LaunchDigest = field(default_factory=LaunchDigest)
    vmpcks: tuple[bytes, bytes, bytes, bytes] = (bytes(32),) * 4
    # The sequence number the firmware accepts next, per VMPCK.
    seqnos: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    gosvw: bytes = bytes(16)
    report_id: bytes = bytes(32)
    launch_tcb: int = 0
    launched: list[int] = field(default_factory=list)
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    author_key_en: bool = False
    host_data: bytes = bytes(32)
    vcek_disabled: bool = False
    imi_en: bool = False


def check_policy(policy: int, api: tuple[int, int], *, smt_enabled: bool) -> None:
    """SNP_LAUNCH_START policy checks (SPEC: SNP ABI, Guest Policy and SNP_LAUNCH_START);
    POLICY_FAILURE when the policy asks for what this platform does not give. SINGLE_SOCKET is
    checked at SNP_ACTIVATE (launch.py)."""
    if guest_policy.reserved_bits(policy):
        raise fail(SevStatus.INVALID_PARAM, f"policy {policy:#x} sets reserved bits 63:26")
    if not policy & GuestPolicy.RSVD_MBO:
        raise fail(SevStatus.POLICY_FAILURE, "policy bit 17 (reserved, must be one) is zero")
    if not policy & GuestPolicy.SMT and smt_enabled:
        # SMT = 0 asks for a platform with SMT disabled in the BIOS; with SMT disabled, either
        # value launches. KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start() no longer checks it.
        raise fail(SevStatus.POLICY_FAILURE, "policy forbids SMT but SMT is enabled")
    major, minor = guest_policy.abi_version(policy)
    if (major, minor) > api:
        raise fail(
            SevStatus.POLICY_FAILURE,
            f"policy needs firmware ABI {major}.{minor}, this firmware is {api[0]}.{api[1]}",
        )
    if policy & GuestPolicy.MIGRATE_MA:
        raise fail(SevStatus.POLICY_FAILURE, "migration agents are not supported")


# --- secrets page (layout: abi/secrets.py) -------------------------------------------------------

SECRETS_VERSION = 3  # UNVERIFIED(secrets-version): the version the firmware writes


def cpuid_signature(product: Product) -> int:
    """CPUID(1).EAX: stepping, model, family (with the extended fields for family > 0xF)."""
    return product.cpu.signature


def secrets_page(ctx: GuestContext, product: Product) -> bytes:
    return SecretsPage(
        version=SECRETS_VERSION,
        imi_en=ctx.imi_en,
        fms=cpuid_signature(product),
        gosvw=ctx.gosvw,
        vmpcks=ctx.vmpcks,
    ).pack()


# --- CPUID page (docs/abi.md#cpuid-page, KERNEL: arch/x86/kernel/sev-shared.c snp_cpuid_*) ------

CPUID_COUNT_MAX = 64
CPUID_ENTRY = struct.Struct(
    "<IIQQIIIIQ"
)  # eax_in, ecx_in, xcr0_in, xss_in, eax, ebx, ecx, edx, rsvd
# Bits the emulated CPU may report per (leaf, register). Leaves not listed pass unchecked.
# UNVERIFIED(cpuid-policy): the real firmware's CPUID policy is product specific; this is a
# model of it.
CPUID_ALLOWED = {
    (0x8000001F, "eax"): 0x0001_DFFF,  # SME..SNP, VMPL, ... (no bits above 16 but 16)
    (0x8000001F, "ebx"): 0x0000_FFFF,  # C-bit position, phys addr reduction, VMPL count
}


def check_cpuid(page: bytes) -> tuple[bool, bytes]:
    """Validate the CPUID page; returns (ok, corrected page)."""
    count = struct.unpack_from("<I", page, 0)[0]
    out = bytearray(page)
    ok = count <= CPUID_COUNT_MAX and not any(page[4:16])
    if count > CPUID_COUNT_MAX:
        struct.pack_into("<I", out, 0, CPUID_COUNT_MAX)
        count = CPUID_COUNT_MAX
    for i in range(count):
        off = 16 + i * CPUID_ENTRY.size
        eax_in, ecx_in, xcr0, xss, *regs, rsvd = CPUID_ENTRY.unpack_from(page, off)
        fixed = list(regs)
        for j, name in enumerate(("eax", "ebx", "ecx", "edx")):
            mask = CPUID_ALLOWED.get((eax_in, name))
            if mask is not None and regs[j] & ~mask:
                fixed[j] = regs[j] & mask
                ok = False
        if rsvd:
            ok = False
        CPUID_ENTRY.pack_into(out, off, eax_in, ecx_in, xcr0, xss, *fixed, 0)
    return ok, bytes(out)


# --- ID block and ID auth (docs/abi.md#id-block) -----------------------------------------------

ID_BLOCK = struct.Struct("<48s16s16sIIQ")  # LD, FAMILY_ID, IMAGE_ID, VERSION, GUEST_SVN, POLICY
ALGO_P384_SHA384 = 1


@dataclass(frozen=True)
class IdBlock:
    ld: bytes
    family_id: bytes
    image_id: bytes
    version: int
    guest_svn: int
    policy: int


def _ecdsa_public(blob: bytes) -> ec.EllipticCurvePublicKey:
    """The 0x404-byte SNP public key: u32 curve (2 = P-384), QX[72], QY[72] little-endian."""
    curve = struct.unpack_from("<I", blob, 0)[0]
    if curve != 2:
        raise fail(SevStatus.INVALID_PARAM, f"ID key curve {curve} is not P-384 (2)")
    x = int.from_bytes(blob[4:76], "little")
    y = int.from_bytes(blob[76:148], "little")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError:
        raise fail(SevStatus.INVALID_PARAM, "ID key is not a point on P-384") from None


def _check_sig(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, what: str) -> None:
    r = int.from_bytes(sig[0:72], "little")
    s = int.from_bytes(sig[72:144], "little")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise fail(SevStatus.BAD_SIGNATURE, f"{what} signature does not verify") from None


def verify_id(id_block: bytes, id_auth: bytes, auth_key_en: bool) -> tuple[IdBlock, bytes, bytes]:
    """Verify ID_BLOCK_SIG (and ID_KEY_SIG with the author key); returns the block and the
    SHA-384 digests of the ID key and author key structures."""
    if len(id_block) != ID_BLOCK.size or len(id_auth) != PAGE_SIZE:
        raise fail(SevStatus.INVALID_PARAM, "ID block is 96 bytes and ID auth 4096 bytes")
    block = IdBlock(*ID_BLOCK.unpack(id_block))
    id_algo, auth_algo = struct.unpack_from("<II", id_auth, 0)
    if id_algo != ALGO_P384_SHA384 or (auth_key_en and auth_algo != ALGO_P384_SHA384):
        raise fail(SevStatus.INVALID_PARAM, "ID auth algorithms must be 1 (ECDSA P-384/SHA-384)")
    id_key = id_auth[0x240 : 0x240 + 0x404]
    _check_sig(_ecdsa_public(id_key), id_auth[0x040:0x240], id_block, "ID block")
    author_digest = bytes(48)
    if auth_key_en:
        author = id_auth[0x880 : 0x880 + 0x404]
        _check_sig(_ecdsa_public(author), id_auth[0x680:0x880], id_key, "ID key")
        author_digest = hashlib.sha384(author).digest()
    return block, hashlib.sha384(id_key).digest(), author_digest


# --- MSG_KEY_REQ (layout: abi/guest_payload.py) -------------------------------------------------


def derive_key(
    chip_secret: bytes,
    ctx: GuestContext,
    *,
    vmpl: int,
    field_select: int,
    guest_svn: int,
    tcb: int,
) -> bytes:
    """A 32-byte key from the chip secret mixed with the VMPL and the selected guest fields:
    changing a selected field changes the key, an unselected one does not."""
    parts = [b"vmpl", vmpl.to_bytes(4, "little"), b"select", field_select.to_bytes(8, "little")]
    if field_select & KeyField.POLICY:
        parts += [b"policy", ctx.policy.to_bytes(8, "little")]
    if field_select & KeyField.IMAGE_ID:
        parts += [b"image", ctx.image_id]
    if field_select & KeyField.FAMILY_ID:
        parts += [b"family", ctx.family_id]
    if field_select & KeyField.MEASUREMENT:
        parts += [b"measurement", ctx.digest.value]
    if field_select & KeyField.GUEST_SVN:
        parts += [b"svn", guest_svn.to_bytes(4, "little")]
    if field_select & KeyField.TCB_VERSION:
        parts += [b"tcb", tcb.to_bytes(8, "little")]
    return HKDF(hashes.SHA384(), 32, salt=b"snpemu MSG_KEY_REQ", info=b"".join(parts)).derive(
        chip_secret
    )


def new_vmpcks() -> tuple[bytes, bytes, bytes, bytes]:
    return (
        secrets.token_bytes(32),
        secrets.token_bytes(32),
        secrets.token_bytes(32),
        secrets.token_bytes(32),
    )


def tcb_le(requested: int, committed: int) -> bool:
    return Tcb.from_raw(requested).le(Tcb.from_raw(committed))
