"""The host stepping setting: the VCEK's productName, the chip's CPUID(1) signature and the
guest's CPUID(1) (the VMSA's RDX) agree for every stepping.

Expected values, written here from their sources:
- stepping names: go-sev-guest kds/kds.go steppingDecoder ("Milan-B0" stepping 0, "Milan-B1" 1,
  "Genoa-B0" 0, "Genoa-B1" 1, "Genoa-B2" 2);
- CPUID(1).EAX: AMD CPUID Specification #25481 Fn0000_0001_EAX; go-sev-guest's tests pair
  Milan-B0 with 0x00a00f10, Milan-B1 with 0x00a00f11 and Genoa-B2 with 0x00a10f12;
- QEMU's models: sev-snp-measure vcpu_types.py, EPYC-Milan = cpu_sig(25, 1, 1) = 0x00A00F11,
  EPYC-Genoa = cpu_sig(25, 17, 0) = 0x00A10F10.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography import x509
from snpemu.cpu import Cpu
from snpemu.hostconfig import ConfigError
from snpemu.psp.guest import cpuid_signature
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.options import PspOptions
from snpemu.psp.tcb import PRODUCTS
from snpemu.vmm import vmsa

from tests.unit.psp.launch_helpers import identity

PRODUCT_NAME_OID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")  # KDS productName
EPYC_MILAN, EPYC_GENOA = 0x00A00F11, 0x00A10F10

SETTINGS = [
    # (SNPEMU_PSP_PRODUCT, SNPEMU_CPU_STEPPING, productName, CPUID(1).EAX)
    ("Milan", "0", "Milan-B0", 0x00A00F10),
    ("Milan", "B0", "Milan-B0", 0x00A00F10),
    ("Milan", "1", "Milan-B1", 0x00A00F11),
    ("Genoa", "0", "Genoa-B0", 0x00A10F10),
    ("Genoa", "1", "Genoa-B1", 0x00A10F11),
    ("Genoa", "B2", "Genoa-B2", 0x00A10F12),
]


def decode(eax: int) -> tuple[int, int, int]:
    """(family, model, stepping) of CPUID(1).EAX: stepping 3:0, model 7:4, family 11:8,
    extended model 19:16, extended family 27:20 (AMD CPUID Specification #25481)."""
    family = (eax >> 8 & 0xF) + (eax >> 20 & 0xFF)
    model = (eax >> 16 & 0xF) << 4 | (eax >> 4 & 0xF)
    return family, model, eax & 0xF


def options(**env: str) -> PspOptions:
    return PspOptions.from_env({"SNPEMU_KDS_PORT": "0", **env})


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chip")


@pytest.mark.parametrize(("line", "setting", "name", "eax"), SETTINGS)
def test_vcek_product_name_and_cpuid_agree(
    tmp: Path, tmp_path: Path, line: str, setting: str, name: str, eax: int
) -> None:
    opts = options(SNPEMU_PSP_PRODUCT=line, SNPEMU_CPU_STEPPING=setting)
    product = PRODUCTS[line].at_stepping(opts.stepping)
    # the chip: the VCEK's productName extension, the report's and secrets page's CPUID
    chip = dataclasses.replace(identity(tmp, line), product=product, data_dir=tmp_path)
    ext = chip.vcek_cert(product.tcb).extensions.get_extension_for_oid(PRODUCT_NAME_OID)
    value = ext.value.value  # type: ignore[attr-defined]
    assert value == b"\x16" + bytes([len(name)]) + name.encode()  # IA5String
    assert cpuid_signature(product) == eax
    assert (product.family, product.model, product.stepping) == decode(eax)
    # kvm: learns the host from the productName; its own model's vCPU takes the stepping
    host = Cpu.from_product_name(name).signature
    assert host == eax
    own, other = ("EPYC-Milan", "EPYC-Genoa") if line == "Milan" else ("EPYC-Genoa", "EPYC-Milan")
    assert vmsa.vcpu_signature(own, host) == eax
    # a model of another product line keeps QEMU's signature
    assert (
        vmsa.vcpu_signature(other, host)
        == {"EPYC-Milan": EPYC_MILAN, "EPYC-Genoa": EPYC_GENOA}[other]
    )


def test_default_is_milan_b1_whose_cpuid_is_qemus_epyc_milan() -> None:
    """The default keeps what sev-snp-measure --vcpu-type EPYC-Milan predicts."""
    opts = options()
    product = PRODUCTS[opts.product].at_stepping(opts.stepping)
    assert product.stepping_name == "Milan-B1"
    assert vmsa.vcpu_signature("EPYC-Milan", product.cpu.signature) == EPYC_MILAN
    assert vmsa.vcpu_signature("EPYC-Milan") == EPYC_MILAN


@pytest.mark.parametrize(
    ("line", "setting"), [("Milan", "2"), ("Milan", "B2"), ("Genoa", "3"), ("Milan", "x")]
)
def test_a_stepping_the_product_lacks_is_refused_at_start(line: str, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        options(SNPEMU_PSP_PRODUCT=line, SNPEMU_CPU_STEPPING=setting)
    assert f"SNPEMU_CPU_STEPPING={setting!r}" in info.value.message


def test_a_chip_keeps_its_stepping(tmp_path: Path) -> None:
    (tmp_path / "chip.json").write_text(
        json.dumps({"product": "Milan", "stepping": 1, "chip_id": "", "chip_secret": ""})
    )
    with pytest.raises(ValueError, match="Milan-B0"):
        ChipIdentity.load_or_create(tmp_path, "Milan", 0)


# go-sev-guest kds/kds.go steppingDecoder: productName -> stepping number
STEPPING_OF_NAME = {"Milan-B0": 0, "Milan-B1": 1, "Genoa-B0": 0, "Genoa-B1": 1, "Genoa-B2": 2}


@pytest.mark.parametrize("line", ["Milan", "Genoa"])
def test_each_products_default_name_matches_its_cpuid_stepping(line: str) -> None:
    """Milan's default once named its VCEK Milan-B0 (stepping 0) while its CPUID said 1."""
    product = PRODUCTS[line]
    assert cpuid_signature(product) & 0xF == STEPPING_OF_NAME[product.stepping_name]
