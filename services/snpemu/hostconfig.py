"""The host layout (ports, guest count) from the committed `.env`, shared with docker compose.

`.env` uses compose's env-file syntax (KEY=VALUE, `#` comments, optional quotes). As with
compose interpolation, a variable set in the process environment wins over the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snpemu.errors import InvalidArgument

# Host-side components in start order; guests come after them.
HOST_COMPONENTS = ("rmp", "psp", "kvm", "netd")
MAX_GUESTS = 64
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(InvalidArgument):
    """A configuration value is missing or malformed; the message names the variable."""


def default_config_path() -> Path:
    # INVARIANT: the package lives at <repo>/services/snpemu in a checkout and in the image.
    return Path(__file__).resolve().parent.parent.parent / ".env"


def parse_env_file(text: str, origin: str = ".env") -> dict[str, str]:
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(f"{origin}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def layered_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`.env` values overlaid by the process environment (SNPEMU_CONFIG names another file)."""
    env = dict(os.environ if env is None else env)
    path = Path(env.get("SNPEMU_CONFIG") or default_config_path())
    try:
        file_values = parse_env_file(path.read_text(), str(path))
    except FileNotFoundError:
        if "SNPEMU_CONFIG" in env:
            raise ConfigError(f"SNPEMU_CONFIG={path}: no such file") from None
        file_values = {}
    return {**file_values, **env}


def port(env: Mapping[str, str], name: str, *, allow_zero: bool = False) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        raise ConfigError(f"{name} is not set (and not in .env)")
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a port number") from None
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{name}={raw!r}: port must be in {low}..65535")
    return value


def count(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be in {low}..{high}")
    return value


def number(env: Mapping[str, str], name: str, default: str, high: float) -> float:
    """A non-negative number of seconds, microseconds, ... at most high."""
    raw = env.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number") from None
    if not 0 <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be in 0..{high:g}")
    return value


@dataclass(frozen=True)
class Endpoint:
    """Where one service process listens."""

    name: str  # rmp, psp, kvm, netd, guest-0, guest-1, ...
    module: str  # python -m <module>
    grpc_port: int
    metrics_port: int


@dataclass(frozen=True)
class HostConfig:
    endpoints: tuple[Endpoint, ...]
    prometheus_port: int
    grafana_port: int
    kds_port: int

    @property
    def guests(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.name.startswith("guest-"))

    def endpoint(self, name: str) -> Endpoint:
        for e in self.endpoints:
            if e.name == name:
                return e
        raise KeyError(name)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> HostConfig:
        values = layered_env(env)
        endpoints = [
            Endpoint(
                name=c,
                module=f"snpemu.{c}",
                grpc_port=port(values, f"SNPEMU_{c.upper()}_GRPC_PORT"),
                metrics_port=port(values, f"SNPEMU_{c.upper()}_METRICS_PORT"),
            )
            for c in HOST_COMPONENTS
        ]
        guests = count(values, "SNPEMU_GUESTS", 0, MAX_GUESTS)
        grpc_base = port(values, "SNPEMU_GUEST_GRPC_PORT_BASE")
        metrics_base = port(values, "SNPEMU_GUEST_METRICS_PORT_BASE")
        for i in range(guests):
            grpc_name, metrics_name = (
                f"SNPEMU_GUEST_{i}_GRPC_PORT",
                f"SNPEMU_GUEST_{i}_METRICS_PORT",
            )
            endpoints.append(
                Endpoint(
                    f"guest-{i}",
                    "snpemu.guest",
                    port(values, grpc_name) if values.get(grpc_name) else grpc_base + i,
                    port(values, metrics_name) if values.get(metrics_name) else metrics_base + i,
                )
            )
        config = cls(
            endpoints=tuple(endpoints),
            prometheus_port=port(values, "SNPEMU_PROMETHEUS_PORT"),
            grafana_port=port(values, "SNPEMU_GRAFANA_PORT"),
            kds_port=port(values, "SNPEMU_KDS_PORT"),
        )
        config._check_distinct()
        return config

    def _check_distinct(self) -> None:
        seen: dict[int, str] = {}
        for owner, p in [
            *((f"{e.name} gRPC", e.grpc_port) for e in self.endpoints),
            *((f"{e.name} metrics", e.metrics_port) for e in self.endpoints),
            ("prometheus", self.prometheus_port),
            ("grafana", self.grafana_port),
            ("psp KDS", self.kds_port),
        ]:
            if p in seen:
                raise ConfigError(f"port {p} is given to both {seen[p]} and {owner}")
            if p > 65535:
                raise ConfigError(f"{owner} port {p} is above 65535")
            seen[p] = owner


def free_ports(n: int) -> list[int]:
    """n distinct local ports that were free a moment ago (bound then released together).

    Chosen below the kernel's ephemeral range, so that the source port of some outgoing
    connection cannot take one between now and the moment a service binds it.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    socks: list[socket.socket] = []
    try:
        for port in random.sample(range(1024 + (low - 1024) // 4, low), k=min(4000, low // 2)):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"found only {len(socks)} free ports below {low}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
