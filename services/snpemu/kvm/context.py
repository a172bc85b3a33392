"""A VM's guest context: its page, SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE, all taken
back if the firmware refuses any. KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start(),
snp_context_create(), snp_bind_asid() (e_free_context)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from snpemu.kvm.pages import firmware_page, release_firmware_pages
from snpemu.kvm.teardown import decommission
from snpemu.kvm.undo import Undo
from snpemu.kvm.vm import Vm
from snpemu.runtime.peers import PeerError

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm


class ContextFailed(Exception):
    """SNP_GCTX_CREATE refused (KVM answers it with -ENOTTY, not -EIO)."""

    def __init__(self, cause: PeerError) -> None:
        super().__init__(cause.message)
        self.cause = cause


async def launch_start(kvm: Kvm, vm: Vm, policy: int, gosvw: bytes) -> None:
    owner = f"context of {vm.vm_id}"
    async with Undo() as undo:
        gctx = await firmware_page(kvm.rmp, kvm.psp, owner)
        undo.push(
            "the context page",
            functools.partial(release_firmware_pages, kvm.rmp, kvm.psp, [gctx], owner),
        )
        try:
            await kvm.psp.gctx_create(gctx)
        except PeerError as e:
            if e.fw_status is None:
                raise
            raise ContextFailed(e) from e
        undo.push("the guest context", functools.partial(decommission, kvm, gctx))
        await kvm.psp.launch_start(gctx, policy, gosvw)
        await kvm.psp.activate(gctx, vm.asid)
        undo.commit()
    vm.gctx = gctx
