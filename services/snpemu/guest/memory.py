"""The guest's memory: page-state changes (GHCB PSC), PVALIDATE, acceptance on first touch,
private/shared conversion, and its accesses with the #VC and #NPF they may take.

KERNEL: arch/x86/coco/sev/core.c (snp_accept_memory, set_pages_state, __set_pages_state,
vmgexit_psc, pvalidate_pages), arch/x86/mm/mem_encrypt_amd.c (set_memory_encrypted/decrypted).
"""

from __future__ import annotations

import numpy as np

from snpemu.abi import ghcb as g
from snpemu.abi import psc
from snpemu.abi.addr import (
    PAGE_SIZE,
    PAGES_PER_2M,
    PMD_SIZE,
    Gfn,
    Gpa,
    gfn_to_gpa,
    gpa_to_gfn,
    page_aligned,
)
from snpemu.abi.rmp import Code
from snpemu.errors import WrongState
from snpemu.guest.errors import GuestFault, GuestReason, Terminated
from snpemu.guest.exits import (
    GEN_REQ,
    LINUX_PSC,
    LINUX_PVALIDATE,
    TERM_GEN,
    TERM_LINUX,
    VcpuExits,
)
from snpemu.guest.layout import GHCB_GPA, SHARED_GPAS
from snpemu.guest.ports import Fault, Instruction, Read

PSC_BATCH = 253  # KERNEL: VMGEXIT_PSC_MAX_ENTRY
PVALIDATE_BATCH = 4096  # pages per PvalidateBatch message
# PVALIDATE results that leave the page as asked (KERNEL: PVALIDATE_FAIL_NOUPDATE is not an error)
DONE = (Code.SUCCESS, Code.FAIL_NOUPDATE)


def _huge(gfn: int) -> Gfn:
    """The first 4K frame of the 2M page holding `gfn`."""
    return Gfn(gfn & ~(PAGES_PER_2M - 1))


class GuestMemory(VcpuExits):
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
            info1, info2 = r.sw_exit_info_1 & 0xFFFFFFFF, r.sw_exit_info_2
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

    async def pvalidate(self, gpas: list[Gpa], validate: bool) -> None:
        for i in range(0, len(gpas), PVALIDATE_BATCH):
            chunk = gpas[i : i + PVALIDATE_BATCH]
            while chunk:
                r = await self.rmp.pvalidate_batch(self.ident, chunk, validate=validate)
                done = len(r.codes)
                bad = [c for c in r.codes if c not in DONE]
                if bad:
                    await self.terminate(TERM_LINUX, LINUX_PVALIDATE, f"PVALIDATE failed: {bad[0]}")
                    raise Terminated("PVALIDATE failed")
                if r.fault is not None:
                    # e.g. a 4K PVALIDATE on a 2M entry: #NPF, kvm PSMASHes, the guest retries
                    n = await self.npf(r.fault)
                    if not n.retry:
                        await self.terminate(TERM_LINUX, LINUX_PVALIDATE, r.fault.cause)
                        raise Terminated("PVALIDATE faulted")
                chunk = chunk[done:]

    def _pages(self, gpa: int, size: int) -> range:
        if not (page_aligned(gpa) and page_aligned(size) and self.in_ram(gpa, size)):
            raise WrongState(
                "range must be page aligned and inside guest RAM", reason=GuestReason.BAD_RANGE
            )
        return range(gpa_to_gfn(gpa), gpa_to_gfn(gpa + size))

    async def rmpadjust(self, gpa: Gpa, perms: int = 0, vmsa: bool = False) -> Instruction:
        """RMPADJUST of a 4K page for VMPL1 (the guest runs at VMPL0)."""
        return await self.rmp.rmpadjust(self.ident, gpa, target_vmpl=1, perms=perms, vmsa=vmsa)

    async def accept_on_touch(self, gpa: int, size: int) -> None:
        """Linux's unaccepted memory (lazy mode): pages never touched are accepted on first use,
        each run of them in one accept; a page accepted once (even if made shared since) is
        never accepted again here, so a later private access to it still takes #VC."""
        if self.opts.eager:
            return
        first, end = gpa_to_gfn(gpa), min(gpa_to_gfn(gpa + size - 1) + 1, len(self.unaccepted))
        todo = np.flatnonzero(self.unaccepted[first:end]) + first
        for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
            if len(run):
                await self.accept(gfn_to_gpa(int(run[0])), gfn_to_gpa(len(run)))

    async def accept(self, gpa: int, size: int) -> int:
        """accept_memory(): PSC to private, then PVALIDATE; 2M at a time where it can."""
        todo = [
            p
            for p in self._pages(gpa, size)
            if not self.accepted[p] and gfn_to_gpa(p) not in SHARED_GPAS
        ]
        if not todo:
            return 0
        wanted = set(todo)
        huge = sorted(
            {
                _huge(p)
                for p in todo
                if all(q in wanted for q in range(_huge(p), _huge(p) + PAGES_PER_2M))
            }
        )
        small = [p for p in todo if _huge(p) not in set(huge)]
        entries = [psc.Entry(0, h, psc.Op.PRIVATE, True) for h in huge]
        entries += [psc.Entry(0, p, psc.Op.PRIVATE, False) for p in small]
        await self.psc(entries)
        for h in huge:
            r = await self.rmp.pvalidate(self.ident, gfn_to_gpa(h), size_2m=True, validate=True)
            if r.fault is not None or r.eax not in DONE:
                await self.pvalidate([gfn_to_gpa(h + i) for i in range(PAGES_PER_2M)], True)
        await self.pvalidate([gfn_to_gpa(p) for p in small], True)
        self.accepted[todo] = True
        self.unaccepted[todo] = False
        return len(todo)

    async def convert(self, gpa: int, size: int, private: bool, size_2m: bool) -> int:
        """set_memory_encrypted()/set_memory_decrypted(): PVALIDATE around a PSC."""
        frames = list(self._pages(gpa, size))
        # refused before the pages lose their unaccepted mark: a refusal changes nothing
        if size_2m and (gpa % PMD_SIZE or size % PMD_SIZE):
            raise WrongState(
                "2M conversions take 2 MiB-aligned ranges", reason=GuestReason.BAD_RANGE
            )
        self.unaccepted[frames] = False
        step = PAGES_PER_2M if size_2m else 1
        heads = frames[::step]
        entries = [
            psc.Entry(0, p, psc.Op.PRIVATE if private else psc.Op.SHARED, size_2m) for p in heads
        ]
        if not private:
            accepted = [gfn_to_gpa(p) for p in frames if self.accepted[p]]
            await self.pvalidate(accepted, False)  # rescind validation before making it shared
            self.accepted[frames] = False
            await self.psc(entries)
        else:
            await self.psc(entries)
            await self.pvalidate([gfn_to_gpa(p) for p in frames], True)
            self.accepted[frames] = True
        return len(frames)

    def page_states(self, gpa: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """What restore_pages() needs to put a range back: its accepted and unaccepted marks."""
        frames = self._pages(gpa, size)
        return self.accepted[frames].copy(), self.unaccepted[frames].copy()

    async def restore_pages(self, gpa: int, saved: tuple[np.ndarray, np.ndarray]) -> None:
        """Undo conversions of a range whose page_states() were `saved`, as a driver's probe
        error path frees its DMA buffers (dma_free_coherent() -> set_memory_encrypted()): a
        page private and accepted before is private again; one shared, or never touched
        (hypervisor-owned: unaccepted memory is assigned only by its first accept), is shared
        again and a never-touched one unaccepted again, so its first use still accepts it."""
        was_accepted, was_unaccepted = saved
        first = gpa_to_gfn(gpa)
        frames = np.arange(first, first + len(was_accepted))
        now = self.accepted[frames]
        for private, pick in ((True, was_accepted & ~now), (False, ~was_accepted & now)):
            for gfn in frames[pick].tolist():
                await self.convert(gfn_to_gpa(gfn), PAGE_SIZE, private=private, size_2m=False)
        self.unaccepted[frames[was_unaccepted]] = True

    # --- memory access with #VC / #NPF handling -------------------------------------------

    async def _access(
        self, gpa: Gpa, *, private: bool, data: bytes | None = None, length: int = 0
    ) -> bytes:
        """A read of `length` bytes, or (with `data`) a write."""
        if private:
            await self.accept_on_touch(gpa, max(length, len(data or b"")))
        for _ in range(4):
            f: Fault | None
            if data is None:
                r: Read = await self.rmp.read(self.ident, gpa, length, private=private)
                if r.fault is None:
                    return r.data
                f = r.fault
            else:
                f = await self.rmp.write(self.ident, gpa, data, private=private)
                if f is None:
                    return b""
            if f.vc:
                self.event("vc", f.gpa, f"{f.cause} (error code {f.error_code:#x})")
                if self.opts.terminate_on_vc:
                    await self.terminate(TERM_GEN, GEN_REQ, f"#VC: {f.cause} at {f.gpa:#x}")
                    raise Terminated(f"#VC at {f.gpa:#x} ({f.cause}): the guest terminated")
                raise GuestFault(f"#VC at {f.gpa:#x}: {f.cause}", metadata={"gpa": hex(f.gpa)})
            n = await self.npf(f)
            self.event("npf", f.gpa, f"{f.cause}: kvm {n.action}")
            if not n.retry:
                raise GuestFault(
                    f"#NPF at {f.gpa:#x}: {f.cause} ({n.action})", metadata={"gpa": hex(f.gpa)}
                )
        raise GuestFault(f"access at {gpa:#x} keeps faulting")

    async def read_private(self, gpa: int, length: int) -> bytes:
        return await self._access(Gpa(gpa), private=True, length=length)

    async def write_private(self, gpa: int, data: bytes) -> None:
        await self._access(Gpa(gpa), private=True, data=data)

    async def read(self, gpa: int, length: int, shared: bool) -> bytes:
        return await self._access(Gpa(gpa), private=not shared, length=length)

    async def write(self, gpa: int, data: bytes, shared: bool) -> None:
        await self._access(Gpa(gpa), private=not shared, data=data)
