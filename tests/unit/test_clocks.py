"""The throttles, holds and timeouts of kvm and rmp on a clock the test drives: no real time
passes and nothing depends on how fast the machine is.

The expected values are the rules as stated, worked out by hand here:
- the guest-request throttle is a token bucket of `burst` tokens refilled at one token per
  `interval_ms` (kvm/throttle.py's contract, from "kvm: sev: Add SNP guest request throttling");
- an instruction hold keeps the entry busy for `hold_s` seconds after the instruction, and ends
  when the clock reaches that time;
- a host map is stale once it has been held for more than `map_leak_s` seconds;
- a kick that kvm does not acknowledge within the timeout is given up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2
from snpemu.abi.rmp import Code
from snpemu.kvm.machine import Kvm
from snpemu.kvm.servicer import KvmServicer
from snpemu.kvm.throttle import Throttle
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.violations import KickHub

from tests.conftest import FakeClock

# --- the guest-request throttle --------------------------------------------------------------


def test_throttle_allows_the_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    t = Throttle(interval_ms=1000, burst=3, clock=clock)
    assert [t.allow() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.875)  # not yet a whole interval: no new token
    assert not t.allow()
    clock.advance(0.125)  # one interval since the burst: one token (binary fractions: exact)
    assert [t.allow(), t.allow()] == [True, False]
    clock.advance(10.0)  # a long pause refills to the burst, never beyond it
    assert [t.allow() for _ in range(4)] == [True, True, True, False]


def test_throttle_off_never_refuses_and_never_reads_the_clock() -> None:
    reads = []

    def clock() -> float:
        reads.append(1)
        return 0.0

    t = Throttle(interval_ms=0, burst=1, clock=clock)
    reads.clear()  # the constructor's read
    assert all(t.allow() for _ in range(100))
    assert reads == []


def test_throttle_standing_clock_refuses_after_the_burst() -> None:
    clock = FakeClock()
    t = Throttle(interval_ms=10_000, burst=1, clock=clock)
    assert t.allow()
    assert not any(t.allow() for _ in range(50))


class NoPeer:
    """kvm's rmp/psp peers: never reached by these tests."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a peer was used: {name}")


async def test_kvm_hands_its_clock_to_every_throttle_it_makes() -> None:
    """Kvm(clock=...) is the clock of the default throttle and of SetGuestRequestThrottle's."""
    clock = FakeClock()
    kvm = Kvm(NoPeer(), NoPeer(), throttle_ms=1000, throttle_burst=1, clock=clock)  # type: ignore[arg-type]
    assert kvm.clock is clock
    servicer = KvmServicer(kvm)

    class FakeVm:
        vm_id = "vm-x"
        throttle = Throttle()
        token = b"t" * 32
        owner = ""

    vm = FakeVm()
    kvm.vms[vm.vm_id] = vm  # type: ignore[assignment]
    request = kvm_pb2.SetGuestRequestThrottleRequest(
        vm=handles_pb2.VmHandle(id=vm.vm_id),
        throttle=kvm_pb2.GuestRequestThrottle(interval_ms=2000, burst=1),
    )
    await servicer.SetGuestRequestThrottle(request, None)
    t = vm.throttle
    assert t.clock is clock
    assert t.allow() and not t.allow()
    clock.advance(1.75)
    assert not t.allow()
    clock.advance(0.25)
    assert t.allow()


# --- rmp: instruction holds and host-map ages -------------------------------------------------

ASID = 5


def machine(clock: Callable[[], float], **kw: Any) -> RmpMachine:
    return RmpMachine(16 << 20, clock=clock, **kw)


def make_private(m: RmpMachine, pfn: int, gpa: int) -> None:
    code = m.table.rmpupdate(pfn, gpa=gpa, assigned=True, size_2m=False, immutable=False, asid=ASID)
    assert code == Code.SUCCESS


def to_shared(m: RmpMachine, pfn: int) -> int:
    return int(
        m.table.rmpupdate(pfn, gpa=0, assigned=False, size_2m=False, immutable=False, asid=0)
    )


def test_a_hold_lasts_exactly_hold_s_on_the_machine_clock() -> None:
    clock = FakeClock()
    m = machine(clock, hold_s=0.5)
    make_private(m, 7, 0x7000)
    code = m.table.pvalidate(7, gpa=0x7000, asid=ASID, vmpl=0, size_2m=False, validate=True)
    assert code == Code.SUCCESS
    assert m.table.busy(7) and not m.table.busy(8)
    clock.advance(0.375)
    assert to_shared(m, 7) == Code.FAIL_INUSE  # still held
    clock.advance(0.125)  # the hold ends when the clock reaches it (binary fractions: exact)
    assert not m.table.busy(7)
    assert to_shared(m, 7) == Code.SUCCESS


def test_no_hold_without_hold_s() -> None:
    clock = FakeClock()
    m = machine(clock)
    make_private(m, 3, 0x3000)
    m.table.pvalidate(3, gpa=0x3000, asid=ASID, vmpl=0, size_2m=False, validate=True)
    assert not m.table.busy(3) and to_shared(m, 3) == Code.SUCCESS


def test_a_host_map_goes_stale_after_map_leak_s() -> None:
    clock = FakeClock()
    m = machine(clock, map_leak_s=30.0)
    first = m.map_page(1, "netd")
    clock.advance(10.0)
    second = m.map_page(2, "kvm")
    clock.advance(20.0)  # first held exactly 30 s: not more than the threshold
    assert m.stale_maps() == []
    clock.advance(0.5)
    assert [x.map_id for x in m.stale_maps()] == [first.map_id]
    clock.advance(10.0)
    assert {x.map_id for x in m.stale_maps()} == {first.map_id, second.map_id}
    m.unmap_page(first.map_id)
    assert [x.map_id for x in m.stale_maps()] == [second.map_id]


# --- rmp: the kick acknowledgement timeout -----------------------------------------------------


class FakeTimer:
    """An injected sleep: each timer fires only when the test fires it."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.fire = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.started.append(seconds)
        await self.fire.wait()


async def until(cond: Callable[[], bool]) -> None:
    """Let the loop run until cond() holds (the tasks here need a few iterations only)."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_an_unacknowledged_kick_is_given_up_when_its_timer_fires() -> None:
    timer = FakeTimer()
    hub = KickHub(2.0, timer)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    hub.subscribers.append(queue)
    kick = asyncio.ensure_future(hub.kick(ASID, 9, "test", False))
    await until(lambda: bool(timer.started))
    assert timer.started == [2.0]  # the configured timeout
    note = queue.get_nowait()
    assert (note.asid, note.pfn, note.terminate) == (ASID, 9, False)
    for _ in range(50):  # however long the loop runs, the timer has not fired
        await asyncio.sleep(0)
    assert not kick.done()
    timer.fire.set()
    assert await kick is False
    assert hub._pending == {}  # nothing left waiting for an acknowledgement


async def test_an_acknowledged_kick_returns_before_its_timer() -> None:
    timer = FakeTimer()
    hub = KickHub(2.0, timer)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    hub.subscribers.append(queue)
    kick = asyncio.ensure_future(hub.kick(ASID, 9, "test", True))
    await until(lambda: not queue.empty())
    hub.acknowledge(queue.get_nowait().sequence)
    assert await kick is True
    assert not timer.fire.is_set() and hub._pending == {}


async def test_a_kick_with_nobody_subscribed_fails_at_once() -> None:
    timer = FakeTimer()
    assert await KickHub(2.0, timer).kick(ASID, 9, "test", False) is False
    assert timer.started == []


@pytest.mark.parametrize("seconds", [0.0, 2.0])
async def test_kick_timeout_is_the_timer_argument(seconds: float) -> None:
    timer = FakeTimer()
    hub = KickHub(seconds, timer)
    hub.subscribers.append(asyncio.Queue())
    kick = asyncio.ensure_future(hub.kick(ASID, 1, "test", False))
    await until(lambda: bool(timer.started))
    timer.fire.set()
    assert await kick is False
    assert timer.started == [seconds]
