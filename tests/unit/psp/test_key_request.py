"""MSG_KEY_REQ through SNP_GUEST_REQUEST: which requests the firmware answers with a key, which with
INVALID_PARAM, and the response's layout.

SPEC: SEV-SNP Firmware ABI (AMD 56860) "MSG_KEY_REQ" / "MSG_KEY_RSP":
    request:  u32 root_key_select (bit 0: VMRK), u32 rsvd, u64 guest_field_select (bits 5:0:
              policy, image ID, family ID, measurement, guest SVN, TCB version; 63:6 reserved),
              u32 vmpl, u32 guest_svn, u64 tcb_version, u64 launch_mit_vector (0x28 bytes)
    response: u32 status, u8 rsvd[28], u8 derived_key[32] (0x40 bytes)
    VMPL must be at least the VMPL of the VMPCK the message came under, and at most 3;
    a selected GUEST_SVN above the guest's SVN, or a selected TCB_VERSION above the committed
    TCB, is INVALID_PARAM. INVALID_PARAM is status 0x16 (SEV_RET_INVALID_PARAM, KERNEL:
    include/uapi/linux/psp-sev.h).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType

from tests.unit.psp.launch_helpers import make_host

INVALID_PARAM = 0x16
GUEST_SVN, TCB_VERSION = 1 << 4, 1 << 5


class Guest:
    """One launched guest for the whole module (a launch costs seconds), on one event loop."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.host = make_host(tmp)
        self.loop.run_until_complete(self._launch())
        self.seqnos = {v: itertools.count(1, 2) for v in range(4)}

    async def _launch(self) -> None:
        await self.host.start()
        await self.host.place(0x5000, None, PageType.SECRETS)
        self.host.secrets_gpa = 0x5000
        await self.host.finish()

    def __call__(self, req: bytes, vmpck: int = 0) -> bytes:
        """The MSG_KEY_RSP payload for one request under VMPCK<vmpck>."""
        rh, payload = self.loop.run_until_complete(
            self.host.request(gm.MsgType.KEY_REQ, req, next(self.seqnos[vmpck]), vmpck)
        )
        assert rh.msg_type == gm.MsgType.KEY_RSP and rh.msg_sz == len(payload)
        return payload


@pytest.fixture(scope="module")
def ask(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    guest = Guest(tmp_path_factory.mktemp("chip"))
    yield guest
    guest.loop.close()


def key_request(select: int = 0, vmpl: int = 0, svn: int = 0, tcb: int = 0, root: int = 0) -> bytes:
    return struct.pack("<IIQIIQQ", root, 0, select, vmpl, svn, tcb, 0)


def status(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "little")


def test_a_key_response_is_status_reserved_key(ask: Guest) -> None:
    ok = ask(key_request())
    assert len(ok) == 0x40 and ok[:4] == bytes(4) and ok[4:0x20] == bytes(28)
    assert any(ok[0x20:0x40])


def test_a_refused_key_request_is_invalid_param_and_no_key(ask: Guest) -> None:
    bad = ask(key_request(root=1))  # VMRK: no migration agent
    assert bad == (0x16).to_bytes(4, "little") + bytes(60)


def test_reserved_field_select_bits_are_refused(ask: Guest) -> None:
    assert status(ask(key_request(select=1 << 6))) == INVALID_PARAM
    assert status(ask(key_request(select=1 << 63))) == INVALID_PARAM
    assert status(ask(key_request(select=0x3F))) == 0  # every defined bit


def test_vmpl_from_the_vmpcks_own_up_to_3(ask: Guest) -> None:
    got = [
        ask(key_request(vmpl=3), 0),
        ask(key_request(vmpl=4), 0),
        ask(key_request(vmpl=2), 2),
        ask(key_request(vmpl=1), 2),  # below the VMPL of VMPCK2
        ask(key_request(vmpl=3), 3),
    ]
    assert [status(p) for p in got] == [0, INVALID_PARAM, 0, INVALID_PARAM, 0]


def test_guest_svn_is_checked_only_when_selected(ask: Guest) -> None:
    # the guest was launched without an ID block: its SVN is 0
    got = [
        ask(key_request(select=GUEST_SVN, svn=0)),  # equal to the guest's SVN: allowed
        ask(key_request(select=GUEST_SVN, svn=1)),
        ask(key_request(select=GUEST_SVN, svn=0xFFFF_FFFF)),
        ask(key_request(select=0, svn=0xFFFF_FFFF)),  # not selected: not checked
    ]
    assert [status(p) for p in got] == [0, INVALID_PARAM, INVALID_PARAM, 0]
    # unselected, the SVN does not enter the key
    assert got[3][0x20:] == ask(key_request())[0x20:]


def test_tcb_version_is_checked_only_when_selected(ask: Guest) -> None:
    above = 0xFF << 56  # a microcode SVN of 255 in byte 7: above any committed TCB here
    assert status(ask(key_request(select=TCB_VERSION, tcb=above))) == INVALID_PARAM
    assert status(ask(key_request(tcb=above))) == 0
