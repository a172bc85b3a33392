"""The `rmp` service: the RMP table, host MMU and memory encryption engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from snp.rmp.v1.rmp_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

if TYPE_CHECKING:
    from snpemu.runtime.server import ServiceRuntime

_SERVICE = _FILE.services_by_name["RmpService"]


def _make_impl(runtime: ServiceRuntime) -> object:
    from snpemu.rmp.machine import RmpMachine
    from snpemu.rmp.metrics import RmpCollector
    from snpemu.rmp.servicer import RmpServicer, set_not_serving
    from snpemu.rmp.violations import KickHub

    opts = runtime.options

    async def on_panic(_reason: str) -> None:
        # A panicked host stops serving: health says so until rmp restarts (a reboot).
        await set_not_serving(runtime.health, _SERVICE.full_name)

    hub = KickHub(opts.kick_timeout_s, opts.sleep)
    machine = RmpMachine(
        opts.memory_bytes,
        iommu=opts.iommu,
        policy=opts.policy,
        hold_s=opts.hold_s,
        map_leak_s=opts.map_leak_s,
        clock=opts.clock,
        notifier=hub,
        on_panic=on_panic,
    )
    runtime.registry.register(RmpCollector(machine))
    return RmpServicer(machine, hub)


def _options(env: Mapping[str, str]) -> object:
    from snpemu.rmp.options import RmpOptions

    return RmpOptions.from_env(env)


def _host_only(name: str) -> bool:
    from snpemu.rmp.servicer import GUEST_RPCS

    return name not in GUEST_RPCS


SPEC = ServiceSpec(
    name="rmp", descriptor=_SERVICE, make_impl=_make_impl, options=_options, host_only=_host_only
)
