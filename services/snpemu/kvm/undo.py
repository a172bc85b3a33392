"""Taking back what a failed operation acquired, newest first, in one place.

As QEMU's qmp client guards a session's set-up (python/qemu/qmp/protocol.py
`_session_guard`: on any failure, everything begun is torn down before the error goes on),
CreateVm and LaunchVm push an undo step for each resource right after acquiring it; if the
block fails, the steps run in reverse and the original error propagates. A step that fails
itself is logged and the others still run (what it held is then the log's to tell).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[object]]


class Undo:
    def __init__(self) -> None:
        self.steps: list[tuple[str, Step]] = []

    def push(self, what: str, step: Step) -> None:
        self.steps.append((what, step))

    def commit(self) -> None:
        """What was acquired stays: nothing is undone from here on."""
        self.steps.clear()

    async def rollback(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                await step()
            except Exception as e:  # the rest still runs; the caller sees the first error
                log.error("undoing %s failed: %s", what, e, extra={"event": "undo_failed"})

    async def __aenter__(self) -> Undo:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self.rollback()
