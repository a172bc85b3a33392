"""A guest launched by kvm from Debian's OVMF (kvm doing what QEMU does) has the measurement
`sev-snp-measure --mode snp` predicts, at 1, 2 and 4 vCPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
from snp.kvm.v1 import kvm_pb2

from tests.conftest import sev_snp_measure
from tests.service.host_stack import host_stack

pytestmark = pytest.mark.fidelity
OVMF = "/usr/share/OVMF/OVMF_CODE.fd"


async def test_debian_ovmf_launch_through_kvm(tmp_path: Path) -> None:
    assert Path(OVMF).exists(), "Debian's ovmf package is not installed (make install installs it)"

    async with host_stack(tmp_path, memory="1G", SNPEMU_KVM_FIRMWARE=OVMF) as s:
        out = []
        for vcpus in (1, 2, 4):
            g = await s.launch(
                memory=256 << 20,
                vcpus=vcpus,
                firmware_path=OVMF,
                vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_MILAN,
            )
            out.append(g.measurement)
        got = out
    for vcpus, measurement in zip((1, 2, 4), got, strict=True):
        expected = sev_snp_measure(ovmf=OVMF, vcpus=vcpus)
        assert measurement.hex() == expected, vcpus
