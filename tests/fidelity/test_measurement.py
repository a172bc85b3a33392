"""The launch measurement of Debian's OVMF pushed through the psp service, page by page the way
a VMM launches a guest, equals what the `sev-snp-measure --mode snp` CLI predicts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from snp.psp.v1 import psp_pb2
from snpemu.abi.page_type import PageType
from snpemu.vmm.launch_plan import plan
from snpemu.vmm.ovmf import Ovmf
from snpemu.vmm.vmsa import VCPU_SIGNATURES

from tests.conftest import tool
from tests.service.host_pair import HOST, rmp_and_psp

pytestmark = pytest.mark.fidelity

OVMF = Path("/usr/share/OVMF/OVMF_CODE.fd")


def predicted(vcpus: int, vcpu_type: str) -> str:
    out = subprocess.run(
        [
            tool("sev-snp-measure"),
            "--mode",
            "snp",
            "--vcpus",
            str(vcpus),
            "--vcpu-type",
            vcpu_type,
            "--ovmf",
            str(OVMF),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("vcpus", "vcpu_type"), [(1, "EPYC-Milan"), (2, "EPYC-Genoa"), (4, "EPYC")]
)
async def test_debian_ovmf_measurement_matches_sev_snp_measure(
    tmp_path: Path, vcpus: int, vcpu_type: str
) -> None:
    assert OVMF.exists(), "Debian's ovmf package is not installed (make install installs it)"
    pages = plan(Ovmf.load(OVMF), vcpus=vcpus, vcpu_signature=VCPU_SIGNATURES[vcpu_type])

    assert sum(p.page_type == PageType.VMSA for p in pages) == vcpus
    async with rmp_and_psp(tmp_path) as pair:
        await pair.psp.SnpInit(psp_pb2.SnpInitRequest(), metadata=HOST)
        gctx = await pair.start_guest(asid=1)
        spas = await pair.alloc(len(pages), placement=1)
        for page, spa in zip(pages, spas, strict=True):
            await pair.launch_update(gctx, spa, page.gpa, 1, page.data, page.page_type)
        r = await pair.psp.LaunchFinish(psp_pb2.LaunchFinishRequest(gctx=gctx), metadata=HOST)
    assert bytes(r.measurement).hex() == predicted(vcpus, vcpu_type)
