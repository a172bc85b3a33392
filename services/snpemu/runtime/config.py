"""Configuration of one service process, from environment variables, checked at start.

SNPEMU_BIND              address the gRPC and metrics servers bind (127.0.0.1)
SNPEMU_GRPC_PORT         gRPC port, 0 = any free port (default: this service's port in .env)
SNPEMU_METRICS_PORT      Prometheus /metrics port, 0 = any (default: from .env)
SNPEMU_INSTANCE          instance name for logs, e.g. guest-0 (default: the service name)
SNPEMU_LOG_LEVEL         DEBUG, INFO, WARNING or ERROR (INFO)
SNPEMU_SHUTDOWN_GRACE_S  seconds in-flight RPCs get after SIGTERM (5)
SNPEMU_<PEER>_ADDR       host:port of rmp, psp, kvm, netd (127.0.0.1:<its port in .env>)
SNPEMU_HOST_CREDENTIAL   secret shared by host services, made by the launcher (unset)
SNPEMU_VMM_CREDENTIAL    a guest agent's own VMM credential (runtime/credentials.py; unset)
SNPEMU_OWNER_CREDENTIAL  a guest agent's owner credential: its API requires it (unset: open)
SNPEMU_CREDENTIALS_DIR   where <instance>.vmm-credential and .owner-credential are read from
                         when the two above are unset (a mounted Kubernetes Secret)
SNPEMU_HOST_POLL_S       seconds between asking rmp for its boot id, psp/kvm/netd (1)
SNPEMU_DATA_DIR          persistent state, e.g. psp's identity (./.snpemu/data/<instance>)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snpemu.hostconfig import HOST_COMPONENTS, ConfigError, layered_env, number, port

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name}={raw!r}: expected host:port")
    port({name: port_text}, name)
    return raw


def _from_dir(env: Mapping[str, str], name: str) -> str | None:
    """A credential from SNPEMU_CREDENTIALS_DIR (a Kubernetes Secret mounted as files, one
    key per guest: the StatefulSet's pods differ only by name)."""
    folder = env.get("SNPEMU_CREDENTIALS_DIR")
    if not folder:
        return None
    try:
        return (Path(folder) / name).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"SNPEMU_CREDENTIALS_DIR={folder!r}: cannot read {name}: {e}") from e


@dataclass(frozen=True)
class ServiceConfig:
    service: str
    instance: str
    bind: str
    grpc_port: int
    metrics_port: int
    log_level: str
    shutdown_grace_s: float
    peers: Mapping[str, str]
    host_credential: str | None
    # this guest's VMM credential (runtime/credentials.py), guest agents only
    vmm_credential: str | None
    data_dir: Path
    # the guest owner's credential, guest agents only: every RPC of the agent requires it
    owner_credential: str | None = None
    # how often a service that follows the host asks rmp which boot this is
    host_poll_s: float = 1.0

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> ServiceConfig:
        env = dict(os.environ if env is None else env)
        layout = layered_env(env)
        key = service.upper()
        if service == "guest":
            default_grpc, default_metrics = (
                "SNPEMU_GUEST_GRPC_PORT_BASE",
                "SNPEMU_GUEST_METRICS_PORT_BASE",
            )
        else:
            default_grpc, default_metrics = f"SNPEMU_{key}_GRPC_PORT", f"SNPEMU_{key}_METRICS_PORT"
        grpc_port = port(
            {"SNPEMU_GRPC_PORT": env.get("SNPEMU_GRPC_PORT") or layout.get(default_grpc, "")},
            "SNPEMU_GRPC_PORT",
            allow_zero=True,
        )
        metrics_port = port(
            {
                "SNPEMU_METRICS_PORT": env.get("SNPEMU_METRICS_PORT")
                or layout.get(default_metrics, "")
            },
            "SNPEMU_METRICS_PORT",
            allow_zero=True,
        )
        level = env.get("SNPEMU_LOG_LEVEL", "INFO").upper()
        if level not in LOG_LEVELS:
            choices = ", ".join(LOG_LEVELS)
            raise ConfigError(f"SNPEMU_LOG_LEVEL={level!r}: must be one of {choices}")
        bind = env.get("SNPEMU_BIND", "127.0.0.1")
        if not bind or any(c.isspace() for c in bind):
            raise ConfigError(f"SNPEMU_BIND={bind!r}: not an address")
        peers = {
            c: _address(
                env,
                f"SNPEMU_{c.upper()}_ADDR",
                f"127.0.0.1:{layout.get(f'SNPEMU_{c.upper()}_GRPC_PORT', '')}",
            )
            for c in HOST_COMPONENTS
        }
        instance = env.get("SNPEMU_INSTANCE") or service
        data_dir = Path(env.get("SNPEMU_DATA_DIR") or Path(".snpemu") / "data" / instance)
        return cls(
            service=service,
            instance=instance,
            bind=bind,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            log_level=level,
            shutdown_grace_s=number(env, "SNPEMU_SHUTDOWN_GRACE_S", "5", 300),
            host_poll_s=number(env, "SNPEMU_HOST_POLL_S", "1", 60),
            peers=peers,
            host_credential=env.get("SNPEMU_HOST_CREDENTIAL") or None,
            vmm_credential=env.get("SNPEMU_VMM_CREDENTIAL")
            or _from_dir(env, f"{instance}.vmm-credential"),
            data_dir=data_dir,
            owner_credential=(
                env.get("SNPEMU_OWNER_CREDENTIAL") or _from_dir(env, f"{instance}.owner-credential")
            )
            if service == "guest"
            else None,
        )
