"""kvm's tracepoints (kvm_vmgexit_enter, kvm_page_fault, ...) for StreamTraceEvents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snpemu.kvm.vm import Vm


@dataclass
class TraceEvent:
    name: str
    vm_id: str
    vcpu_id: int
    fields: dict[str, int]
    timestamp_ns: int = field(default_factory=time.time_ns)


class TraceHub:
    """kvm tracepoints: every subscriber gets every event (bounded queues, drops counted)."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[TraceEvent]] = []
        self.dropped = 0

    def emit(self, name: str, vm: Vm, vcpu_id: int, **fields: int) -> None:
        if not self.queues:
            return
        ev = TraceEvent(name, vm.vm_id, vcpu_id, fields)
        for q in self.queues:
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self.dropped += 1

    async def subscribe(self) -> AsyncIterator[TraceEvent]:
        q: asyncio.Queue[TraceEvent] = asyncio.Queue(maxsize=10000)
        self.queues.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.queues.remove(q)
