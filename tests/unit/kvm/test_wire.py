"""The servicer's decoding of a VM's configuration and a vCPU's identity (kvm/wire.py,
kvm/servicer.py): what GetVm answers is the VmConfig CreateVm was given, field for field."""

from __future__ import annotations

import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2
from snpemu.kvm.config import ThrottleConfig, VmConfig
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.wire import config_from_pb, config_to_pb, identity_from_pb, identity_to_pb

FULL = kvm_pb2.VmConfig(
    memory_bytes=64 << 20,
    vcpus=4,
    vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_GENOA,
    policy=0x30000,
    firmware_path="/fw.fd",
    kernel_path="/vmlinuz",
    initrd_path="/initrd",
    cmdline="console=ttyS0",
    id_block=bytes(96),
    id_auth=bytes(4096),
    author_key_en=True,
    vcek_disabled=True,
    host_data=bytes(range(32)),
    guest_features=1 << 5,
    throttle=kvm_pb2.GuestRequestThrottle(interval_ms=100, burst=2),
)


@pytest.mark.parametrize(
    "m",
    [
        FULL,
        kvm_pb2.VmConfig(memory_bytes=16 << 20, vcpus=1),
        kvm_pb2.VmConfig(memory_bytes=16 << 20, vcpus=1, throttle=kvm_pb2.GuestRequestThrottle()),
    ],
    ids=["every field", "defaults", "empty throttle"],
)
def test_a_config_comes_back_as_it_was_given(m: kvm_pb2.VmConfig) -> None:
    c = config_from_pb(m)
    back = config_to_pb(c)
    assert back == m and back.SerializeToString() == m.SerializeToString()
    assert back.HasField("throttle") == m.HasField("throttle")


def test_the_decoded_config() -> None:
    c = config_from_pb(FULL)
    assert c.throttle == ThrottleConfig(100, 2) and c.vcpu_type == 4
    assert config_from_pb(kvm_pb2.VmConfig(vcpus=1)) == VmConfig(memory_bytes=0, vcpus=1)


def test_an_identity_round_trips_and_the_exits_get_the_dataclass() -> None:
    ident = VcpuIdentity("vm-1", 3, 9, b"t" * 32)
    m = identity_to_pb(ident)
    assert (m.vcpu.vm.id, m.vcpu.vcpu_id, m.asid, m.vmpl, m.token) == ("vm-1", 3, 9, 0, b"t" * 32)
    assert identity_from_pb(m) == ident
    decoded = identity_from_pb(m)
    assert isinstance(decoded, VcpuIdentity)
    assert (decoded.vm_id, decoded.vcpu_id, decoded.asid, decoded.token) == (
        "vm-1",
        3,
        9,
        b"t" * 32,
    )
    assert identity_from_pb(handles_pb2.VcpuIdentity()).vm_id == ""
