"""The guest kernel of one SNP VM: boot, memory validation, page-state changes, #VC.

It reaches the host only as a guest can: VMGEXIT to kvm (MSR protocol and GHCB, with its vCPU
identity), guest-mode memory access and PVALIDATE/RMPADJUST through rmp. Creating and launching
the VM is the VMM's part (QEMU's), done with the VMM credential.
KERNEL: arch/x86/coco/sev/core.c (snp_accept_memory, set_pages_state, snp_set_vmsa,
wakeup_cpu_via_vmgexit), arch/x86/boot/compressed/sev.c (sev_enable: protocol, HV features).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from snp.common.v1 import handles_pb2, types_pb2
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2

from snpemu.abi import ghcb as g
from snpemu.abi import msr_protocol as msr
from snpemu.abi import psc
from snpemu.errors import WrongState
from snpemu.runtime.peers import Peer, PeerError, SessionPool
from snpemu.vmm import vmsa
from snpemu.vmm.ovmf import Ovmf, SectionType

log = logging.getLogger(__name__)

PAGE = 4096
GHCB_GPA = 0x1000
# guest-request pages (shared); INVARIANT: RESP_GPA == REQ_GPA + PAGE (one write fills both)
REQ_GPA, RESP_GPA, CERTS_GPA = 0x3000, 0x4000, 0x10000
CERTS_PAGES = 16
SHARED_GPAS = (GHCB_GPA, REQ_GPA, RESP_GPA, *(CERTS_GPA + i * PAGE for i in range(CERTS_PAGES)))
PSC_BATCH = 253
# GHCB termination reasons (arch/x86/include/asm/sev-common.h)
TERM_GEN, TERM_LINUX = 0, 1
GEN_REQ, GEN_PROT_UNSUPPORTED, GEN_SNP_UNSUPPORTED = 0, 1, 2
LINUX_REGISTER, LINUX_PSC, LINUX_PVALIDATE, LINUX_SECRETS_PAGE = 0, 1, 2, 6


class BootState(enum.IntEnum):
    """Values match snp.guest.v1.BootState."""

    CREATED = 1
    LAUNCHING = 2
    BOOTING = 3
    RUNNING = 4
    TERMINATED = 5


@dataclass
class Event:
    kind: str
    gpa: int = 0
    detail: str = ""
    timestamp_ns: int = field(default_factory=time.time_ns)


class GuestFault(WrongState):
    """A guest access that faulted and was not resolved (a #VC the guest chose not to die of)."""

    default_reason = "GUEST_FAULT"


class Terminated(WrongState):
    default_reason = "GUEST_TERMINATED"


class GuestKernel:
    def __init__(self, name: str, opts: Any, rmp: Peer, kvm: Peer, default_firmware: str) -> None:
        self.name, self.opts, self.rmp, self.kvm = name, opts, rmp, kvm
        # the guest's clock and delay (jiffies, schedule_timeout_killable()) for the
        # guest-request retry loop and the report flood; a test sets its own so nothing waits
        # for real
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        # the vCPU's memory accesses and PVALIDATEs, as stream messages rather than calls
        self.mem = SessionPool(rmp, size=4, method="GuestSession")
        self.firmware = opts.firmware or default_firmware
        self.state = BootState.CREATED
        self.term_reason = (0, 0)
        self.events: list[Event] = []
        # totals survive the trimming of `events` (Prometheus counters never go down)
        self.event_counts: dict[str, int] = {}
        self.vm: handles_pb2.VmHandle | None = None
        self.hold: Any = None  # the HoldVm stream
        self.vcpus: list[handles_pb2.VcpuIdentity] = []
        self.measurement = b""
        self.secrets_gpa = 0
        npages = opts.memory_bytes // PAGE
        self.accepted = np.zeros(npages, dtype=bool)  # validated by this guest
        # Never touched yet (Linux's unaccepted-memory bitmap): only these are accepted on first
        # touch; a page the guest converted to shared stays shared until converted back.
        self.unaccepted = np.ones(npages, dtype=bool)
        self.vmpcks: list[bytes] = [bytes(32)] * 4
        self.disabled: set[int] = set()
        self.counters = [0, 0, 0, 0]  # last sequence number used per VMPCK (the OS area's copy)

    # --- identity and low-level exits -------------------------------------------------------

    @property
    def ident(self) -> handles_pb2.VcpuIdentity:
        return self.vcpus[0]

    def event(self, kind: str, gpa: int = 0, detail: str = "") -> None:
        self.events.append(Event(kind, gpa, detail))
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        del self.events[:-1000]
        log.info(
            "%s: %s %s", kind, hex(gpa) if gpa else "", detail, extra={"event": f"guest_{kind}"}
        )

    def check_running(self) -> None:
        if self.state == BootState.TERMINATED:
            rs, code = self.term_reason
            raise Terminated(f"the guest terminated (reason set {rs}, code {code})")
        if self.state != BootState.RUNNING:
            raise WrongState(
                f"the guest is {self.state.name.lower()}, not running", reason="GUEST_NOT_RUNNING"
            )

    async def vmexit(self, method: str, request: Any) -> Any:
        """A VMGEXIT or #NPF exit. A VM the host terminated (convert-kill) never runs again:
        note why, and answer as a terminated guest does."""
        try:
            return await self.kvm.call(method, request)
        except PeerError as e:
            if e.reason == "VM_TERMINATED" and self.state != BootState.TERMINATED:
                with contextlib.suppress(Exception):
                    info = (await self.kvm.call("GetVm", kvm_pb2.GetVmRequest(vm=self.vm))).vm
                    self.term_reason = (info.term_reason_set, info.term_reason_code)
                self.state = BootState.TERMINATED
                self.event("terminated", detail=f"by the host: {e.message}")
            if e.reason == "VM_TERMINATED":
                rs, code = self.term_reason
                raise Terminated(
                    f"the host terminated this guest (reason set {rs}, code {code})"
                ) from None
            raise

    async def msr_exit(self, value: int) -> int:
        r = await self.vmexit(
            "VmgexitMsr", kvm_pb2.VmgexitMsrRequest(identity=self.ident, ghcb_msr=value)
        )
        return int(r.ghcb_msr)

    async def terminate(self, reason_set: int, code: int, why: str) -> None:
        """GHCB MSR TERM_REQUEST: the guest stops with its reason."""
        self.event("terminated", detail=f"set {reason_set} code {code}: {why}")
        self.state, self.term_reason = BootState.TERMINATED, (reason_set, code)
        if self.vcpus:
            with contextlib.suppress(Exception):  # the host may already have stopped the VM
                await self.msr_exit(code << 16 | reason_set << 12 | msr.TERM_REQ)

    async def ghcb_exit(self, ghcb: g.Ghcb) -> tuple[kvm_pb2.VmgexitResponse, g.Ghcb]:
        """Fill the GHCB and VMGEXIT. The page goes with the exit and comes back in the reply
        (kvm.proto VmgexitRequest.ghcb): the guest's write to its shared GHCB page and its read
        after the exit, without a round trip to memory each."""
        r = await self.vmexit(
            "Vmgexit", kvm_pb2.VmgexitRequest(identity=self.ident, ghcb=ghcb.encode())
        )
        if r.terminated:
            self.state = BootState.TERMINATED
            return r, ghcb
        return r, g.Ghcb.decode(bytes(r.ghcb))

    # --- boot -------------------------------------------------------------------------------

    async def launch(self) -> None:
        """The VMM's part: create and launch the VM (QEMU over KVM)."""
        o = self.opts
        self.state = BootState.LAUNCHING
        cfg = kvm_pb2.VmConfig(
            memory_bytes=o.memory_bytes,
            vcpus=o.vcpus,
            vcpu_type=o.vcpu_type,
            policy=o.policy,
            firmware_path=o.firmware,
            kernel_path=o.kernel,
            initrd_path=o.initrd,
            cmdline=o.cmdline,
            host_data=o.host_data,
            throttle=kvm_pb2.GuestRequestThrottle(
                interval_ms=o.throttle_ms, burst=o.throttle_burst
            ),
        )
        self.vm = (await self.kvm.call("CreateVm", kvm_pb2.CreateVmRequest(config=cfg))).vm
        # Hold the VM as a VMM holds its VM fd: if this process dies, kvm destroys the VM.
        self.hold = self.kvm.ensure().HoldVm(
            kvm_pb2.HoldVmRequest(vm=self.vm), metadata=self.kvm.md
        )
        await self.hold.read()
        r = await self.kvm.call("LaunchVm", kvm_pb2.LaunchVmRequest(vm=self.vm), timeout=300)
        self.vcpus, self.measurement = list(r.vcpus), bytes(r.measurement)
        self.event("launched", detail=self.measurement.hex())

    async def boot(self) -> None:
        await self.launch()
        self.state = BootState.BOOTING
        info = await self.msr_exit(msr.SEV_INFO_REQ)
        lo, hi = info >> 32 & 0xFFFF, info >> 48
        if info & msr.INFO_MASK != msr.SEV_INFO_RESP or not lo <= 2 <= hi:
            return await self.terminate(
                TERM_GEN, GEN_PROT_UNSUPPORTED, "GHCB protocol 2 not offered"
            )
        features = await self.msr_exit(msr.HV_FT_REQ) >> 12
        if not features & msr.HV_FT_SNP:
            return await self.terminate(TERM_GEN, GEN_SNP_UNSUPPORTED, "SNP not offered")
        if await self.msr_exit(GHCB_GPA | msr.REG_GPA_REQ) != GHCB_GPA | msr.REG_GPA_RESP:
            return await self.terminate(TERM_LINUX, LINUX_REGISTER, "GHCB registration refused")
        ovmf = Ovmf.load(self.firmware)
        launched = [s for s in ovmf.sections if s.gpa + s.size <= self.opts.memory_bytes]
        for s in launched:  # pages the firmware launched are private and validated already
            self.accepted[s.gpa // PAGE : (s.gpa + s.size) // PAGE] = True
            self.unaccepted[s.gpa // PAGE : (s.gpa + s.size) // PAGE] = False
        for gpa in SHARED_GPAS:
            self.unaccepted[gpa // PAGE] = False
        secrets = next((s for s in ovmf.sections if s.kind == SectionType.SNP_SECRETS), None)
        if secrets is None:
            return await self.terminate(TERM_LINUX, LINUX_SECRETS_PAGE, "no secrets page")
        self.secrets_gpa = secrets.gpa
        page = await self.read_private(self.secrets_gpa, PAGE)
        self.vmpcks = [page[0x20 + 32 * i : 0x40 + 32 * i] for i in range(4)]
        self.counters = [
            int.from_bytes(page[0xA0 + 4 * i : 0xA4 + 4 * i], "little") for i in range(4)
        ]
        if self.opts.eager:
            await self.accept(0, self.opts.memory_bytes)
        await self.start_aps(ovmf)
        if self.state == BootState.TERMINATED:
            return
        self.state = BootState.RUNNING
        self.event(
            "boot",
            detail=f"{len(self.vcpus)} vCPUs, {'eager' if self.opts.eager else 'lazy'} acceptance",
        )

    async def start_aps(self, ovmf: Ovmf) -> None:
        """AP_CREATION with a VMSA the guest builds and marks with RMPADJUST (snp_set_vmsa)."""
        for apic_id in range(1, len(self.vcpus)):
            gpa = self.opts.memory_bytes - (2 * apic_id + 1) * PAGE  # never 2 MiB aligned
            await self.accept(gpa, PAGE)
            page = vmsa.build(ovmf.reset_eip, 0, 1)
            await self.write_private(gpa, page)
            r = await self.rmpadjust(gpa, vmsa=True)
            if r.eax:
                return await self.terminate(
                    TERM_GEN, GEN_REQ, f"RMPADJUST of the AP VMSA failed: {r.eax}"
                )
            x = g.Ghcb()
            for k, v in (
                ("sw_exit_code", g.EXIT_AP_CREATION),
                ("sw_exit_info_1", apic_id << 32 | 1),
                ("sw_exit_info_2", gpa),
                ("rax", 1),
            ):
                x.set(k, v)
            resp, _ = await self.ghcb_exit(x)
            if resp.sw_exit_info_1:
                return await self.terminate(TERM_GEN, GEN_REQ, f"AP {apic_id} creation refused")

    # --- page state and validation ---------------------------------------------------------

    async def psc(self, entries: list[psc.Entry]) -> None:
        """set_pages_state(): GHCB PSC in descriptors of up to 253 entries, each through
        vmgexit_psc(); a failed one terminates the guest (reason set 1, GHCB_TERM_PSC), as
        __set_pages_state() does."""
        for i in range(0, len(entries), PSC_BATCH):
            batch = entries[i : i + PSC_BATCH]
            buf = bytearray(g.SHARED_BUFFER_SIZE)
            psc.Descriptor(0, len(batch) - 1, 0, batch).encode_into(buf)
            why = await self.vmgexit_psc(buf)
            if why:
                await self.terminate(TERM_LINUX, LINUX_PSC, why)
                raise Terminated(f"page state change failed: {why}")

    async def vmgexit_psc(self, data: bytearray) -> str:
        """KERNEL: arch/x86/coco/sev/core.c vmgexit_psc(). The descriptor in the GHCB shared
        buffer goes to the host until its cur_entry passes its end_entry; the host may stop
        early and is asked again, with no limit on how often. Any nonzero SW_EXITINFO2
        (PSC_ERROR_GENERIC included) or failed GHCB call, a nonzero reserved field in the
        header, or a header whose end_entry grew or whose cur_entry fell below where this
        call started is a failure: returns why ("" when every entry is done)."""
        cur_entry, end_entry, _ = psc.HDR.unpack_from(data, 0)
        while True:
            cur, end, _ = psc.HDR.unpack_from(data, 0)
            if cur > end:
                return ""
            x = g.Ghcb()
            for k, v in (
                ("sw_exit_code", g.EXIT_PSC),
                ("sw_exit_info_1", 0),
                ("sw_exit_info_2", 0),
                ("sw_scratch", GHCB_GPA + g.SHARED_BUFFER),
            ):
                x.set(k, v)
            x.shared = data
            r, back = await self.ghcb_exit(x)
            if r.terminated:
                raise Terminated("the host terminated this guest during a page state change")
            info1, info2 = int(r.sw_exit_info_1) & 0xFFFFFFFF, int(r.sw_exit_info_2)
            if info1 or info2:  # sev_es_ghcb_hv_call() failed, or the host's PSC error
                return f"PSC failed: exit_info_1={info1:#x} exit_info_2={info2:#x}"
            # the host advances the descriptor in the shared buffer; the next exit sends it on
            data = bytearray(back.shared)
            cur, end, reserved = psc.HDR.unpack_from(data, 0)
            if reserved:
                return "reserved field set in the PSC header"
            # KERNEL: "entry processing is not going backwards": compared with the header as
            # this call wrote it, not with the previous exit's
            if end > end_entry or cur_entry > cur:
                return (
                    f"PSC processing going backward: end_entry {end_entry} (got {end}), "
                    f"cur_entry {cur_entry} (got {cur})"
                )

    async def pvalidate(self, gpas: list[int], validate: bool) -> None:
        for i in range(0, len(gpas), 4096):
            chunk = gpas[i : i + 4096]
            while chunk:
                r = await self.mem.call(
                    "pvalidate_batch",
                    rmp_pb2.PvalidateBatchRequest(
                        identity=self.ident, gpas=chunk, validate=validate
                    ),
                )
                done = len(r.codes)
                bad = [c for c in r.codes if c not in (0, 255)]
                if bad:
                    await self.terminate(TERM_LINUX, LINUX_PVALIDATE, f"PVALIDATE failed: {bad[0]}")
                    raise Terminated("PVALIDATE failed")
                if r.HasField("fault"):
                    # e.g. a 4K PVALIDATE on a 2M entry: #NPF, kvm PSMASHes, the guest retries
                    n = await self.vmexit(
                        "NestedPageFault",
                        kvm_pb2.NestedPageFaultRequest(
                            identity=self.ident, gpa=r.fault.gpa, error_code=r.fault.error_code
                        ),
                    )
                    if not n.retry:
                        await self.terminate(TERM_LINUX, LINUX_PVALIDATE, r.fault.cause)
                        raise Terminated("PVALIDATE faulted")
                chunk = chunk[done:]

    def _pages(self, gpa: int, size: int) -> range:
        if gpa % PAGE or size <= 0 or size % PAGE or gpa + size > self.opts.memory_bytes:
            raise WrongState("range must be page aligned and inside guest RAM", reason="BAD_RANGE")
        return range(gpa // PAGE, (gpa + size) // PAGE)

    async def rmpadjust(self, gpa: int, perms: int = 0, vmsa: bool = False) -> Any:
        """RMPADJUST of a 4K page for VMPL1 (the guest runs at VMPL0)."""
        return await self.rmp.call(
            "RmpAdjust",
            rmp_pb2.RmpAdjustRequest(
                identity=self.ident,
                gpa=gpa,
                page_size=types_pb2.PAGE_SIZE_4K,
                target_vmpl=1,
                perms=perms,
                vmsa=vmsa,
            ),
        )

    async def race_rmpadjust(self, gpa: int, iterations: int) -> dict[str, int]:
        """RMPADJUST (VMPL1 permissions toggled) on one page in a loop, as a guest racing the
        host's conversion of that page. Faults go to kvm like any #NPF and the loop goes on;
        returns how each attempt ended, by RmpResult name or "npf"."""
        await self.accept_on_touch(gpa, PAGE)
        outcomes: dict[str, int] = {}
        for i in range(iterations):
            self.check_running()
            r = await self.rmpadjust(gpa, perms=0x3 if i % 2 else 0x1)  # read, then read+write
            if r.HasField("fault") and r.fault.vc:
                kind = "vc"
                self.event("vc", r.fault.gpa, f"RMPADJUST: {r.fault.cause}")
                if self.opts.terminate_on_vc:
                    await self.terminate(TERM_GEN, GEN_REQ, f"#VC in RMPADJUST at {gpa:#x}")
                    outcomes[kind] = outcomes.get(kind, 0) + 1
                    break
            elif r.HasField("fault"):
                kind = "npf"
                self.event("npf", r.fault.gpa, f"RMPADJUST: {r.fault.cause}")
                await self.vmexit(
                    "NestedPageFault",
                    kvm_pb2.NestedPageFaultRequest(
                        identity=self.ident, gpa=r.fault.gpa, error_code=r.fault.error_code
                    ),
                )
            else:
                kind = rmp_pb2.RmpResult.Name(r.result).removeprefix("RMP_RESULT_")
            outcomes[kind] = outcomes.get(kind, 0) + 1
        return outcomes

    async def accept_on_touch(self, gpa: int, size: int) -> None:
        """Linux's unaccepted memory (lazy mode): pages never touched are accepted on first use,
        each run of them in one accept; a page accepted once (even if made shared since) is
        never accepted again here, so a later private access to it still takes #VC."""
        if self.opts.eager:
            return
        first, end = gpa // PAGE, min((gpa + size - 1) // PAGE + 1, len(self.unaccepted))
        todo = np.flatnonzero(self.unaccepted[first:end]) + first
        for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
            if len(run):
                await self.accept(int(run[0]) * PAGE, len(run) * PAGE)

    async def accept(self, gpa: int, size: int) -> int:
        """accept_memory(): PSC to private, then PVALIDATE; 2M at a time where it can."""
        pages = [
            p
            for p in self._pages(gpa, size)
            if not self.accepted[p] and p * PAGE not in SHARED_GPAS
        ]
        if not pages:
            return 0
        wanted = set(pages)
        huge = sorted(
            {p & ~511 for p in pages if all(q in wanted for q in range(p & ~511, (p & ~511) + 512))}
        )
        small = [p for p in pages if p & ~511 not in set(huge)]
        entries = [psc.Entry(0, h, psc.Op.PRIVATE, True) for h in huge]
        entries += [psc.Entry(0, p, psc.Op.PRIVATE, False) for p in small]
        await self.psc(entries)
        for h in huge:
            r = await self.rmp.call(
                "Pvalidate",
                rmp_pb2.PvalidateRequest(
                    identity=self.ident,
                    gpa=h * PAGE,
                    page_size=types_pb2.PAGE_SIZE_2M,
                    validate=True,
                ),
            )
            if r.HasField("fault") or r.eax not in (0, 255):
                await self.pvalidate([(h + i) * PAGE for i in range(512)], True)
        await self.pvalidate([p * PAGE for p in small], True)
        self.accepted[pages] = True
        self.unaccepted[pages] = False
        return len(pages)

    async def convert(self, gpa: int, size: int, private: bool, size_2m: bool) -> int:
        """set_memory_encrypted()/set_memory_decrypted(): PVALIDATE around a PSC."""
        pages = list(self._pages(gpa, size))
        self.unaccepted[pages] = False
        if size_2m and (gpa % (2 << 20) or size % (2 << 20)):
            raise WrongState("2M conversions take 2 MiB-aligned ranges", reason="BAD_RANGE")
        step = 512 if size_2m else 1
        heads = pages[::step]
        entries = [
            psc.Entry(0, p, psc.Op.PRIVATE if private else psc.Op.SHARED, size_2m) for p in heads
        ]
        if not private:
            accepted = [p * PAGE for p in pages if self.accepted[p]]
            await self.pvalidate(accepted, False)  # rescind validation before making it shared
            self.accepted[pages] = False
            await self.psc(entries)
        else:
            await self.psc(entries)
            await self.pvalidate([p * PAGE for p in pages], True)
            self.accepted[pages] = True
        return len(pages)

    # --- memory access with #VC / #NPF handling -------------------------------------------

    async def _access(
        self, op: str, gpa: int, *, private: bool, data: bytes = b"", length: int = 0
    ) -> bytes:
        if private:
            await self.accept_on_touch(gpa, max(length, len(data)))
        for _ in range(4):
            if op == "read":
                r = await self.mem.call(
                    "read",
                    rmp_pb2.GuestReadRequest(
                        identity=self.ident, gpa=gpa, length=length, private=private
                    ),
                )
            else:
                r = await self.mem.call(
                    "write",
                    rmp_pb2.GuestWriteRequest(
                        identity=self.ident, gpa=gpa, data=data, private=private
                    ),
                )
            if not r.HasField("fault"):
                return bytes(r.data) if op == "read" else b""
            f = r.fault
            if f.vc:
                self.event("vc", f.gpa, f"{f.cause} (error code {f.error_code:#x})")
                if self.opts.terminate_on_vc:
                    await self.terminate(TERM_GEN, GEN_REQ, f"#VC: {f.cause} at {f.gpa:#x}")
                    raise Terminated(f"#VC at {f.gpa:#x} ({f.cause}): the guest terminated")
                raise GuestFault(f"#VC at {f.gpa:#x}: {f.cause}", metadata={"gpa": hex(f.gpa)})
            n = await self.vmexit(
                "NestedPageFault",
                kvm_pb2.NestedPageFaultRequest(
                    identity=self.ident, gpa=f.gpa, error_code=f.error_code
                ),
            )
            self.event("npf", f.gpa, f"{f.cause}: kvm {n.action}")
            if not n.retry:
                raise GuestFault(
                    f"#NPF at {f.gpa:#x}: {f.cause} ({n.action})", metadata={"gpa": hex(f.gpa)}
                )
        raise GuestFault(f"access at {gpa:#x} keeps faulting")

    async def read_private(self, gpa: int, length: int) -> bytes:
        return await self._access("read", gpa, private=True, length=length)

    async def write_private(self, gpa: int, data: bytes) -> None:
        await self._access("write", gpa, private=True, data=data)

    async def read(self, gpa: int, length: int, shared: bool) -> bytes:
        return await self._access("read", gpa, private=not shared, length=length)

    async def write(self, gpa: int, data: bytes, shared: bool) -> None:
        await self._access("write", gpa, private=not shared, data=data)


def firmware_default(kvm_default: str) -> str:
    return kvm_default if Path(kvm_default).exists() else ""
