"""kvm following its firmware: a psp that restarted is a firmware reset.

The CCP driver knows of a reset because it does the reset itself (SEV_FACTORY_RESET,
DOWNLOAD_FIRMWARE) and then brings the platform up again: KERNEL: drivers/crypto/ccp/sev-dev.c
sev_ioctl_do_reset() leaves the platform UNINIT, and the next command that needs it initialises
it again (sev_ioctl_do_pek_pdh_gen(), and arch/x86/kvm/svm/sev.c sev_guest_init(), call
__sev_platform_init_locked() / sev_platform_init() while the state is UNINIT). Here
psp restarts on its own, so kvm asks the firmware for its state (SEV PLATFORM_STATUS, cheap)
every `interval` seconds: the legacy SEV state kvm's bring-up left INIT reads UNINIT after a
reset. UNVERIFIED(firmware-reset-poll): unlike a real host, which learns of its reset
synchronously, kvm notices it up to one interval late.

A reset loses every guest context, so the VMs on it can never run again: each is terminated
with TERM_HOST_FIRMWARE_RESET and its pages taken back as at destroy (teardown.release()); the
VM stays, TERMINATED, until its VMM destroys it, as a VM fd outlives its guest. While the
firmware is unreachable or being brought up again kvm is NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from snpemu.abi.platform_status import PlatformState
from snpemu.errors import SnpemuError, Unavailable
from snpemu.kvm import bringup, teardown
from snpemu.kvm.exits.vcpus import TERM_SET_HOST
from snpemu.kvm.tmr_record import TmrRecord
from snpemu.kvm.vm import VmState

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)

# The termination reason of a VM whose guest context a firmware reset lost (set 0xF, kvm's own
# like TERM_HOST_CONVERTED; the guest agent reads it to know its VM is gone for good).
TERM_HOST_FIRMWARE_RESET = 2
FIRMWARE_POLL_S = 0.5

SetHealth = Callable[[bool], Awaitable[None]]


async def firmware_was_reset(kvm: Kvm) -> bool:
    """True when the firmware has forgotten the bring-up (its SEV state is UNINIT again).
    Raises Unavailable when psp cannot be reached."""
    status = await kvm.psp.platform_status()
    return status.state == PlatformState.UNINIT


async def terminate_lost_vms(kvm: Kvm) -> int:
    """Every VM of the lost firmware terminated and its pages taken back; returns the pages
    leaked. A VM already released (an earlier, interrupted recovery) is skipped."""
    leaked = 0
    for vm in list(kvm.vms.values()):
        if teardown.is_released(vm):
            continue
        async with vm.lock:  # after the ioctl under way on it, if any
            if kvm.vms.get(vm.vm_id) is not vm or teardown.is_released(vm):
                continue
            was = vm.state
            vm.state = VmState.TERMINATED  # its exits are refused from here on
            leaked += await teardown.release(kvm, vm)
        if was != VmState.TERMINATED:
            # the reason last: a VMM that reads it destroys the VM, which must not race the
            # release of its pages
            vm.term_reason = (TERM_SET_HOST, TERM_HOST_FIRMWARE_RESET)
        log.warning(
            "%s terminated: the firmware was reset",
            vm.vm_id,
            extra={"event": "vm_terminated", "vm": vm.vm_id},
        )
    return leaked


async def recover(kvm: Kvm, tmr_record: TmrRecord | None = None) -> None:
    """The bring-up again on a reset firmware, the old VMs terminated in between (their pages
    need SNP up to be reclaimed, and must be back before the new TMR is taken)."""
    kvm.snp_enabled = False
    await bringup.bring_up(kvm, tmr_record=tmr_record, after_snp_init=terminate_lost_vms)
    if not kvm.snp_enabled:
        raise Unavailable("the bring-up after the firmware reset left SNP off")


async def follow_firmware(
    kvm: Kvm,
    set_health: SetHealth,
    *,
    tmr_record: TmrRecord | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    interval: float = FIRMWARE_POLL_S,
) -> None:
    """Runs until cancelled; only on a host whose SNP came up."""
    serving = True
    pending = False  # a recovery that failed part-way: retried whatever the state reads

    async def health(now: bool) -> None:
        nonlocal serving
        if now != serving:
            serving = now
            await set_health(now)

    while True:
        await sleep(interval)
        try:
            if pending or await firmware_was_reset(kvm):
                log.warning(
                    "the firmware was reset: SNP bring-up again", extra={"event": "fw_reset"}
                )
                pending = True
                await health(False)
                await recover(kvm, tmr_record)
                pending = False
                log.info("SNP back after the firmware reset", extra={"event": "fw_recovered"})
        except asyncio.CancelledError:
            raise
        except Unavailable as e:
            if serving:
                log.warning("the firmware is unreachable: %s", e.message)
            await health(False)
            continue
        except SnpemuError as e:  # a refused step of the bring-up: the next poll retries it
            log.error("recovery from the firmware reset failed: %s", e.message)
            await health(False)
            continue
        except Exception:  # a bug: said once as a JSON line; the watch goes on, NOT_SERVING
            log.exception("following the firmware failed", extra={"event": "fw_watch_bug"})
            await health(False)
            continue
        await health(True)
