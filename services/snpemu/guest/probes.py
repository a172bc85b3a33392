"""Misbehaviour that probes the RMP from inside the guest: RMPADJUST racing the host's
conversion of a page, and reaching for another guest's frame."""

from __future__ import annotations

import dataclasses
import secrets

from snpemu.abi.addr import PAGE_SIZE, Gpa
from snpemu.abi.rmp import Code
from snpemu.guest.exits import GEN_REQ, TERM_GEN
from snpemu.guest.memory import GuestMemory
from snpemu.kvm.identity import VcpuIdentity
from snpemu.runtime.peers import PeerError

FOREIGN_OPS = ("read", "validate", "adjust")


async def race_rmpadjust(k: GuestMemory, gpa: Gpa, iterations: int) -> dict[str, int]:
    """RMPADJUST (VMPL1 permissions toggled) on one page in a loop, as a guest racing the
    host's conversion of that page. Faults go to kvm like any #NPF and the loop goes on;
    returns how each attempt ended, by RmpResult name or "npf"."""
    await k.accept_on_touch(gpa, PAGE_SIZE)
    outcomes: dict[str, int] = {}
    for i in range(iterations):
        k.check_running()
        r = await k.rmpadjust(gpa, perms=0x3 if i % 2 else 0x1)  # read, then read+write
        if r.fault is not None and r.fault.vc:
            kind = "vc"
            k.event("vc", r.fault.gpa, f"RMPADJUST: {r.fault.cause}")
            if k.opts.terminate_on_vc:
                await k.terminate(TERM_GEN, GEN_REQ, f"#VC in RMPADJUST at {gpa:#x}")
                outcomes[kind] = outcomes.get(kind, 0) + 1
                break
        elif r.fault is not None:
            kind = "npf"
            k.event("npf", r.fault.gpa, f"RMPADJUST: {r.fault.cause}")
            await k.npf(r.fault)
        else:
            kind = Code(r.eax).name
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return outcomes


async def access_foreign(k: GuestMemory, op: str, spa: int, asid: int) -> list[str]:
    """Reach for another guest's frame the only ways a guest has: the frame's address as a
    GPA through its own nested page table, and (with `asid`) the other guest's ASID presented
    with a guessed vCPU token. Neither may reach the frame; says what stopped each."""
    gpa = Gpa(spa)
    outcomes = [f"as itself at GPA {spa:#x}: {await _foreign(k, op, k.ident, gpa)}"]
    if asid and asid != k.ident.asid:
        forged = dataclasses.replace(k.ident, asid=asid, token=secrets.token_bytes(32))
        outcomes.append(f"as ASID {asid}: {await _foreign(k, op, forged, gpa)}")
    return outcomes


async def _foreign(k: GuestMemory, op: str, ident: VcpuIdentity, gpa: Gpa) -> str:
    try:
        if op == "read":
            fault = (await k.rmp.read_call(ident, gpa, 64, private=True)).fault
        elif op == "validate":
            fault = (await k.rmp.pvalidate(ident, gpa, size_2m=False, validate=True)).fault
        else:
            fault = (await k.rmp.rmpadjust(ident, gpa, target_vmpl=1, perms=1, vmsa=False)).fault
    except PeerError as e:
        return f"refused by rmp ({e.reason}: {e.message})"
    if fault is None:
        return "reached a page of its own (the address is inside its own guest RAM)"
    if fault.vc:
        return f"#VC ({fault.cause})"
    n = await k.npf(fault, ident)
    k.event("npf", fault.gpa, f"{fault.cause}: kvm {n.action}")
    return f"#NPF ({fault.cause}); kvm: {n.action}, {'retried' if n.retry else 'not retried'}"
