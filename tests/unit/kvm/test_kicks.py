"""kvm's following of rmp's MMU notifications (kvm/kicks.py): each kicks, then is
acknowledged; a lost stream is resubscribed after a delay that doubles up to a bound and
starts again once a notification arrives. The sleep is the test's: no real time passes."""

from __future__ import annotations

import asyncio

import pytest
from snpemu.abi.addr import Pfn
from snpemu.errors import Unavailable
from snpemu.kvm.kicks import follow_kicks
from snpemu.kvm.ports import MmuNotification

from tests.unit.kvm.fakes import FakeRmp, Faults


def note(seq: int, asid: int = 5, terminate: bool = False) -> MmuNotification:
    return MmuNotification(seq, asid, Pfn(0x100 + seq), "convert", terminate)


async def follow(
    rmp: FakeRmp, sleeps_before_stop: int
) -> tuple[list[tuple[int, bool, str]], list[float]]:
    kicks: list[tuple[int, bool, str]] = []
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == sleeps_before_stop:
            raise asyncio.CancelledError

    def kick(asid: int, terminate: bool, reason: str) -> None:
        kicks.append((asid, terminate, reason))

    with pytest.raises(asyncio.CancelledError):
        (await follow_kicks(rmp, kick, sleep=sleep, first_delay=0.5, max_delay=4.0))
    return kicks, slept


async def test_each_notification_kicks_then_is_acknowledged() -> None:
    rmp = FakeRmp(Faults())
    rmp.notes = [note(1), note(2, asid=7, terminate=True)]
    kicks, slept = await follow(rmp, 1)
    assert kicks == [(5, False, "convert"), (7, True, "convert")]
    assert rmp.acked == [1, 2] and slept == [0.5]


async def test_a_lost_stream_backs_off_doubling_to_the_bound_and_a_note_resets_it() -> None:
    rmp = FakeRmp(Faults())
    lost = Unavailable("rmp restarted")
    rmp.notes = [lost, lost, lost, lost, lost, note(1), lost]
    kicks, slept = await follow(rmp, 8)
    # five losses: 0.5, 1, 2, 4, 4; then a notification and a loss: 0.5 again; then an empty
    # stream (rmp answers, nothing to kick): the delay goes on doubling
    assert slept == [0.5, 1.0, 2.0, 4.0, 4.0, 0.5, 1.0, 2.0]
    assert kicks == [(5, False, "convert")] and rmp.acked == [1]
