"""Which processes make up a virtual host, with their commands and environment.

A pure function of the host layout (`.env`), shared by the launcher and the test that holds
docker-compose.yml to the same services, ports and commands.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snpemu.hostconfig import HOST_COMPONENTS, Endpoint, HostConfig
from snpemu.runtime.credentials import vmm_credential

# gRPC service each component serves (the health check asks for it by name).
SERVICE_NAMES = {
    "rmp": "snp.rmp.v1.RmpService",
    "psp": "snp.psp.v1.PspService",
    "kvm": "snp.kvm.v1.KvmService",
    "netd": "snp.netd.v1.NetdService",
    "guest": "snp.guest.v1.GuestService",
}


def service_name_of(instance: str) -> str:
    """The gRPC service an instance serves: "guest-1" -> snp.guest.v1.GuestService."""
    return SERVICE_NAMES[instance.split("-", 1)[0]]


@dataclass(frozen=True)
class ProcessSpec:
    endpoint: Endpoint
    argv: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def component(self) -> str:
        return self.endpoint.module.rsplit(".", 1)[-1]

    @property
    def service_name(self) -> str:
        return SERVICE_NAMES[self.component]

    @property
    def is_host_side(self) -> bool:
        return self.component in HOST_COMPONENTS


def service_command(module: str, python: str = sys.executable) -> tuple[str, ...]:
    return (python, "-m", module)


def plan(
    config: HostConfig,
    *,
    state_dir: Path,
    host_credential: str,
    owner_credentials: Mapping[str, str] | None = None,
    bind: str = "127.0.0.1",
    python: str = sys.executable,
) -> list[ProcessSpec]:
    """Processes in start order: host components, then guest agents. Each guest agent gets
    its own VMM credential (derived from the host credential, runtime/credentials.py) and its
    owner's credential from `owner_credentials`; no host service holds either."""
    owners = owner_credentials or {}
    peers = {
        f"SNPEMU_{c.upper()}_ADDR": f"{bind}:{config.endpoint(c).grpc_port}"
        for c in HOST_COMPONENTS
    }
    specs = []
    for e in config.endpoints:
        env = {
            "SNPEMU_BIND": bind,
            "SNPEMU_GRPC_PORT": str(e.grpc_port),
            "SNPEMU_METRICS_PORT": str(e.metrics_port),
            "SNPEMU_INSTANCE": e.name,
            "SNPEMU_DATA_DIR": str(state_dir / "data" / e.name),
            **peers,
        }
        component = e.module.rsplit(".", 1)[-1]
        if component == "psp":
            env["SNPEMU_KDS_PORT"] = str(config.kds_port)
        if component in HOST_COMPONENTS:
            # Host-only RPCs require the launcher's credential (docs/design.md#host-credential);
            # guest agents never get it.
            env["SNPEMU_HOST_CREDENTIAL"] = host_credential
        else:
            # its VMM side creates, launches and holds its own VM with this one
            env["SNPEMU_VMM_CREDENTIAL"] = vmm_credential(host_credential, e.name)
            if e.name in owners:
                env["SNPEMU_OWNER_CREDENTIAL"] = owners[e.name]
        specs.append(ProcessSpec(e, service_command(e.module, python), env))
    return specs
