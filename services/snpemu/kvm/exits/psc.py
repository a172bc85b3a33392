"""Page State Change: the GHCB PSC descriptor and the MSR protocol's one-page request.

KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(), __snp_complete_one_psc(), snp_complete_psc(),
snp_begin_psc_msr(); the descriptor layout and KVM's rules for it are in abi/psc.py.

Three ways a GHCB PSC is handled here, giving one answer:

- The loop (`PageStateChanges.apply`): KVM's, entry by entry from cur_entry to end_entry.
  A 2M entry at cur_page 0 over a 2M-contiguous memslot run takes one 2M RMPUPDATE of its
  own; the other pages are collected and go to rmp as one RMPUPDATE batch (`_run`), and
  progress stops at the first page that failed.
- The plan (`plan_4k`): the common request, as the guest kernel's set_memory_encrypted() /
  decrypted() fills the shared buffer with up to 253 4K entries, each at cur_page 0
  (KERNEL: arch/x86/coco/sev/core.c __set_pages_state()), planned with array operations:
  the batch, the page counts and the descriptor as written back when every page succeeds.
  Entries with an operation other than PRIVATE/SHARED are completed without an RMPUPDATE,
  and reserved bits 63:57 are ignored and written back as they were, as KVM does (KERNEL:
  snp_begin_psc() `default:`). Anything else (2M entries, entries already partly done,
  GPAs outside the memslots, a header with nothing to do or a bad one) goes to the loop
  (tests/unit/test_psc_batch.py holds the two together).
- The speculation (ExitState in outcome.py, the write-back in dispatch.py): an exit's
  RMPUPDATE batch is not sent on its own; it goes with the GHCB write in one rmp
  HostSequence, and the GHCB is written as if every page succeeded. rmp runs the sequence
  in order and stops at the first failure, so if a page failed the GHCB write did not run:
  the exit is handled a second time with the real codes (`ExitState.codes`, speculate off)
  and that answer is written. An exit with a 2M entry does not speculate: its 2M
  RMPUPDATEs run before the batch, and handling the exit twice would repeat them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snpemu.abi import ghcb as g
from snpemu.abi import psc, rmp_batch
from snpemu.abi.addr import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_2M, PMD_SIZE, Spa, gfn_to_gpa
from snpemu.abi.rmp import Code
from snpemu.kvm.exits import map_gpa
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.exits.outcome import ExitResult, ExitState, Outcome, malformed
from snpemu.kvm.exits.scratch import setup_vmgexit_scratch
from snpemu.kvm.faultin import faultin, faultin_ranges
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.ports import RmpUpdateBatch
from snpemu.kvm.vm import MemoryModel, Vcpu, Vm


class PageStateChanges:
    def __init__(self, ctx: ExitContext, host: HostAccess) -> None:
        self.ctx = ctx
        self.host = host

    async def msr(self, vm: Vm, gfn: int, op: int) -> bool:
        """One 4K page by the GHCB MSR protocol (KERNEL: sev.c snp_begin_psc_msr())."""
        gpa = gfn_to_gpa(gfn)
        if op in psc.STATE_CHANGES:
            await faultin(self.ctx, vm, gpa, PAGE_SIZE)
        spa = vm.memslots.translate(gpa)
        if spa is None or op not in psc.STATE_CHANGES:
            return False
        eax = await self.host.rmpupdate(spa, private=op == psc.Op.PRIVATE, vm=vm, gpa=gpa)
        if eax == Code.FAIL_OVERLAP and op == psc.Op.SHARED:
            await self._smash([spa])
            eax = await self.host.rmpupdate(spa, private=False, vm=vm, gpa=gpa)
        if eax == 0:
            self.ctx.counters.psc_pages[(psc.Op(op).name.lower(), "4k")] += 1
        return eax == 0

    async def exit(self, vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
        """KERNEL: sev.c sev_handle_vmgexit() SVM_VMGEXIT_PSC: setup_vmgexit_scratch() of at
        least the header, then snp_begin_psc() on the entries the area holds. SW_SCRATCH was
        checked valid by nae.validate()."""
        ghcb_gpa = vcpu.ghcb_gpa or 0
        area = setup_vmgexit_scratch(ghcb_gpa, ghcb.get("sw_scratch"), psc.HDR.size)
        if area is None or not area.in_ghcb:
            # UNVERIFIED(psc-scratch-in-ghcb): as in kernels whose setup_vmgexit_scratch() takes
            # a min_len (sizeof(struct psc_hdr) for a PSC) and refuses a scratch area outside the
            # GHCB for GHCB v2; the mainline read here passes SW_EXIT_INFO_2 as the length and
            # accepts a descriptor outside the GHCB too.
            return malformed(g.ERR_INVALID_SCRATCH_AREA)
        off = area.gpa - (ghcb_gpa + g.SHARED_BUFFER)
        buf = bytearray(ghcb.shared)
        if vm.memory_model == MemoryModel.GMEM:
            return self._forward(vm, buf, off, state)
        await self._back(vm, bytes(buf[off:]))
        if state.speculate:
            fast = plan_4k(bytes(buf[off:]), vm.memslots.translate_many, vm.asid)
            if fast is not None:
                # every page a 4K entry: the batch goes with the GHCB write (ExitState)
                if fast.entries:  # none when every entry is an operation KVM only completes
                    state.batch = RmpUpdateBatch(fast.entries)
                for op, n in (("private", fast.private), ("shared", fast.shared)):
                    if n:
                        state.psc_pages[(op, "4k")] += n
                state.psc_requests[("ghcb", result_name(0))] += 1
                buf[off:] = fast.descriptor[: len(buf) - off]
                return ExitResult(0, 0), {}, buf
        desc = psc.Descriptor.decode(bytes(buf[off:]))
        # 2M entries take RMPUPDATEs of their own first; handling the exit twice would repeat them
        state.speculate = state.speculate and not any(e.size_2m for e in desc.entries)
        result = await self.apply(vm, desc, state)
        view = bytearray(buf[off:])
        desc.encode_into(view)
        buf[off:] = view[: len(buf) - off]
        state.psc_requests[("ghcb", result_name(result))] += 1
        return ExitResult(0, result), {}, buf

    def _forward(self, vm: Vm, buf: bytearray, off: int, state: ExitState) -> Outcome:
        """A gmem VM's PSC: the first range goes to the VMM (map_gpa.py), or the answer when
        there is none."""
        pending = map_gpa.GhcbPending(map_gpa.NO_HYPERCALL, b"", Spa(0), buf, off, 0, 0)
        desc = pending.descriptor()
        return self.step(pending, desc, map_gpa.begin(vm, desc), state)

    def step(
        self,
        pending: map_gpa.GhcbPending,
        desc: psc.Descriptor,
        step: map_gpa.Forward | int,
        state: ExitState,
    ) -> Outcome:
        """Where a forwarded PSC goes next, `desc` as KVM left it: to the VMM again
        (state.forward), or back to the guest with its answer."""
        pending.store(desc)
        if isinstance(step, map_gpa.Forward):
            pending.hypercall, pending.idx, pending.inflight = (
                step.hypercall,
                step.idx,
                step.inflight,
            )
            state.forward = pending
            return ExitResult(hypercall=step.hypercall), {}, pending.shared
        state.psc_requests[("ghcb", result_name(step))] += 1
        return ExitResult(0, step), {}, pending.shared

    async def _back(self, vm: Vm, data: bytes) -> None:
        """The pages the descriptor's entries to do name, backed and mapped before any is
        looked up (the seed's series took each one's pfn through its memslot, which faults a
        page in the first time; kvm/faultin.py)."""
        desc = psc.Descriptor.decode(data)
        if not psc.check_header(desc):
            return
        ranges = [
            (gfn_to_gpa(e.gfn), gfn_to_gpa(e.gfn + e.npages))
            for e in desc.entries[desc.cur_entry : desc.end_entry + 1]
            if e.op in psc.STATE_CHANGES and psc.check_entry(e)
        ]
        if ranges:
            await faultin_ranges(self.ctx, vm, ranges)

    async def apply(self, vm: Vm, desc: psc.Descriptor, state: ExitState) -> int:
        """KVM's PSC loop over the entries; returns sw_exit_info_2 and advances the descriptor.

        KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(), __snp_complete_one_psc()."""
        if not psc.check_header(desc):
            return psc.PSC_ERROR_INVALID_HDR  # INVARIANT from here: end_entry < len(entries)
        if desc.cur_entry > desc.end_entry:
            # KERNEL: snp_begin_psc(): the scan loop does not run (`idx > idx_end`) and
            # snp_complete_psc(svm, 0) answers without writing the buffer
            return 0
        last = desc.end_entry
        first = desc.cur_entry
        work: list[tuple[int, int, int, int, bool]] = []  # (entry, page, spa, gpa, private)
        for idx in range(first, last + 1):
            e = desc.entries[idx]
            if not psc.check_entry(e):
                desc.cur_entry = idx
                return await self._run(
                    vm, desc, work, (first, idx), psc.PSC_ERROR_INVALID_ENTRY, state
                )
            if e.op not in psc.STATE_CHANGES:
                # KERNEL: snp_begin_psc() `default:` (PSMASH, UNSMASH and every undefined
                # operation): __snp_complete_one_psc() marks the range complete without acting
                continue
            # UNVERIFIED(psc-same-state): every page of a PRIVATE or SHARED entry gets an
            # RMPUPDATE, even one already in that state (a private page then loses its
            # Validated bit); KVM changes memory attributes, a no-op for a page already
            # private or shared, and touches the RMP only when guest_memfd faults or frees it.
            gpa = gfn_to_gpa(e.gfn)
            if e.size_2m and e.cur_page == 0:
                spa2m = vm.memslots.contiguous_2m(gpa)
                if spa2m is not None:
                    eax = await self.host.rmpupdate(
                        spa2m, private=e.op == psc.Op.PRIVATE, vm=vm, gpa=gpa, size_2m=True
                    )
                    if eax == 0:
                        e.cur_page = PAGES_PER_2M
                        state.psc_pages[(psc.Op(e.op).name.lower(), "2m")] += 1
                        continue
            for page in range(e.cur_page, e.npages):
                spa = vm.memslots.translate(gpa + page * PAGE_SIZE)
                if spa is None:
                    desc.cur_entry = idx
                    return await self._run(
                        vm, desc, work, (first, idx), psc.PSC_ERROR_GENERIC, state
                    )
                work.append((idx, page, spa, gpa + page * PAGE_SIZE, e.op == psc.Op.PRIVATE))
        result = await self._run(vm, desc, work, (first, last + 1), 0, state)
        if result == 0:
            desc.cur_entry = last + 1
        return result

    async def _run(
        self,
        vm: Vm,
        desc: psc.Descriptor,
        work: list[tuple[int, int, int, int, bool]],
        span: tuple[int, int],
        stop_result: int,
        state: ExitState,
    ) -> int:
        """One batched RMPUPDATE for the 4K work, then progress up to the first failure. `span`
        is the entries the loop went through (first, end exclusive): those before the first
        failure are marked complete, as KVM does range by range; entries past it, or past
        end_entry, are left as the guest wrote them. When the exit may speculate, the batch
        goes with the GHCB write and every page is taken to have succeeded (the module's doc)."""
        first, bound = span
        result = stop_result
        codes: bytes = b""
        if state.codes is not None:
            codes = state.codes
        elif work:
            entries = rmp_batch.pack(
                spa=[spa for _, _, spa, _, _ in work],
                gpa=[gpa if priv else 0 for _, _, _, gpa, priv in work],
                assigned=[priv for *_, priv in work],
                asid=[vm.asid if priv else 0 for *_, priv in work],
            )
            if state.speculate:
                state.batch, codes = RmpUpdateBatch(entries), bytes(len(work))
            else:
                codes = await self.ctx.rmp.session_rmpupdate_batch(entries)
        if any(c == Code.FAIL_OVERLAP for c in codes):
            codes = await self._smash_and_retry(work, codes)
        done_entries: set[int] = set()
        for (idx, page, _, _, priv), code in zip(work, codes, strict=True):
            e = desc.entries[idx]
            if code != 0:
                # Progress stops at the first page that failed; the guest resumes from here.
                # Later pages of this batch were changed too: redoing them is harmless.
                # UNVERIFIED(psc-per-page): KVM hands merged ranges to userspace
                # (KVM_HC_MAP_GPA_RANGE) and, when one fails, answers GENERIC with the whole
                # range unmarked (snp_complete_one_psc()); snpemu stops at the exact page.
                e.cur_page = page
                desc.cur_entry = bound = idx
                result = psc.PSC_ERROR_GENERIC
                break
            e.cur_page = page + 1
            done_entries.add(idx)
            state.psc_pages[("private" if priv else "shared", "4k")] += 1
        for idx in range(first, bound):
            e = desc.entries[idx]
            if idx in done_entries or e.op not in psc.STATE_CHANGES:
                e.cur_page = e.npages
        return result

    async def _smash_and_retry(
        self, work: list[tuple[int, int, int, int, bool]], codes: bytes
    ) -> bytes:
        """The pages to make shared that a 2M RMP entry covers (RMPUPDATE FAIL_OVERLAP), made
        shared after a PSMASH of that entry, as the v5 series' snp_make_page_shared() splits
        "an existing 2M RMP entry" before a 4K page of it is made shared."""
        redo = [
            i
            for i, (w, c) in enumerate(zip(work, codes, strict=True))
            if c == Code.FAIL_OVERLAP and not w[4]
        ]
        if not redo:
            return codes
        await self._smash([work[i][2] for i in redo])
        again = await self.ctx.rmp.session_rmpupdate_batch(
            rmp_batch.pack(spa=[work[i][2] for i in redo])
        )
        out = bytearray(codes)
        for i, c in zip(redo, again, strict=True):
            out[i] = c
        return bytes(out)

    async def _smash(self, spas: list[int]) -> None:
        """PSMASH of the 2M entries over these pages."""
        for head in sorted({s & ~(PMD_SIZE - 1) for s in spas}):
            await self.host.psmash(Spa(head))


def result_name(result: int) -> str:
    return {
        0: "success",
        psc.PSC_ERROR_INVALID_HDR: "invalid_hdr",
        psc.PSC_ERROR_INVALID_ENTRY: "invalid_entry",
    }.get(result, "generic")


# --- the plan of a 4K-only request -------------------------------------------------------------

# the entry's gfn field (bits 51:12, abi/psc.py) in place: the GPA
GPA_FIELD = np.uint64(((1 << 40) - 1) << PAGE_SHIFT)


@dataclass(frozen=True)
class Plan:
    entries: bytes  # the RMPUPDATE batch, one entry per page, in descriptor order
    private: int  # pages to make private
    shared: int  # pages to make shared
    descriptor: bytes  # the descriptor as KVM writes it back when every update succeeds


def plan_4k(
    descriptor: bytes, translate: Callable[[np.ndarray], np.ndarray], asid: int
) -> Plan | None:
    """The RMPUPDATEs of a 4K-only PSC and the descriptor after them; None when the request is
    not of that kind. `translate` maps GPAs to SPAs (-1 outside the memslots)."""
    cur, end, reserved = psc.HDR.unpack_from(descriptor, 0)
    count = min(psc.MAX_ENTRIES, (len(descriptor) - psc.HDR.size) // 8)
    if end >= count or cur > end:  # INVALID_HDR (psc.check_header()), or nothing to do
        return None
    last = end
    raw = np.frombuffer(descriptor, dtype="<u8", count=count, offset=psc.HDR.size)[cur : last + 1]
    # INVARIANT: bits 63:57 (reserved) are masked off everywhere they could be looked at
    if (
        (raw >> np.uint64(56) & np.uint64(1)).any()  # a 2M entry
        or (raw & np.uint64(0xFFF)).any()  # an entry already (partly) done
    ):
        return None
    op = (raw >> np.uint64(52)) & np.uint64(0xF)
    changes = np.isin(op, psc.STATE_CHANGES)  # the others: done, no RMPUPDATE
    gpa = (raw[changes] & GPA_FIELD).astype(np.int64)
    spa = translate(gpa)
    if (spa < 0).any():
        return None
    private = op[changes] == psc.Op.PRIVATE
    entries = rmp_batch.pack(
        spa, gpa=np.where(private, gpa, 0), assigned=private, asid=np.where(private, asid, 0)
    )
    out = bytearray(descriptor)
    psc.HDR.pack_into(out, 0, last + 1, end, reserved)
    done = np.frombuffer(out, dtype="<u8", count=count, offset=psc.HDR.size)
    done[cur : last + 1] = raw | np.uint64(1)  # cur_page = npages = 1
    n_private = int(private.sum())
    return Plan(entries, n_private, len(gpa) - n_private, bytes(out))
