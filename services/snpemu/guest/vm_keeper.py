"""The agent as the VMM that keeps its guest running: it notices when its VM is gone and boots
a new one, with no manual step.

A VM is gone when kvm closed the VM fd (the HoldVm stream ended: kvm restarted and forgot every
VM), when kvm no longer knows it (GetVm NOT_FOUND: someone destroyed it), or when the firmware
was reset under it (kvm terminated it with TERM_HOST_FIRMWARE_RESET: its guest context, its
keys, are lost). A guest that terminated itself, or that the host terminated for a reason of the
guest's own (a converted private page), stays terminated, as on a real host.

While its VM is gone the agent is NOT_SERVING; it drops the lost VM's state (its VMPCKs and
sequence numbers included: the new VM has a new secrets page), boots again, retrying with a
delay that doubles up to a bound while the host is still recovering, and is SERVING once the
new VM runs. A network device it had is attached again to the new VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from snpemu.errors import SnpemuError, Unavailable
from snpemu.guest.driver import Driver
from snpemu.guest.exits import BootState
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.network import Network
from snpemu.kvm.exits.vcpus import TERM_SET_HOST
from snpemu.kvm.firmware_watch import TERM_HOST_FIRMWARE_RESET
from snpemu.runtime.peers import PeerError

log = logging.getLogger(__name__)

VM_POLL_S = 0.5
REBOOT_MAX_DELAY_S = 5.0

SetHealth = Callable[[bool], Awaitable[None]]


class VmKeeper:
    def __init__(
        self,
        kernel: GuestKernel,
        driver: Driver,
        net: Network,
        set_health: SetHealth,
        *,
        interval: float = VM_POLL_S,
    ) -> None:
        self.k, self.driver, self.net = kernel, driver, net
        self.set_health = set_health
        self.interval = interval
        self.reboots = 0

    async def run(self) -> None:
        """Runs until cancelled, from the first boot on (a first boot that fails is the
        guest's failure, reported in its state, and not retried)."""
        if not await self._boot_once(first=True):
            return
        while True:
            try:
                why = await self.gone()
                await self.reboot(why)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: said once as a JSON line, then the watch goes on
                log.exception("keeping the VM failed", extra={"event": "vm_keeper_bug"})
                await asyncio.sleep(self.interval)

    async def gone(self) -> str:
        """Until the running VM is gone; says why."""
        k = self.k
        assert k.vm is not None and k.hold is not None
        hold = asyncio.ensure_future(k.hold.wait())
        try:
            while True:
                done, _ = await asyncio.wait({hold}, timeout=self.interval)
                if done:
                    return "kvm closed the VM (its hold ended)"
                why = await self._vm_lost()
                if why:
                    return why
        finally:
            hold.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await hold

    async def _vm_lost(self) -> str:
        k = self.k
        assert k.vm is not None
        try:
            st = await k.vmm.get_vm(k.vm)
        except Unavailable:
            return ""  # kvm restarting: the hold tells
        except PeerError as e:
            return "kvm has no such VM" if e.code.name == "NOT_FOUND" else ""
        if (st.term_reason_set, st.term_reason_code) == (TERM_SET_HOST, TERM_HOST_FIRMWARE_RESET):
            return "the firmware was reset under it"
        return ""

    async def reboot(self, why: str) -> None:
        k = self.k
        await self.set_health(False)
        log.warning("the VM %s is gone (%s): booting a new one", k.vm.id if k.vm else "", why)
        k.event("vm_lost", detail=why)
        dev = self.net.dev
        device = (dev.mac, dev.layout.entries) if dev is not None else None
        if dev is not None:
            # the device lived in the lost VM's memory: dropped with its token, re-attached
            # on the new VM below
            with contextlib.suppress(Exception):
                await self.net.detach()
        # a request in flight on the lost VM ends (failing) before its state goes, so that
        # its VMPCK wipe cannot reach the new VM's keys
        async with self.driver.lock:
            await self._drop_vm()
        delay = self.interval
        while not await self._boot_once(first=False):
            await asyncio.sleep(delay)
            delay = min(delay * 2, REBOOT_MAX_DELAY_S)
        self.reboots += 1
        if device is not None:
            try:
                await self.net.attach(device[0], device[1], skip=False)
            except SnpemuError as e:
                log.warning("the network device did not come back: %s", e.message)
        await self.set_health(True)

    async def _boot_once(self, *, first: bool) -> bool:
        """One boot; True when the guest runs. A failed retry leaves nothing of its VM."""
        k = self.k
        try:
            await k.boot()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("boot failed: %s", e, extra={"event": "boot_failed"})
            k.state = BootState.TERMINATED
            k.event("terminated", detail=f"boot failed: {e}")
            if not first:
                await self._drop_vm()
            return False
        if k.state == BootState.RUNNING:
            return True
        if not first:
            await self._drop_vm()
        return False

    async def _drop_vm(self) -> None:
        """The VM destroyed if kvm still has it, its hold closed, its state forgotten."""
        k = self.k
        if k.vm is not None:
            with contextlib.suppress(Exception):
                await k.vmm.destroy_vm(k.vm)
        if k.hold is not None:
            k.hold.cancel()
        k.forget_vm()
