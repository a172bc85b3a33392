"""The `guest` service: the guest agent of one SNP VM (its guest kernel, and its VMM's launch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from snp.guest.v1.guest_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from snpemu.runtime.server import ServiceRuntime

log = logging.getLogger(__name__)
_SERVICE = _FILE.services_by_name["GuestService"]
# bounded label values of snp_guest_agent_packets_total, every one exported from the start
NET_RESULTS = {
    "sent": ("delivered", "converted", "no_route", "no_buffer", "refused", "bad_frame", "lost"),
    "received": ("ok", "rx_error", "vc", "bad_frame"),
}


class _Guest:
    def __init__(self, runtime: ServiceRuntime) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        from snpemu.guest.attestation import Attestation
        from snpemu.guest.driver import Driver
        from snpemu.guest.exits import BootState
        from snpemu.guest.kernel import GuestKernel
        from snpemu.guest.kvm_client import GrpcKvm
        from snpemu.guest.net_servicer import NetServicer
        from snpemu.guest.netd_client import GrpcNetd
        from snpemu.guest.network import Network
        from snpemu.guest.rmp_client import GrpcGuestRmp
        from snpemu.guest.servicer import GuestServicer
        from snpemu.guest.vm_keeper import VmKeeper
        from snpemu.kvm.machine import DEFAULT_FIRMWARE

        config, opts = runtime.config, runtime.options
        # guest-mode access needs no credential (the vCPU identity is checked); the VMM side
        # creates its VM with the VMM credential, never the host's
        self.rmp = GrpcGuestRmp.connect(config.peers["rmp"], None)
        self.kvm = GrpcKvm.connect(config.peers["kvm"], config.vmm_credential)
        # netd: the VMM's vhost-user connection and the guest's doorbells
        self.netd = GrpcNetd.connect(config.peers["netd"], config.vmm_credential)
        self.kernel = GuestKernel(
            config.instance,
            opts,
            exits=self.kvm,
            vmm=self.kvm,
            rmp=self.rmp,
            default_firmware=DEFAULT_FIRMWARE,
        )
        driver = Driver(self.kernel)
        self.net = Network(self.kernel, driver, self.netd)
        self.attestation = Attestation(self.kernel, driver)
        self.servicer = GuestServicer(self.kernel, self.attestation, self.net)
        self.net_servicer = NetServicer(self.net)
        self.boot_task: asyncio.Task[None] | None = None
        # NOT_SERVING while it recovers from a peer's crash
        self.set_health = runtime.set_serving
        self.keeper = VmKeeper(self.kernel, driver, self.net, self.set_health)
        kernel, attestation, net = self.kernel, self.attestation, self.net

        class AgentCollector(Collector):
            def collect(self) -> Iterator[Metric]:
                reqs = CounterMetricFamily(
                    "snp_guest_agent_requests",
                    "Guest messages sent, by type and result.",
                    labels=["msg_type", "result"],
                )
                for t in ("report", "key"):
                    for r in ("success", "firmware_status", "error"):
                        reqs.add_metric([t, r], float(attestation.requests.get((t, r), 0)))
                yield reqs
                yield CounterMetricFamily(
                    "snp_guest_agent_vc",
                    "#VC exceptions the guest took.",
                    value=float(kernel.event_counts.get("vc", 0)),
                )
                yield CounterMetricFamily(
                    "snp_guest_agent_boots",
                    "Boots completed.",
                    value=float(kernel.event_counts.get("boot", 0)),
                )
                packets = CounterMetricFamily(
                    "snp_guest_agent_packets",
                    "Network packets by direction and what became of them.",
                    labels=["direction", "result"],
                )
                dev = net.dev
                for direction, results in NET_RESULTS.items():
                    seen = getattr(dev.stats, direction) if dev is not None else {}
                    for r in results:
                        packets.add_metric([direction, r], float(seen.get(r, 0)))
                yield packets
                state = GaugeMetricFamily(
                    "snp_guest_agent_state", "1 for the guest's state.", labels=["state"]
                )
                for s in BootState:
                    state.add_metric([s.name.lower()], 1.0 if kernel.state == s else 0.0)
                yield state

        runtime.registry.register(AgentCollector())


async def _startup(impl: _Guest) -> None:
    if impl.kernel.opts.boot:
        # SERVING at once; the boot shows in GetStatus (launching, booting, running), and a
        # VM lost later makes the agent NOT_SERVING until a new one runs (guest/vm_keeper.py)
        impl.boot_task = asyncio.ensure_future(impl.keeper.run())


async def _shutdown(impl: _Guest) -> None:
    if impl.boot_task is not None:
        impl.boot_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await impl.boot_task
    k = impl.kernel
    if k.vm is not None:  # the VMM exits: its VM goes
        with contextlib.suppress(Exception):
            await k.vmm.destroy_vm(k.vm)
    if impl.net.dev is not None:
        await impl.net.dev.close()
    await impl.netd.close()
    if k.hold is not None:
        k.hold.cancel()
    await impl.kvm.close()
    await impl.rmp.close()


def _options(env: Mapping[str, str]) -> object:
    from snpemu.guest.options import GuestOptions

    return GuestOptions.from_env(env)


SPEC: ServiceSpec[_Guest] = ServiceSpec(
    name="guest",
    descriptor=_SERVICE,
    make_impl=_Guest,
    servicers=lambda impl: (impl.net_servicer, impl.servicer),
    options=_options,
    startup=_startup,
    shutdown=_shutdown,
    host_only=lambda _name: False,
)
