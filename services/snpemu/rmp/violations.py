"""The violation policy: what a host write to a page the RMP assigns does.

On hardware such a write takes an RMP #PF; what the host does then is the policy
(docs/design.md#violation-policies): kill the writing process with SIGBUS, convert the page to
shared and let the write go on (kicking the guest's vCPUs where they hold it), refuse it as
guest_memfd does, and under each a kernel-mode writer's fault may panic the host.

The kick reaches kvm through a `Notifier`: `KickHub` is the MMU-notifier stream kvm
subscribes to (rmp.proto WatchMmuNotifications) and the acknowledgements it sends back.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from snpemu.abi.rmp import AccessOrigin, Code
from snpemu.errors import InvalidArgument, NotFound, Unavailable
from snpemu.rmp.counters import Counters
from snpemu.rmp.dump import dump_entry
from snpemu.rmp.entry import ASID_MASK, ASID_SHIFT, ASSIGNED, IMMUTABLE, PAGESIZE, VMSA
from snpemu.rmp.entry_arrays import ALIGN_MASK
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.table import RmpTable

log = logging.getLogger(__name__)

CONVERT_RETRIES = 8


class Policy(enum.IntEnum):
    """Values match snp.rmp.v1.ViolationPolicy. docs/design.md#violation-policies."""

    SIGBUS = 1
    CONVERT = 2
    CONVERT_KILL = 3
    GMEM = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> Policy:
        for p in cls:
            if p.label == text:
                return p
        raise InvalidArgument(
            f"unknown RMP violation policy {text!r}: one of {', '.join(p.label for p in cls)}"
        )


class Outcome(enum.IntEnum):
    """Values match snp.rmp.v1.ViolationOutcome."""

    NONE = 1
    SIGBUS = 2
    PANIC = 3
    CONVERTED = 4
    REFUSED = 5


class HostPanic(Unavailable):
    default_reason = RmpReason.HOST_PANIC


class Notifier(Protocol):
    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        """Ask kvm to kick the ASID's vCPUs; True once kvm acknowledged."""


class NoSubscriber:
    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        return False


@dataclass(frozen=True)
class Kick:
    """One notification on the stream (rmp.proto WatchMmuNotificationsResponse)."""

    sequence: int
    asid: int
    pfn: int
    reason: str
    terminate: bool


class KickHub:
    """The MMU-notifier stream kvm subscribes to, and the acknowledgements it sends back."""

    def __init__(
        self, timeout_s: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self.timeout_s = timeout_s
        self.sleep = sleep  # the timer of the acknowledgement timeout (tests drive their own)
        self.subscribers: list[asyncio.Queue[Kick]] = []
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._seq = itertools.count(1)

    def subscribe(self) -> asyncio.Queue[Kick]:
        queue: asyncio.Queue[Kick] = asyncio.Queue()
        self.subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Kick]) -> None:
        self.subscribers.remove(queue)

    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        if not self.subscribers:
            log.warning("no kvm subscribed to MMU notifications: cannot kick ASID %d", asid)
            return False
        seq = next(self._seq)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[seq] = done
        note = Kick(sequence=seq, asid=asid, pfn=pfn, reason=reason, terminate=terminate)
        for q in self.subscribers:
            q.put_nowait(note)
        timer = asyncio.ensure_future(self.sleep(self.timeout_s))
        try:
            await asyncio.wait((done, timer), return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return True
            log.warning("kvm did not acknowledge kick %d of ASID %d in time", seq, asid)
            return False
        finally:
            timer.cancel()
            self._pending.pop(seq, None)

    def acknowledge(self, seq: int) -> None:
        done = self._pending.get(seq)
        if done is None:
            raise NotFound(f"no kick {seq} is waiting for an acknowledgement")
        if not done.done():
            done.set_result(None)


class Violations:
    """The policy in force, what it makes of each violation, and the panic it may end in."""

    def __init__(
        self,
        table: RmpTable,
        counters: Counters,
        policy: Policy,
        notifier: Notifier,
        on_panic: Callable[[str], Awaitable[None]] | None,
    ) -> None:
        self.table = table
        self.counters = counters
        self.policy = policy
        self.notifier = notifier
        self.on_panic = on_panic
        self.panicked: str | None = None

    def set_policy(self, policy: Policy) -> Policy:
        """Put policy in force; returns the one it replaces."""
        previous, self.policy = self.policy, policy
        log.info(
            "RMP violation policy %s -> %s",
            previous.label,
            policy.label,
            extra={"event": "policy_changed"},
        )
        return previous

    async def violation(
        self,
        pfn: int,
        lo: int,
        origin: AccessOrigin,
        writer: str,
        asid: int,
        write: Callable[[], None],
    ) -> tuple[Outcome, list[str]]:
        """A host write hit assigned page pfn (effective entry lo): `write` completes it if
        the policy lets it through. Returns the outcome and the kernel's dump of the entry."""
        dump = dump_entry(self.table, pfn)
        outcome = await self._outcome(pfn, lo, origin)
        if outcome == Outcome.CONVERTED:
            write()
        self.counters.violations[
            (origin.name.lower(), self.policy.label, outcome.name.lower())
        ] += 1
        log.warning(
            "RMP violation: %s write by %s to PFN 0x%x under %s: %s",
            origin.name.lower(),
            writer or "unknown",
            pfn,
            self.policy.label,
            outcome.name.lower(),
            extra={"event": "rmp_violation", "rmp_dump": dump, "asid": asid},
        )
        if outcome == Outcome.PANIC:
            await self.panic(f"RMP violation by a kernel write to PFN 0x{pfn:x}", dump)
        return outcome, dump

    async def _outcome(self, pfn: int, lo: int, origin: AccessOrigin) -> Outcome:
        policy = self.policy
        if policy == Policy.SIGBUS:
            return Outcome.SIGBUS if origin == AccessOrigin.USER else Outcome.PANIC
        if policy == Policy.GMEM:
            # guest_memfd: private memory is never mapped into host userspace, so the user
            # access fails cleanly; a kernel RMP #PF is fatal.
            return Outcome.REFUSED if origin == AccessOrigin.USER else Outcome.PANIC
        asid = (lo & ASID_MASK) >> ASID_SHIFT
        if await self._convert_to_shared(pfn, lo):
            if policy == Policy.CONVERT_KILL and asid:
                await self.notifier.kick(asid, pfn, "guest memory converted by the host", True)
            return Outcome.CONVERTED
        return Outcome.SIGBUS if origin == AccessOrigin.USER else Outcome.PANIC

    async def _convert_to_shared(self, pfn: int, lo: int) -> bool:
        """RMPUPDATE the page to shared, kicking the guest's vCPUs where they are in the way."""
        if lo & IMMUTABLE:
            return False  # firmware-owned: only the firmware can release it
        asid = (lo & ASID_MASK) >> ASID_SHIFT
        a = pfn & ALIGN_MASK
        for _ in range(CONVERT_RETRIES):
            lo = self.table.effective(pfn)[0]
            if not lo & ASSIGNED:
                return True
            # A running vCPU's VMSA page cannot be converted: kick its vCPUs first.
            if lo & VMSA and asid and not await self._kick(asid, pfn, "convert a VMSA page"):
                return False
            if lo & PAGESIZE:
                code = self.table.psmash(a)
                self.counters.count("psmash", int(code))
                if code == Code.FAIL_INUSE:
                    await self._kick(asid, pfn, "PSMASH in use")
                    continue
            code = self.table.rmpupdate(
                pfn, gpa=0, assigned=False, size_2m=False, immutable=False, asid=0
            )
            self.counters.count("rmpupdate", int(code))
            if code == Code.SUCCESS:
                return True
            if code != Code.FAIL_INUSE:
                return False
            # Lost to a concurrent RMPADJUST/PVALIDATE: kicking the vCPUs ends the race.
            await self._kick(asid, pfn, "RMPUPDATE in use")
        return False

    async def _kick(self, asid: int, pfn: int, reason: str) -> bool:
        acked = await self.notifier.kick(asid, pfn, reason, False)
        if acked:
            self.table.release_locks(asid)
        return acked

    async def panic(self, reason: str, dump: list[str]) -> None:
        if self.panicked is not None:
            return
        self.panicked = reason
        self.counters.panics += 1
        log.critical(
            "Kernel panic - not syncing: %s",
            reason,
            extra={"event": "host_panic", "rmp_dump": dump},
        )
        if self.on_panic is not None:
            await self.on_panic(reason)
