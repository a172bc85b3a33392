"""kvm/undo.py: the steps of a failed block run newest first, all of them, and the block's own
error is what the caller sees; a committed block undoes nothing."""

from __future__ import annotations

import pytest
from snpemu.errors import Unavailable
from snpemu.kvm.undo import Undo


async def test_undo_runs_newest_first_goes_on_past_a_failing_step_and_keeps_the_error() -> None:
    ran: list[str] = []

    async def step(name: str, fail: bool = False) -> None:
        ran.append(name)
        if fail:
            raise Unavailable(f"{name} failed")

    with pytest.raises(KeyError, match="the error"):
        async with Undo() as undo:
            undo.push("a", lambda: step("a"))
            undo.push("b", lambda: step("b", fail=True))
            undo.push("c", lambda: step("c"))
            raise KeyError("the error")
    assert ran == ["c", "b", "a"]

    ran.clear()
    async with Undo() as undo:
        undo.push("a", lambda: step("a"))
        undo.commit()
    assert ran == []
