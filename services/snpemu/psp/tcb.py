"""TCB_VERSION: the u64 of security patch levels. Milan/Genoa layout only (Turin differs).

KERNEL: include/linux/psp-sev.h sev_snp_tcb_version_genoa_milan (reference 1.4):
byte 0 boot loader, 1 TEE, 2-5 reserved, 6 SNP, 7 microcode.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    stepping_name: str  # VCEK productName extension, e.g. Milan-B0
    family: int  # CPUID combined family
    model: int
    stepping: int
    tcb: Tcb  # the TCB the firmware runs at


PRODUCTS = {
    # CPUID(1) 0x00A00F11 (EPYC-Milan), 0x00A10F11 (Genoa B1). SPEC: go-sev-guest abi.go
    "Milan": Product("Milan", "Milan-B0", 0x19, 0x01, 0x1, Tcb(3, 0, 8, 115)),
    "Genoa": Product("Genoa", "Genoa-B1", 0x19, 0x11, 0x1, Tcb(7, 0, 14, 72)),
}
