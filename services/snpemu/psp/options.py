"""psp settings from the environment (and .env), checked at start.

SNPEMU_PSP_PRODUCT   Milan | Genoa: the emulated chip (default Milan)
SNPEMU_CPU_STEPPING  the host processor's stepping, as a number or AMD's name: Milan 0 (B0) or
                     1 (B1), Genoa 0 (B0), 1 (B1) or 2 (B2); default 1. The VCEK's productName,
                     the reports' CPUID fields and kvm's guest CPUID(1) follow it.
SNPEMU_KDS_PORT      port of the KDS-shaped certificate endpoint (from .env; 0 = any)
SNPEMU_HOST_SMT, SNPEMU_HOST_SOCKETS  the machine's SMT setting and sockets (psp/topology.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from snpemu.cpu import Cpu
from snpemu.errors import InvalidArgument
from snpemu.hostconfig import ConfigError, layered_env, port
from snpemu.psp.tcb import PRODUCTS
from snpemu.psp.topology import Topology


@dataclass(frozen=True)
class PspOptions:
    product: str
    kds_port: int
    topology: Topology = field(default_factory=Topology)
    stepping: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PspOptions:
        values = layered_env(env)
        product = values.get("SNPEMU_PSP_PRODUCT", "Milan")
        if product not in PRODUCTS:
            raise ConfigError(
                f"SNPEMU_PSP_PRODUCT={product!r}: one of {', '.join(sorted(PRODUCTS))}"
            )
        raw = values.get("SNPEMU_CPU_STEPPING") or str(PRODUCTS[product].stepping)
        try:
            stepping = Cpu.parse_stepping(product, raw).stepping
        except InvalidArgument as e:
            raise ConfigError(f"SNPEMU_CPU_STEPPING={raw!r}: {e.message}") from None
        return cls(
            product=product,
            kds_port=port(values, "SNPEMU_KDS_PORT", allow_zero=True),
            topology=Topology.from_env(values),
            stepping=stepping,
        )
