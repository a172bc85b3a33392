"""rmp, psp, kvm and netd as real gRPC servers in one process (port 0), each reaching the others
over gRPC; a stand-in for the guest kernel's side of the exits, for tests below the agent; and
the guest agent itself on such a stack. The fixtures of tests/service/conftest.py build on these
(tests/README.md, "The fixture ladder")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from snp.common.v1 import handles_pb2, types_pb2
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc
from snp.netd.v1 import netd_pb2_grpc
from snp.psp.v1 import psp_pb2_grpc
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc
from snpemu import guest, kvm, netd, psp, rmp
from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi import msr_protocol as msr
from snpemu.abi import psc
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.credentials import vmm_credential
from snpemu.runtime.server import ServiceRuntime
from snpemu.vmm import tiny_firmware

R = TypeVar("R")
PFERR_GUEST_RMP = 1 << 31  # KERNEL: arch/x86/include/asm/kvm_host.h PFERR_GUEST_RMP_MASK

CRED = "stack-credential-0123456789"
# the VMM credential of the default agent name (each agent gets its own: agent() below)
VMM = vmm_credential(CRED, "guest-t")
HOST = (("x-snpemu-host-credential", CRED),)
LIST_MAX = 4096  # ListRmpEntries answers at most this many entries a call
GHCB_GPA = 0x100000  # Guest.register_ghcb's default: a page the tiny firmware leaves shared


@dataclass
class Stack:
    rmp: rmp_pb2_grpc.RmpServiceStub
    psp: psp_pb2_grpc.PspServiceStub
    kvm: kvm_pb2_grpc.KvmServiceStub
    netd: netd_pb2_grpc.NetdServiceStub
    runtimes: dict[str, ServiceRuntime]
    firmware: Path

    async def rmp_entries(self) -> list[bytes]:
        """Every RMP entry that is not the hypervisor default, serialized, in PFN order."""
        info = await self.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
        entries: list[bytes] = []
        for first in range(0, int(info.max_pfn) + 1, LIST_MAX):
            r = await self.rmp.ListRmpEntries(
                rmp_pb2.ListRmpEntriesRequest(
                    first_pfn=first, count=LIST_MAX, non_default_only=True
                ),
                metadata=HOST,
            )
            entries += [e.SerializeToString() for e in r.entries]
        return entries

    async def launch(self, memory: int = 64 << 20, vcpus: int = 1, **config: object) -> Guest:
        config.setdefault("firmware_path", str(self.firmware))
        cfg = kvm_pb2.VmConfig(memory_bytes=memory, vcpus=vcpus, **config)  # type: ignore[arg-type]
        vm = (await self.kvm.CreateVm(kvm_pb2.CreateVmRequest(config=cfg), metadata=HOST)).vm
        r = await self.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=vm), metadata=HOST)
        return Guest(self, vm, list(r.vcpus), bytes(r.measurement))


@dataclass
class Guest:
    """What the guest kernel does through its vCPU: memory access via rmp, exits to kvm."""

    stack: Stack
    vm: handles_pb2.VmHandle
    vcpus: list[handles_pb2.VcpuIdentity]
    measurement: bytes
    ghcb_gpa: int = 0
    seqno: int = 1
    vmpck0: bytes = field(default=b"")
    inline_ghcb: bool = False

    @property
    def ident(self) -> handles_pb2.VcpuIdentity:
        return self.vcpus[0]

    async def msr(self, value: int) -> kvm_pb2.VmgexitMsrResponse:
        return await self.stack.kvm.VmgexitMsr(
            kvm_pb2.VmgexitMsrRequest(identity=self.ident, ghcb_msr=value)
        )

    async def _mapped(self, call: Callable[[], Awaitable[R]]) -> R:
        """The access as the CPU makes it: a nested page table miss (#NPF without the RMP
        bit) exits to kvm, and while kvm maps the page (the guest's memory is backed as it is
        first used) the access is made again."""
        for _ in range(4):
            r = await call()
            f = r.fault  # type: ignore[attr-defined]
            if not (r.HasField("fault") and f.npf and not f.error_code & PFERR_GUEST_RMP):  # type: ignore[attr-defined]
                return r
            n = await self.stack.kvm.NestedPageFault(
                kvm_pb2.NestedPageFaultRequest(
                    identity=self.ident, gpa=f.gpa, error_code=f.error_code
                )
            )
            if n.action != "map":
                return r
        raise AssertionError("the access keeps faulting")

    async def read(self, gpa: int, length: int, private: bool) -> rmp_pb2.GuestReadResponse:
        return await self._mapped(
            lambda: self.stack.rmp.GuestRead(
                rmp_pb2.GuestReadRequest(
                    identity=self.ident, gpa=gpa, length=length, private=private
                )
            )
        )

    async def write(self, gpa: int, data: bytes, private: bool) -> rmp_pb2.GuestWriteResponse:
        return await self._mapped(
            lambda: self.stack.rmp.GuestWrite(
                rmp_pb2.GuestWriteRequest(identity=self.ident, gpa=gpa, data=data, private=private)
            )
        )

    async def pvalidate(self, gpa: int, validate: bool = True) -> rmp_pb2.PvalidateResponse:
        return await self._mapped(
            lambda: self.stack.rmp.Pvalidate(
                rmp_pb2.PvalidateRequest(
                    identity=self.ident,
                    gpa=gpa,
                    page_size=types_pb2.PAGE_SIZE_4K,
                    validate=validate,
                )
            )
        )

    async def register_ghcb(self, gpa: int = GHCB_GPA) -> None:
        r = await self.msr(gpa | msr.REG_GPA_REQ)
        assert r.ghcb_msr == gpa | msr.REG_GPA_RESP, hex(r.ghcb_msr)
        self.ghcb_gpa = gpa

    async def vmgexit(self, ghcb: g.Ghcb) -> tuple[kvm_pb2.VmgexitResponse, g.Ghcb]:
        """Write the GHCB (shared page), VMGEXIT, read the GHCB back. With `inline_ghcb` the
        page goes with the exit and comes back in the reply, and must then equal the page in
        guest memory."""
        if self.inline_ghcb:
            r = await self.stack.kvm.Vmgexit(
                kvm_pb2.VmgexitRequest(identity=self.ident, ghcb=ghcb.encode())
            )
            back = await self.read(self.ghcb_gpa, 4096, private=False)
            assert r.terminated or r.ghcb == back.data
            return r, g.Ghcb.decode(back.data)
        await self.write(self.ghcb_gpa, ghcb.encode(), private=False)
        r = await self.stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=self.ident))
        assert not r.ghcb  # only an exit that carried the page gets it back
        back = await self.read(self.ghcb_gpa, 4096, private=False)
        return r, g.Ghcb.decode(back.data)

    async def secrets(self) -> bytes:
        r = await self.read(tiny_firmware.SECRETS_GPA, 4096, private=True)
        assert not r.HasField("fault"), r.fault
        return bytes(r.data)

    async def guest_request(
        self,
        payload: bytes,
        msg_type: int = gm.MsgType.REPORT_REQ,
        *,
        ext_pages: int | None = None,
        certs_gpa: int = 0x140000,
        seqno: int | None = None,
    ) -> tuple[kvm_pb2.VmgexitResponse, g.Ghcb, bytes | None]:
        """sev-guest's request: seal with VMPCK0, VMGEXIT, open the response."""
        if not self.vmpck0:
            self.vmpck0 = (await self.secrets())[0x20:0x40]
        seq = self.seqno if seqno is None else seqno
        req_gpa, res_gpa = 0x120000, 0x121000
        hdr = gm.Header(seqno=seq, msg_type=msg_type, msg_version=1, msg_sz=len(payload), vmpck=0)
        await self.write(req_gpa, gm.seal(self.vmpck0, hdr, payload), private=False)
        ghcb = g.Ghcb()
        code = g.EXIT_GUEST_REQUEST if ext_pages is None else g.EXIT_EXT_GUEST_REQUEST
        ghcb.set("sw_exit_code", code)
        ghcb.set("sw_exit_info_1", req_gpa)
        ghcb.set("sw_exit_info_2", res_gpa)
        if ext_pages is not None:
            ghcb.set("rax", certs_gpa)
            ghcb.set("rbx", ext_pages)
        r, back = await self.vmgexit(ghcb)
        if r.sw_exit_info_2 != 0:
            return r, back, None
        page = (await self.read(res_gpa, 4096, private=False)).data
        rh = gm.parse_header(page)
        assert rh.seqno == seq + 1
        if seqno is None:
            self.seqno += 2
        return r, back, gm.open_payload(self.vmpck0, rh, page)


@contextlib.asynccontextmanager
async def host_stack(
    tmp: Path,
    *,
    memory: str = "512M",
    policy: str = "gmem",
    hold_us: int = 0,
    netd_env: dict[str, str] | None = None,
    psp_env: dict[str, str] | None = None,
    kvm_clock: Callable[[], float] | None = None,
    interceptors: dict[str, list[grpc.aio.ServerInterceptor]] | None = None,
    **kvm_env: str,
) -> AsyncIterator[Stack]:
    """`kvm_clock`: kvm's clock (its guest-request throttles), for a test that moves it;
    `interceptors`: extra server interceptors by service ("rmp", "psp", ...), for faults."""
    extra = interceptors or {}
    assert set(extra) <= {"rmp", "psp", "kvm", "netd"}, f"no such host service: {sorted(extra)}"
    common = {
        "SNPEMU_GRPC_PORT": "0",
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_HOST_CREDENTIAL": CRED,
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
    }
    started: list[ServiceRuntime] = []
    try:
        r = ServiceRuntime(
            rmp.SPEC,
            ServiceConfig.from_env("rmp", common),
            rmp.SPEC.options(
                {
                    "SNPEMU_RMP_MEMORY": memory,
                    "SNPEMU_RMP_POLICY": policy,
                    "SNPEMU_RMP_KICK_TIMEOUT_S": "2",
                    "SNPEMU_RMP_INSN_HOLD_US": str(hold_us),
                }
            ),
            extra.get("rmp", ()),
        )
        await r.start()
        started.append(r)
        p = ServiceRuntime(
            psp.SPEC,
            ServiceConfig.from_env(
                "psp", {**common, "SNPEMU_RMP_ADDR": r.address, "SNPEMU_DATA_DIR": str(tmp / "psp")}
            ),
            psp.SPEC.options({"SNPEMU_KDS_PORT": "0", **(psp_env or {})}),
            extra.get("psp", ()),
        )
        await p.start()
        started.append(p)
        # kvm reads images only from its image directory: the tiny firmware is its default
        fw = tmp / "images" / "tiny.fd"
        fw.parent.mkdir(exist_ok=True)
        fw.write_bytes(tiny_firmware.build())
        kvm_env = {
            "SNPEMU_KVM_FIRMWARE": str(fw),
            "SNPEMU_KVM_IMAGE_DIR": str(fw.parent),
            **kvm_env,
        }
        kvm_options: Any = kvm.SPEC.options(kvm_env)
        if kvm_clock is not None:
            kvm_options = dataclasses.replace(kvm_options, clock=kvm_clock)
        k = ServiceRuntime(
            kvm.SPEC,
            ServiceConfig.from_env(
                "kvm",
                {
                    **common,
                    "SNPEMU_RMP_ADDR": r.address,
                    "SNPEMU_PSP_ADDR": p.address,
                    # its TMR record (kvm/tmr_record.py) stays with this stack
                    "SNPEMU_DATA_DIR": str(tmp / "kvm"),
                },
            ),
            kvm_options,
            extra.get("kvm", ()),
        )
        await k.start()
        started.append(k)
        n = ServiceRuntime(
            netd.SPEC,
            ServiceConfig.from_env(
                "netd",
                {
                    **common,
                    "SNPEMU_RMP_ADDR": r.address,
                    "SNPEMU_KVM_ADDR": k.address,
                    "SNPEMU_DATA_DIR": str(tmp / "netd"),
                },
            ),
            netd.SPEC.options(netd_env or {}),
            extra.get("netd", ()),
        )
        await n.start()
        started.append(n)
        async with (
            grpc.aio.insecure_channel(r.address) as rc,
            grpc.aio.insecure_channel(p.address) as pc,
            grpc.aio.insecure_channel(k.address) as kc,
            grpc.aio.insecure_channel(n.address) as nc,
        ):
            yield Stack(
                rmp_pb2_grpc.RmpServiceStub(rc),
                psp_pb2_grpc.PspServiceStub(pc),
                kvm_pb2_grpc.KvmServiceStub(kc),
                netd_pb2_grpc.NetdServiceStub(nc),
                {"rmp": r, "psp": p, "kvm": k, "netd": n},
                fw,
            )
    finally:
        for rt in reversed(started):
            await rt.stop()


# the guest agent of a running guest: its stub, and its runtime (for its registry and impl)
Agent = tuple[guest_pb2_grpc.GuestServiceStub, ServiceRuntime]


@contextlib.asynccontextmanager
async def agent(
    s: Stack, name: str = "guest-t", owner: str | None = None, **opts: str
) -> AsyncIterator[Agent]:
    """The guest agent `name` on stack `s`, once it has booted (or the guest terminated).
    With `owner`, its API requires that owner credential (as under the launcher)."""
    env = {
        "SNPEMU_GRPC_PORT": "0",
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_INSTANCE": name,
        "SNPEMU_VMM_CREDENTIAL": vmm_credential(CRED, name),
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
        **({"SNPEMU_OWNER_CREDENTIAL": owner} if owner else {}),
        **{
            f"SNPEMU_{c.upper()}_ADDR": s.runtimes[c].address for c in ("rmp", "psp", "kvm", "netd")
        },
    }
    md = (("x-snpemu-owner-credential", owner),) if owner else ()
    options = {"SNPEMU_GUEST_FIRMWARE": str(s.firmware), "SNPEMU_GUEST_MEMORY": "64M", **opts}
    rt = ServiceRuntime(
        guest.SPEC, ServiceConfig.from_env("guest", env), guest.SPEC.options(options)
    )
    await rt.start()
    try:
        async with grpc.aio.insecure_channel(rt.address) as ch:
            stub = guest_pb2_grpc.GuestServiceStub(ch)
            deadline = asyncio.get_running_loop().time() + 120
            while (await stub.GetStatus(guest_pb2.GetStatusRequest(), metadata=md)).state not in (
                guest_pb2.BOOT_STATE_RUNNING,
                guest_pb2.BOOT_STATE_TERMINATED,
            ):
                assert asyncio.get_running_loop().time() < deadline, f"{name} never booted"
                await asyncio.sleep(0.05)
            yield stub, rt
    finally:
        await rt.stop()


def psc_ghcb(ghcb_gpa: int, entries: list[int], **kw: int) -> g.Ghcb:
    """A GHCB asking for a Page State Change of `entries`, its descriptor in the shared buffer."""
    x = g.Ghcb()
    x.set("sw_exit_code", g.EXIT_PSC)
    x.set("sw_exit_info_1", 0)
    x.set("sw_exit_info_2", 0)
    x.set("sw_scratch", ghcb_gpa + g.SHARED_BUFFER)
    x.shared = psc_buffer(entries, **kw)
    return x


def psc_entry(gfn: int, op: int, size_2m: bool = False, cur_page: int = 0) -> int:
    """One PSC descriptor entry as the guest writes it (abi/psc.py)."""
    return psc.Entry(cur_page, gfn, op, size_2m).encode()


def psc_buffer(entries: list[int], cur: int = 0, end: int | None = None) -> bytearray:
    buf = bytearray(g.SHARED_BUFFER_SIZE)
    struct.pack_into("<HHI", buf, 0, cur, len(entries) - 1 if end is None else end, 0)
    for i, e in enumerate(entries):
        struct.pack_into("<Q", buf, 8 + 8 * i, e)
    return buf
