"""The firmware model end to end over an in-process rmp: launch, measurement, reports, keys."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sevsnpmeasure.gctx import GCTX
from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import VMSA_GPA, PageState
from snpemu.psp import report as rpt
from snpemu.psp.status import FirmwareError, SevStatus

from tests.conftest import examples
from tests.unit.psp.launch_helpers import make_host, report_request


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chip")


PAGE_OPS = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 3, 4, 5]), st.integers(0, 255), st.binary(min_size=1, max_size=64)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=examples(25), deadline=None)
@given(PAGE_OPS)
async def test_launch_digest_equals_sev_snp_measure(
    tmp: Path, ops: list[tuple[int, int, bytes]]
) -> None:
    """Any page sequence pushed through the firmware gives sev-snp-measure's GCTX digest."""

    host = make_host(tmp)
    await host.start()
    ref = GCTX()
    secrets_done = False
    for i, (kind, gfn, seed) in enumerate(ops):
        gpa = (gfn << 12) + (i << 24)
        page = (seed * (4096 // len(seed) + 1))[:4096]
        if kind == 1:
            await host.place(gpa, page, PageType.NORMAL)
            ref.update_normal_pages(gpa, page)
        elif kind == 2:
            await host.place(VMSA_GPA, page, PageType.VMSA)
            ref.update_vmsa_page(page)
        elif kind == 3:
            await host.place(gpa, page, PageType.ZERO)
            ref.update_zero_pages(gpa, 4096)
        elif kind == 4:
            await host.place(gpa, page, PageType.UNMEASURED)
            ref.update_unmeasured_pages(gpa, 4096)
        elif not secrets_done:
            await host.place(gpa, None, PageType.SECRETS)
            ref.update_secrets_page(gpa)
            secrets_done = True
    measurement = await host.finish()
    assert measurement == ref.ld()


async def test_launched_pages_are_encrypted_and_become_guest_valid(tmp: Path) -> None:
    host = make_host(tmp)
    await host.start()
    code = os.urandom(4096)
    await host.place(0x1000, code, PageType.NORMAL)
    await host.place(0x2000, b"junk", PageType.ZERO)
    spa = host.pages[0x1000]
    assert host.rmp.entry(spa >> 12).state == PageState.PRE_GUEST
    assert host.rmp.host_read(spa, 4096) != code  # encrypted in place
    await host.finish()
    assert host.rmp.entry(spa >> 12).state == PageState.GUEST_VALID
    data, fault = host.rmp.guest_read(host.guest(), 0x1000, 4096, private=True)
    assert fault is None and data == code
    zero, _ = host.rmp.guest_read(host.guest(), 0x2000, 4096, private=True)
    assert zero == bytes(4096)


async def test_report_from_live_state_is_signed_by_the_vcek(tmp: Path) -> None:
    host = make_host(tmp)
    await host.start(policy=0x30000 | 1 << 19)
    await host.place(0x1000, os.urandom(4096), PageType.NORMAL)
    await host.place(0x5000, None, PageType.SECRETS)
    host.secrets_gpa = 0x5000
    host_data = bytes(range(32))
    measurement = await host.finish(host_data)
    user = os.urandom(64)
    rh, payload = await host.request(gm.MsgType.REPORT_REQ, report_request(user, vmpl=1), seqno=1)
    assert (rh.seqno, rh.msg_type, rh.msg_version) == (2, gm.MsgType.REPORT_RSP, 1)
    status, size = struct.unpack_from("<II", payload, 0)
    assert (status, size) == (0, 0x4A0)
    report = payload[0x20 : 0x20 + size]
    fw = host.fw
    assert struct.unpack_from("<IIQ", report, 0) == (3, 0, 0x30000 | 1 << 19)
    assert struct.unpack_from("<II", report, 0x30) == (1, 1)  # VMPL, SIGNATURE_ALGO
    assert report[0x50:0x90] == user
    assert report[0x90:0xC0] == measurement
    assert report[0xC0:0xE0] == host_data
    assert report[0x1A0:0x1E0] == fw.id.chip_id
    assert struct.unpack_from("<Q", report, 0x180)[0] == fw.reported_tcb.raw
    assert report[0x188:0x18B] == bytes([0x19, 0x01, 0x01])
    assert report[0x1E8:0x1EB] == bytes([21, 55, 1])
    assert not any(report[0x18B:0x1A0]) and not any(report[0x208:0x2A0])
    assert not any(report[0x2A0 + 144 :])
    vcek = fw.id.vcek_cert(fw.reported_tcb).public_key()
    assert rpt.verify(report, vcek)  # type: ignore[arg-type]
    flipped = bytearray(report)
    flipped[0x50] ^= 1
    assert not rpt.verify(bytes(flipped), vcek)  # type: ignore[arg-type]
    # the next request must use seqno 3; a replay of 1 is refused and changes nothing
    with pytest.raises(FirmwareError) as info:
        await host.request(gm.MsgType.REPORT_REQ, report_request(), seqno=1)
    assert info.value.status == SevStatus.INVALID_PARAM
    rh, _ = await host.request(gm.MsgType.REPORT_REQ, report_request(), seqno=3)
    assert rh.seqno == 4
    # VMPL below the VMPCK's VMPL: status INVALID_PARAM inside the response
    _, payload = await host.request(gm.MsgType.REPORT_REQ, report_request(vmpl=0), seqno=1, vmpck=1)
    assert struct.unpack_from("<I", payload, 0)[0] == SevStatus.INVALID_PARAM


async def test_derived_keys_follow_the_selected_fields(tmp: Path) -> None:
    host = make_host(tmp)
    await host.start()
    await host.place(0x5000, None, PageType.SECRETS)
    host.secrets_gpa = 0x5000
    await host.finish()
    seq = iter(range(1, 200, 2))

    async def key(select: int, vmpl: int = 0, svn: int = 0, tcb: int = 0) -> tuple[int, bytes]:
        req = struct.pack("<IIQIIQQ", 0, 0, select, vmpl, svn, tcb, 0)
        _, p = await host.request(gm.MsgType.KEY_REQ, req, seqno=next(seq))
        return struct.unpack_from("<I", p, 0)[0], p[0x20:0x40]

    assert (await key(0)) == (await key(0))
    s, k0 = await key(0)
    assert s == 0 and len(k0) == 32
    assert (await key(0, vmpl=1))[1] != k0
    assert (await key(8))[1] != k0  # MEASUREMENT selected
    # an unselected TCB value does not change the key; a selected one does
    assert (await key(0, tcb=1))[1] == k0
    committed = host.fw.committed_tcb.raw
    assert (await key(32, tcb=committed))[1] != (await key(32, tcb=0))[1]
    assert (await key(32, tcb=committed + (1 << 56)))[0] == SevStatus.INVALID_PARAM
    assert (await key(16, svn=1))[0] == SevStatus.INVALID_PARAM  # above the ID block SVN
