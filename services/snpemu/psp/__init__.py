"""The `psp` service: the AMD Secure Processor firmware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from snp.psp.v1.psp_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

if TYPE_CHECKING:
    from snpemu.runtime.server import ServiceRuntime

_SERVICE = _FILE.services_by_name["PspService"]


class _Psp:
    """The servicer plus what lives beside it (the KDS endpoint, the rmp channel)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        from snpemu.psp.firmware import Firmware
        from snpemu.psp.identity import ChipIdentity
        from snpemu.psp.kds import KdsServer
        from snpemu.psp.metrics import register
        from snpemu.psp.rmp_client import GrpcRmp
        from snpemu.psp.servicer import PspServicer

        config, opts = runtime.config, runtime.options
        identity = ChipIdentity.load_or_create(config.data_dir, opts.product, opts.stepping)
        self.rmp = GrpcRmp(config.peers["rmp"], config.host_credential)
        self.fw = Firmware(identity, self.rmp, opts.topology)
        register(self.fw, runtime.registry)
        self.servicer = PspServicer(self.fw)
        self.kds = KdsServer(identity, config.bind, opts.kds_port)


async def _startup(impl: _Psp) -> None:
    from snpemu.runtime.server import StartupError

    try:
        impl.kds.start()
    except OSError as e:
        raise StartupError(
            f"cannot listen for the KDS endpoint on port {impl.kds.requested_port}: {e}"
        ) from e


async def _shutdown(impl: _Psp) -> None:
    impl.kds.stop()
    await impl.rmp.close()


def _options(env: Mapping[str, str]) -> object:
    from snpemu.psp.options import PspOptions

    return PspOptions.from_env(env)


SPEC: ServiceSpec[_Psp] = ServiceSpec(
    name="psp",
    descriptor=_SERVICE,
    make_impl=_Psp,
    servicers=lambda impl: (impl.servicer,),
    options=_options,
    startup=_startup,
    shutdown=_shutdown,
    # the firmware's pages are the host's memory: a host reboot resets it
    follows_host=True,
)
