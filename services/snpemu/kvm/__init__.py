"""The `kvm` service: KVM/SVM and the VMM's launch control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from snp.kvm.v1.kvm_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

if TYPE_CHECKING:
    from snpemu.runtime.server import ServiceRuntime

log = logging.getLogger(__name__)
_SERVICE = _FILE.services_by_name["KvmService"]
# Exits come from a guest's vCPUs (with their identity); everything else is host control.
GUEST_RPCS = frozenset({"VmgexitMsr", "Vmgexit", "NestedPageFault"})


class _Kvm:
    def __init__(self, runtime: ServiceRuntime) -> None:
        from snpemu.kvm.machine import Kvm
        from snpemu.kvm.metrics import register
        from snpemu.kvm.psp_client import GrpcPsp
        from snpemu.kvm.rmp_client import GrpcRmp
        from snpemu.kvm.servicer import KvmServicer
        from snpemu.kvm.tmr_record import TmrRecord
        from snpemu.runtime.peers import psp_peer, rmp_peer

        config, opts = runtime.config, runtime.options
        self.rmp = GrpcRmp(rmp_peer(config.peers["rmp"], config.host_credential))
        self.psp = GrpcPsp(psp_peer(config.peers["psp"], config.host_credential))
        self.kvm = Kvm(
            self.rmp,
            self.psp,
            snp=opts.snp,
            firmware=opts.firmware,
            throttle_ms=opts.throttle_ms,
            throttle_burst=opts.throttle_burst,
            clock=opts.clock,
            images=opts.images(),
        )
        register(self.kvm, runtime.registry)
        self.servicer = KvmServicer(self.kvm)
        self.kicks: asyncio.Task[None] | None = None
        self.firmware: asyncio.Task[None] | None = None
        self.wait_s = opts.peer_wait_s
        self.poll_s = opts.firmware_poll_s
        self.tmr_record = TmrRecord(config.data_dir / "tmr.json")
        # NOT_SERVING while it recovers from a peer's crash
        self.set_health = runtime.set_serving


async def _startup(impl: _Kvm) -> None:
    from snpemu.errors import SnpemuError, Unavailable
    from snpemu.kvm.bringup import bring_up
    from snpemu.kvm.firmware_watch import follow_firmware
    from snpemu.kvm.kicks import follow_kicks
    from snpemu.kvm.leftovers import sweep

    clock = impl.kvm.clock
    deadline = clock() + impl.wait_s
    while True:
        try:
            await bring_up(impl.kvm, tmr_record=impl.tmr_record)
            break
        except Unavailable as e:
            if clock() >= deadline:
                # kvm_amd loads with SNP off when the firmware cannot be reached.
                log.error(
                    "SNP unavailable: %s; kvm runs with SNP disabled",
                    e.message,
                    extra={"event": "snp_off"},
                )
                break
            log.info("waiting for rmp and psp: %s", e.message)
            await asyncio.sleep(0.5)
    if impl.kvm.snp_enabled:
        try:
            await sweep(impl.kvm)
        except SnpemuError as e:  # what is left stays as it was: serve anyway
            log.error("reading what a previous kvm left failed: %s", e.message)
    impl.kicks = asyncio.ensure_future(follow_kicks(impl.rmp, impl.servicer.exits.kick))
    if impl.kvm.snp_enabled and impl.poll_s > 0:
        impl.firmware = asyncio.ensure_future(
            follow_firmware(
                impl.kvm, impl.set_health, tmr_record=impl.tmr_record, interval=impl.poll_s
            )
        )


async def _shutdown(impl: _Kvm) -> None:
    for task in (impl.kicks, impl.firmware):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await impl.rmp.close()
    await impl.psp.close()


def _options(env: Mapping[str, str]) -> object:
    from snpemu.kvm.options import KvmOptions

    return KvmOptions.from_env(env)


SPEC: ServiceSpec[_Kvm] = ServiceSpec(
    name="kvm",
    descriptor=_SERVICE,
    make_impl=_Kvm,
    servicers=lambda impl: (impl.servicer,),
    options=_options,
    startup=_startup,
    shutdown=_shutdown,
    host_only=lambda name: name not in GUEST_RPCS,
    # what QEMU asks of KVM for its own VM; the guest agent plays QEMU for its VM
    vmm_rpcs=frozenset(
        {
            "CreateVm",
            "LaunchVm",
            "GetVm",
            "DestroyVm",
            "HoldVm",
            "SetGuestRequestThrottle",
            "SnpInit2",
            "CreateGuestMemfd",
            "SetMemoryRegion",
            "SetMemoryAttributes",
            "SnpLaunchStart",
            "SnpLaunchUpdate",
            "SnpLaunchFinish",
            "CreateVcpu",
            "EnableCap",
            "RunVcpu",
        }
    ),
    # its VMs live in the host's memory, gone with a host reboot
    follows_host=True,
    # a VM's firmware and kernel may come as bytes (kvm/images.py); larger images go by path
    # from the image directory
    request_limits={"CreateVm": 32 * 1024 * 1024, "SnpLaunchUpdate": 32 * 1024 * 1024},
)
