"""TCB_VERSION: the u64 of security patch levels. Milan/Genoa layout only (Turin differs).

KERNEL: include/linux/psp-sev.h sev_snp_tcb_version_genoa_milan (docs/abi.md#tcb-version):
byte 0 boot loader, 1 TEE, 2-5 reserved, 6 SNP, 7 microcode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from snpemu.cpu import Cpu


@dataclass(frozen=True, order=False)
class Tcb:
    boot_loader: int
    tee: int
    snp: int
    microcode: int

    @property
    def raw(self) -> int:
        return self.boot_loader | self.tee << 8 | self.snp << 48 | self.microcode << 56

    @classmethod
    def from_raw(cls, raw: int) -> Tcb:
        return cls(raw & 0xFF, raw >> 8 & 0xFF, raw >> 48 & 0xFF, raw >> 56 & 0xFF)

    def parts(self) -> tuple[int, int, int, int]:
        return (self.boot_loader, self.tee, self.snp, self.microcode)

    def le(self, other: Tcb) -> bool:
        """Every component at most other's (TCB comparisons are per component)."""
        return all(a <= b for a, b in zip(self.parts(), other.parts(), strict=True))

    def reserved_clear(self, raw: int) -> bool:
        return raw == self.raw


@dataclass(frozen=True)
class Product:
    """What the emulated chip claims to be."""

    name: str  # KDS product name: Milan, Genoa
    stepping: int  # the host setting SNPEMU_CPU_STEPPING
    tcb: Tcb  # the TCB the firmware runs at

    @property
    def cpu(self) -> Cpu:
        return Cpu(self.name, self.stepping)

    @property
    def stepping_name(self) -> str:
        """VCEK productName extension, e.g. Milan-B1: the stepping named as AMD names it."""
        return self.cpu.product_name

    @property
    def family(self) -> int:  # CPUID combined family
        return self.cpu.family

    @property
    def model(self) -> int:
        return self.cpu.model

    def at_stepping(self, stepping: int) -> Product:
        Cpu(self.name, stepping)  # INVARIANT: raises for a stepping the product line lacks
        return replace(self, stepping=stepping)


PRODUCTS = {
    # Stepping 1 by default: Milan-B1 is CPUID(1) 0x00A00F11, the signature of QEMU's
    # EPYC-Milan model (sev-snp-measure vcpu_types.py), so a default guest's CPUID, its
    # launch measurement and the VCEK's productName all agree. Genoa stays at B1 (0x00A10F11;
    # QEMU's EPYC-Genoa is stepping 0). SPEC: go-sev-guest kds/kds.go steppingDecoder
    "Milan": Product("Milan", 1, Tcb(3, 0, 8, 115)),
    "Genoa": Product("Genoa", 1, Tcb(7, 0, 14, 72)),
}
