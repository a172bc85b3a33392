"""The AMD-SP firmware the servicer drives: one object, its commands grouped by concern.

    mailbox.py        the state, the serial `command()` mailbox and the checks all commands share
    platform.py       SNP_INIT/INIT_EX, DF_FLUSH, SHUTDOWN, PLATFORM_STATUS, CONFIG, COMMIT, ...
    launch.py         GCTX_CREATE, LAUNCH_*, ACTIVATE, DECOMMISSION, PAGE_RECLAIM/UNSMASH, DBG_*
    guest_request.py  SNP_GUEST_REQUEST, where the report and the derived key are assembled

SPEC: SNP ABI (56860); KERNEL: drivers/crypto/ccp/sev-dev.c, arch/x86/kvm/svm/sev.c for how the
host drives each command.
"""

from __future__ import annotations

from snpemu.psp.guest_request import GuestRequestCommands
from snpemu.psp.launch import LaunchCommands
from snpemu.psp.platform import PlatformCommands

__all__ = ["Firmware"]


class Firmware(PlatformCommands, LaunchCommands, GuestRequestCommands):
    """Every firmware command over one Mailbox state (the mixins add no state of their own)."""
