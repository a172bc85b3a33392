"""Following rmp's MMU notifications: kick (or terminate) an ASID's vCPUs, then acknowledge.

The stream is lost when rmp restarts or cannot be reached; kvm then subscribes again after a
delay that doubles from `first_delay` up to `max_delay`, and is back to `first_delay` once a
notification arrives. The sleep is injectable so that a test needs no real time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from snpemu.kvm.ports import RmpPort

log = logging.getLogger(__name__)

Kick = Callable[[int, bool, str], object]  # (asid, terminate, reason)


async def follow_kicks(
    rmp: RmpPort,
    kick: Kick,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    first_delay: float = 0.5,
    max_delay: float = 10.0,
) -> None:
    """Runs until cancelled."""
    delay = first_delay
    while True:
        try:
            async for note in rmp.mmu_notifications():
                kick(note.asid, note.terminate, note.reason)
                await rmp.acknowledge(note.sequence)
                delay = first_delay
        except asyncio.CancelledError:
            raise
        except Exception as e:  # rmp restarted or unreachable: resubscribe
            log.warning("MMU notification stream lost (%s); resubscribing", e)
        await sleep(delay)
        delay = min(delay * 2, max_delay)
