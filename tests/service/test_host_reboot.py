"""A host reboot (rmp restarted: memory and the RMP start over) is followed by every service
that keeps state about memory: it notices rmp's new boot id and stops to start afresh
(runtime/host_epoch.py), as psp, kvm and netd do under compose and Kubernetes, whose restart
policies then start them on the new host."""

from __future__ import annotations

import asyncio
from pathlib import Path

from snpemu import netd, rmp
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime, ServiceSpec

CRED = "reboot-credential-0123456789"


def _rmp(tmp: Path, port: int = 0) -> ServiceRuntime:
    env = {
        "SNPEMU_GRPC_PORT": str(port),
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_HOST_CREDENTIAL": CRED,
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
        "SNPEMU_DATA_DIR": str(tmp / "rmp"),
    }
    return ServiceRuntime(
        rmp.SPEC, ServiceConfig.from_env("rmp", env), rmp.SPEC.options({"SNPEMU_RMP_MEMORY": "64M"})
    )


async def _until(check: object, seconds: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.02)


async def test_a_service_that_follows_the_host_stops_when_rmp_restarts(tmp_path: Path) -> None:
    first = _rmp(tmp_path)
    await first.start()
    port = first.grpc_port
    spec = ServiceSpec(name="netd", descriptor=netd.SPEC.descriptor, follows_host=True)
    env = {
        "SNPEMU_GRPC_PORT": "0",
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_HOST_CREDENTIAL": CRED,
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
        "SNPEMU_RMP_ADDR": first.address,
        "SNPEMU_HOST_POLL_S": "0.05",
        "SNPEMU_DATA_DIR": str(tmp_path / "follower"),
    }
    follower = ServiceRuntime(spec, ServiceConfig.from_env("netd", env))
    await follower.start()
    second: ServiceRuntime | None = None
    try:
        await _until(lambda: follower.host_boot)
        # rmp down for a while (the follower keeps asking), then a new boot on the same port
        await first.stop()
        await asyncio.sleep(0.2)
        assert not follower.host_rebooted.is_set()  # rmp gone is not rmp rebooted
        second = _rmp(tmp_path, port)
        await second.start()
        await _until(follower.host_rebooted.is_set)
    finally:
        await follower.stop()
        if second is not None:
            await second.stop()
