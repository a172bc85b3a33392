"""A host reboot, as the services that keep state about memory see it.

rmp is the machine itself: its restart wipes memory and the RMP (rmp.proto
GetPlatformInfoResponse.boot_id is new each time). psp's firmware state, kvm's VMs and netd's
devices all name frames of the memory that is gone, so after a reboot none of them is true;
on a real host they go down with the machine. A service that follows the host polls rmp's boot
id and, when it changes, stops with EXIT_HOST_REBOOTED, so that whatever restarts it (the
launcher, compose's restart policy, Kubernetes) starts it afresh on the new host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from snp.rmp.v1 import rmp_pb2

from snpemu.errors import SnpemuError
from snpemu.runtime.peers import rmp_peer

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: try again (a restart on the new host will do)
EXIT_HOST_REBOOTED = 75
POLL_S = 1.0


async def follow_host(
    rmp_address: str,
    credential: str | None,
    rebooted: Callable[[], None],
    interval: float = POLL_S,
    booted: Callable[[str], None] = lambda _boot: None,
) -> None:
    """Call `rebooted` once rmp answers with another boot id than the first it answered
    (which `booted` is told)."""
    peer = rmp_peer(rmp_address, credential)
    first = ""
    try:
        while True:
            try:
                stub = peer.ensure()
                info = await peer.invoke(
                    stub.GetPlatformInfo, rmp_pb2.GetPlatformInfoRequest(), timeout=5
                )
            except SnpemuError:
                info = None  # rmp down or starting: its next answer says which host this is
            except Exception:  # a bug: said once as a JSON line; the watch goes on
                log.exception("asking rmp for its boot id failed", extra={"event": "epoch_bug"})
                info = None
            if info is not None and info.boot_id:
                if not first:
                    first = info.boot_id
                    booted(first)
                elif info.boot_id != first:
                    log.error(
                        "rmp restarted (boot %s, was %s): the host rebooted; stopping to start "
                        "again on the new host",
                        info.boot_id[:8],
                        first[:8],
                        extra={"event": "host_rebooted"},
                    )
                    rebooted()
                    return
            await asyncio.sleep(max(interval, 0.05))
    finally:
        await peer.close()
