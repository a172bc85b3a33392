"""The `netd` service: the host-wide device daemon."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from snp.netd.v1.netd_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

if TYPE_CHECKING:
    from snpemu.runtime.server import ServiceRuntime

log = logging.getLogger(__name__)
_SERVICE = _FILE.services_by_name["NetdService"]


def count_start(data_dir: Path) -> int:
    """Starts before this one with this data directory: a restarted daemon knows it was."""
    path = data_dir / "starts"
    try:
        before = int(path.read_text())
    except (OSError, ValueError):
        before = 0
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(before + 1))
        tmp.replace(path)
    except OSError as e:
        log.warning(
            "cannot count starts in %s (%s): snp_netd_restarts_total stays 0",
            data_dir,
            e,
            extra={"event": "restart_count_unavailable"},
        )
    return before


class _Netd:
    def __init__(self, runtime: ServiceRuntime) -> None:
        from snp.kvm.v1 import kvm_pb2_grpc
        from snp.rmp.v1 import rmp_pb2_grpc

        from snpemu.netd.daemon import NetDaemon
        from snpemu.netd.kvm_client import KvmVmm
        from snpemu.netd.metrics import register
        from snpemu.netd.rmp_client import RmpMemory
        from snpemu.netd.servicer import NetdServicer
        from snpemu.runtime.peers import Peer

        config, opts = runtime.config, runtime.options
        cred = config.host_credential
        self.rmp = Peer("rmp", config.peers["rmp"], cred, rmp_pb2_grpc.RmpServiceStub)
        self.kvm = Peer("kvm", config.peers["kvm"], cred, kvm_pb2_grpc.KvmServiceStub)
        daemon = NetDaemon(
            RmpMemory(self.rmp),
            KvmVmm(self.kvm),
            copy_chunk=opts.copy_chunk,
            copy_delay_s=opts.copy_delay_s,
        )
        restarts = count_start(config.data_dir)
        register(daemon, restarts, runtime.registry)
        self.servicer = NetdServicer(daemon, restarts)


async def _shutdown(impl: _Netd) -> None:
    await impl.rmp.close()
    await impl.kvm.close()


def _options(env: Mapping[str, str]) -> object:
    from snpemu.netd.options import NetdOptions

    return NetdOptions.from_env(env)


SPEC: ServiceSpec[_Netd] = ServiceSpec(
    name="netd",
    descriptor=_SERVICE,
    make_impl=_Netd,
    servicers=lambda impl: (impl.servicer,),
    options=_options,
    shutdown=_shutdown,
    # its devices are rings in guest memory, gone with a host reboot
    follows_host=True,
    # the guest's VMM attaches its device (the vhost-user socket) and its guest rings the
    # doorbell (ioeventfd); only the host lists every device
    vmm_rpcs=frozenset(
        {"RegisterDevice", "HoldDevice", "UnregisterDevice", "NotifyQueue", "GetDeviceStats"}
    ),
)
