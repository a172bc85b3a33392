"""SNP_LAUNCH_FINISH accepts an ID block and ID auth made by sev-snp-measure's
snp-create-id-block (an independent implementation of the ABI's layout), and the report then
carries that tool's ID key and author key digests."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sevsnpmeasure.id_block import snp_calc_id_block
from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType
from snpemu.psp.status import FirmwareError, SevStatus

from tests.unit.psp.launch_helpers import Host, make_host, report_request

pytestmark = pytest.mark.fidelity


def key_file(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def id_block_for(ld: bytes, tmp: Path) -> dict[str, bytes]:
    text = snp_calc_id_block(ld, key_file(tmp / "id.pem"), key_file(tmp / "author.pem"))
    first, id_hash, author_hash = text.splitlines()
    fields = dict(part.split("=", 1) for part in first.split(","))
    return {
        "id_block": base64.b64decode(fields["id-block"]),
        "id_auth": base64.b64decode(fields["id-auth"]),
        "id_key_digest": base64.b64decode(id_hash.split(": ")[1]),
        "author_key_digest": base64.b64decode(author_hash.split(": ")[1]),
    }


async def launched(tmp: Path, policy: int = 0x30000) -> tuple[Host, bytes]:
    host = make_host(tmp)
    await host.start(policy=policy)  # 0x30000: sev-snp-measure's DefaultPolicy
    await host.place(0x1000, os.urandom(4096), PageType.NORMAL)
    ld = await host.place(0x5000, None, PageType.SECRETS)
    host.secrets_gpa = 0x5000
    return host, ld


def finish(host: Host, ib: dict[str, bytes], **over: object):  # type: ignore[no-untyped-def]
    args = dict(
        id_block=ib["id_block"],
        id_auth=ib["id_auth"],
        id_block_en=True,
        auth_key_en=True,
        vcek_disabled=False,
        host_data=b"",
    )
    args.update(over)
    return host.fw.launch_finish(host.gctx, **args)  # type: ignore[arg-type]


def observe(host: Host) -> dict[str, object]:
    """Everything a host can read back after a firmware command: the guest context (the
    GuestStatus RPC's policy, ASID, state and VCEK_DIS, and the rest of it, which the report
    shows after LAUNCH_FINISH), the platform status structure (SNP_PLATFORM_STATUS), every RMP
    entry (ReadRmpEntry/ListRmpEntries), every page's bytes (HostRead) and the allocator's
    counts (GetPlatformInfo)."""
    rmp = host.rmp
    pages = hashlib.sha256()
    for pfn in range(rmp.npages):
        pages.update(rmp.frames.read(pfn))
    return {
        "guest": dataclasses.asdict(host.fw.guests[host.gctx]),
        "platform": host.fw.status_bytes(),
        "rmp": [rmp.entry(pfn) for pfn in range(rmp.npages)],
        "pages": pages.hexdigest(),
        "free": rmp.allocator.free_count,
        "leaked": int(rmp.allocator.leaked.sum()),
    }


async def test_id_block_from_sev_snp_measure_is_accepted_and_reported(tmp_path: Path) -> None:
    host, ld = await launched(tmp_path)
    ib = id_block_for(ld, tmp_path)
    await finish(host, ib)
    _, payload = await host.request(gm.MsgType.REPORT_REQ, report_request(), seqno=1)
    report = payload[0x20 : 0x20 + 0x4A0]
    assert report[0x0E0:0x110] == ib["id_key_digest"]
    assert report[0x110:0x140] == ib["author_key_digest"]
    assert struct.unpack_from("<I", report, 0x48)[0] & 1  # AUTHOR_KEY_EN
    assert report[0x10:0x30] == ib["id_block"][0x30:0x50]  # FAMILY_ID, IMAGE_ID


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ("block_sig", SevStatus.BAD_SIGNATURE),
        ("id_key_sig", SevStatus.BAD_SIGNATURE),
        ("digest", SevStatus.BAD_MEASUREMENT),
        ("policy", SevStatus.POLICY_FAILURE),
    ],
)
async def test_bad_id_blocks_are_refused_and_change_nothing(
    tmp_path: Path, change: str, status: SevStatus
) -> None:
    # the tool signs policy 0x30000: a guest launched with debug allowed does not match it
    policy = 0x30000 | (1 << 19 if change == "policy" else 0)
    host, ld = await launched(tmp_path, policy)
    ib = id_block_for(ld if change != "digest" else bytes(48), tmp_path)
    block, auth = bytearray(ib["id_block"]), bytearray(ib["id_auth"])
    if change == "block_sig":
        auth[0x40] ^= 1
    elif change == "id_key_sig":
        auth[0x680] ^= 1
    before = observe(host)
    with pytest.raises(FirmwareError) as info:
        await finish(host, {**ib, "id_block": bytes(block), "id_auth": bytes(auth)})
    assert info.value.status == status
    after = observe(host)
    assert after["guest"]["state"].name == "LAUNCH"  # type: ignore[index]
    assert after == before
    # and the guest finishes as if the refused call had never been made: nothing of the
    # refused block reached the report. SPEC: SEV-SNP ABI, ATTESTATION_REPORT structure
    # (GUEST_SVN 0x04, FAMILY_ID 0x10, IMAGE_ID 0x20, flags 0x48 bit 0 AUTHOR_KEY_EN,
    # MEASUREMENT 0x90, HOST_DATA 0xC0, ID_KEY_DIGEST 0xE0, AUTHOR_KEY_DIGEST 0x110)
    assert await host.finish() == ld
    _, payload = await host.request(gm.MsgType.REPORT_REQ, report_request(), seqno=1)
    report = payload[0x20 : 0x20 + 0x4A0]
    assert struct.unpack_from("<I", report, 0x04)[0] == 0
    assert report[0x10:0x30] == bytes(32)
    assert struct.unpack_from("<I", report, 0x48)[0] & 1 == 0
    assert report[0x90:0xC0] == ld
    assert report[0xC0:0xE0] == bytes(32)
    assert report[0xE0:0x140] == bytes(96)
