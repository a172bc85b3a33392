"""Drive the firmware model the way KVM and the VMM do, over an in-process rmp."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import VMSA_GPA, Placement
from snpemu.psp.firmware import Firmware
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.local_rmp import LocalRmp
from snpemu.rmp.machine import Identity, RmpMachine

_IDENTITY_CACHE: dict[str, ChipIdentity] = {}


def identity(tmp: Path, product: str = "Milan") -> ChipIdentity:
    """RSA-4096 generation is slow: share one chip per test session."""
    if product not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[product] = ChipIdentity.load_or_create(tmp / product, product)
    return _IDENTITY_CACHE[product]


@dataclass
class Host:
    rmp: RmpMachine
    fw: Firmware
    gctx: int = 0
    asid: int = 0
    pages: dict[int, int] = field(default_factory=dict)  # gpa -> spa

    def firmware_page(self) -> int:
        (pfn,) = self.rmp.allocate(1, Placement.SNP_SAFE)
        spa = pfn << 12
        assert (
            self.rmp.rmpupdate(spa, gpa=0, assigned=True, size_2m=False, immutable=True, asid=0)
            == 0
        )
        return spa

    def shared_page(self) -> int:
        (pfn,) = self.rmp.allocate(1, Placement.ANY)
        return pfn << 12

    async def start(self, policy: int = 0x30000, asid: int = 5) -> None:
        if not self.fw.snp_initialized:
            await self.fw.snp_init()
        self.gctx = self.firmware_page()
        await self.fw.gctx_create(self.gctx)
        await self.fw.launch_start(self.gctx, policy=policy, gosvw=b"", ma_en=False, imi_en=False)
        await self.fw.activate(self.gctx, asid)
        self.asid = asid

    async def finish(self, host_data: bytes = b"") -> bytes:
        """SNP_LAUNCH_FINISH without an ID block: the measurement."""
        return await self.fw.launch_finish(
            self.gctx,
            id_block=b"",
            id_auth=b"",
            id_block_en=False,
            auth_key_en=False,
            vcek_disabled=False,
            host_data=host_data,
        )

    async def place(self, gpa: int, data: bytes | None, page_type: int) -> bytes:
        """Host-write the plaintext, make the page pre-guest, SNP_LAUNCH_UPDATE it."""
        spa = self.shared_page()
        if data:
            self.rmp.frames.write(spa >> 12, 0, data)
        assert (
            self.rmp.rmpupdate(
                spa, gpa=gpa, assigned=True, size_2m=False, immutable=True, asid=self.asid
            )
            == 0
        )
        if gpa != VMSA_GPA:
            self.pages[gpa] = spa
            self.rmp.npt(self.asid).map(gpa, spa >> 12, 1)
        return await self.fw.launch_update(
            self.gctx,
            address=spa,
            page_type=page_type,
            size_2m=False,
            imi=False,
            vmpl_perms=(0, 0, 0),
        )

    def guest(self) -> Identity:
        ident = Identity("vm", 0, self.asid, 0, bytes(16))
        if ("vm", 0) not in self.rmp.identities:
            self.rmp.register(ident)
        return ident

    async def request(
        self, msg_type: int, payload: bytes, seqno: int, vmpck: int = 0, key: bytes | None = None
    ) -> tuple[gm.Header, bytes]:
        """What the guest driver and KVM do for one SNP_GUEST_REQUEST."""
        if key is None:
            key = self.vmpck(vmpck)
        req, res = self.shared_page(), self.firmware_page()
        hdr = gm.Header(
            seqno=seqno, msg_type=msg_type, msg_version=1, msg_sz=len(payload), vmpck=vmpck
        )
        self.rmp.frames.replace(req >> 12, gm.seal(key, hdr, payload))
        await self.fw.guest_request(self.gctx, req, res)
        page = self.rmp.fw_read(res, 4096)
        rh = gm.parse_header(page)
        return rh, gm.open_payload(key, rh, page)

    def vmpck(self, index: int) -> bytes:
        """Read VMPCK<index> from the secrets page by private access, as the guest does."""
        data, fault = self.rmp.guest_read(self.guest(), self.secrets_gpa, 4096, private=True)
        assert fault is None, fault
        return data[0x20 + 32 * index : 0x40 + 32 * index]

    secrets_gpa: int = 0


def make_host(tmp: Path, memory: int = 64 << 20, **rmp_kw: object) -> Host:
    rmp = RmpMachine(memory, **rmp_kw)  # type: ignore[arg-type]
    return Host(rmp, Firmware(identity(tmp), LocalRmp(rmp)))


def report_request(user_data: bytes = bytes(64), vmpl: int = 0) -> bytes:
    return user_data + struct.pack("<I", vmpl) + bytes(28)


async def launched_report(h: Host, report_data: bytes) -> bytes:
    """Launch a guest (one random page, a secrets page) and return the ATTESTATION_REPORT its
    firmware answers to MSG_REPORT_REQ through SNP_GUEST_REQUEST (MSG_REPORT_RSP: u32 status,
    u32 report_size, rsvd[24], then the report)."""
    await h.start()
    await h.place(0x1000, os.urandom(4096), PageType.NORMAL)
    await h.place(0x5000, None, PageType.SECRETS)
    h.secrets_gpa = 0x5000
    await h.finish(bytes(32))
    _, payload = await h.request(gm.MsgType.REPORT_REQ, report_request(report_data), seqno=1)
    size = struct.unpack_from("<I", payload, 4)[0]
    return payload[0x20 : 0x20 + size]
