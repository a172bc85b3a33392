"""One GHCB exit on its way back to the guest: the answer, and what must go with its write."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from snpemu.abi import ghcb as g
from snpemu.kvm.exits.map_gpa import GhcbPending, Hypercall
from snpemu.kvm.ports import HostOp, RmpUpdateBatch
from snpemu.kvm.vm import Vcpu, Vm


@dataclass
class ExitResult:
    sw_exit_info_1: int = 0
    sw_exit_info_2: int = 0
    terminated: bool = False
    # the exit went on to the VMM (a gmem VM's PSC, map_gpa.py): nothing is written back yet
    hypercall: Hypercall | None = None


@dataclass
class ExitState:
    """One GHCB exit on its way back to the guest. kvm's host accesses that must precede the
    GHCB write go with that write in one rmp HostSequence message: `tail` (accesses whose
    results the GHCB does not depend on, e.g. the response copy) and `batch` (a PSC's
    RMPUPDATEs, answered here as if every page succeeded; if one did not, the sequence stops
    before the write and the exit is handled again with the real codes in `codes`: psc.py).
    `held` keeps locks taken by the handler (a VM's guest-request mutex) until the GHCB is
    written."""

    speculate: bool = True
    tail: list[HostOp] = field(default_factory=list)
    batch: RmpUpdateBatch | None = None
    codes: bytes | None = None
    # page and request counts, added to kvm's counters once the GHCB is written
    psc_pages: Counter[tuple[str, str]] = field(default_factory=Counter)
    psc_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    held: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    # set by a handler that hands the exit to the VMM: the GHCB is kept, not written back
    forward: GhcbPending | None = None


# (result, registers written back, the shared buffer written back or None)
Outcome = tuple[ExitResult, dict[str, int], bytearray | None]
Handler = Callable[[Vm, Vcpu, g.Ghcb, ExitState], Awaitable[Outcome]]


def malformed(err: int) -> Outcome:
    """GHCB_HV_RESP_MALFORMED_INPUT with the GHCB_ERR_* reason (KERNEL: sev.c
    svm_vmgexit_bad_input())."""
    return ExitResult(g.RESP_MALFORMED_INPUT, err), {}, None
