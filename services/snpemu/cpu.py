"""The host processor's identity: its product line, its stepping, and the CPUID(1) signature.

CPUID Fn0000_0001_EAX: stepping bits 3:0, model 7:4, family 11:8 (0xF once the family is above
0xF), extended model 19:16 (model >> 4), extended family 27:20 (family - 0xF).
SPEC: AMD CPUID Specification #25481, "CPUID Fn0000_0001_EAX Family, Model, Stepping
Identifiers" (sev-snp-measure vcpu_types.py cpu_sig() computes it the same way).

AMD names each stepping of a product line <letter><digit>; the VCEK certificate carries the
pair as its productName extension (1.3.6.1.4.1.3704.1.2, e.g. "Milan-B0"), and verifiers hold
it against the guest's CPUID(1) stepping. Only AMD's documentation maps a stepping number to its
name. SPEC: go-sev-guest kds/kds.go steppingDecoder, milanSteppingVersions,
genoaSteppingVersions (Milan B0 = 0, B1 = 1; Genoa B0 = 0, B1 = 1, B2 = 2; ProductLineCpuid:
Milan 0x00A00F10, Genoa 0x00A10F10 at stepping 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.errors import InvalidArgument

# Product line -> (family, model) of its CPUID(1) signature. SPEC: go-sev-guest kds/kds.go
# ProductLineCpuid
FAMILY_MODEL = {"Milan": (0x19, 0x01), "Genoa": (0x19, 0x11)}
# Product line -> the names of its steppings, indexed by stepping number.
STEPPING_NAMES = {"Milan": ("B0", "B1"), "Genoa": ("B0", "B1", "B2")}


def signature(family: int, model: int, stepping: int) -> int:
    """CPUID(1).EAX of a family, model and stepping (layout in the module docstring)."""
    family_low, family_high = (0xF, family - 0xF) if family > 0xF else (family, 0)
    return family_high << 20 | (model >> 4) << 16 | family_low << 8 | (model & 0xF) << 4 | stepping


@dataclass(frozen=True)
class Cpu:
    """A product line at one stepping: what the VCEK names and what CPUID(1) reports."""

    line: str
    stepping: int

    def __post_init__(self) -> None:
        names = STEPPING_NAMES.get(self.line)
        if names is None:
            raise InvalidArgument(
                f"unknown product line {self.line!r}: one of {', '.join(STEPPING_NAMES)}"
            )
        if not 0 <= self.stepping < len(names):
            raise InvalidArgument(
                f"{self.line} has no stepping {self.stepping}: "
                + ", ".join(f"{i} ({n})" for i, n in enumerate(names))
            )

    @property
    def family(self) -> int:
        return FAMILY_MODEL[self.line][0]

    @property
    def model(self) -> int:
        return FAMILY_MODEL[self.line][1]

    @property
    def product_name(self) -> str:
        """The VCEK's productName extension, e.g. Milan-B1."""
        return f"{self.line}-{STEPPING_NAMES[self.line][self.stepping]}"

    @property
    def signature(self) -> int:
        return signature(self.family, self.model, self.stepping)

    @classmethod
    def parse_stepping(cls, line: str, text: str) -> Cpu:
        """A stepping given as its number (0, 1) or its name (B0, B1)."""
        names = STEPPING_NAMES.get(line, ())
        if text.upper() in names:
            return cls(line, names.index(text.upper()))
        try:
            number = int(text, 10)
        except ValueError:
            raise InvalidArgument(
                f"stepping {text!r}: a number or one of {', '.join(names)}"
            ) from None
        return cls(line, number)

    @classmethod
    def from_product_name(cls, name: str) -> Cpu:
        """The inverse of product_name: "Milan-B0" -> Cpu("Milan", 0)."""
        line, sep, stepping = name.partition("-")
        if not sep or stepping not in STEPPING_NAMES.get(line, ()):
            raise InvalidArgument(f"unknown VCEK product name {name!r}")
        return cls(line, STEPPING_NAMES[line].index(stepping))
