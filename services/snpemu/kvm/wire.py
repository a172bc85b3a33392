"""kvm's dataclasses to and from their snp.* messages, for the servicer and the adapters."""

from __future__ import annotations

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb

from snpemu.kvm.config import ThrottleConfig, VmConfig
from snpemu.kvm.identity import VcpuIdentity


def identity_to_pb(ident: VcpuIdentity) -> handles_pb2.VcpuIdentity:
    return handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=ident.vm_id), vcpu_id=ident.vcpu_id),
        asid=ident.asid,
        vmpl=0,
        token=ident.token,
    )


def identity_from_pb(m: handles_pb2.VcpuIdentity) -> VcpuIdentity:
    return VcpuIdentity(m.vcpu.vm.id, m.vcpu.vcpu_id, m.asid, bytes(m.token))


def config_from_pb(m: pb.VmConfig) -> VmConfig:
    return VmConfig(
        memory_bytes=m.memory_bytes,
        vcpus=m.vcpus,
        vcpu_type=int(m.vcpu_type),
        policy=m.policy,
        firmware_path=m.firmware_path,
        kernel_path=m.kernel_path,
        initrd_path=m.initrd_path,
        cmdline=m.cmdline,
        id_block=bytes(m.id_block),
        id_auth=bytes(m.id_auth),
        author_key_en=m.author_key_en,
        vcek_disabled=m.vcek_disabled,
        host_data=bytes(m.host_data),
        guest_features=m.guest_features,
        throttle=(
            ThrottleConfig(m.throttle.interval_ms, m.throttle.burst)
            if m.HasField("throttle")
            else None
        ),
        firmware=bytes(m.firmware),
        kernel=bytes(m.kernel),
        initrd=bytes(m.initrd),
    )


def config_to_pb(c: VmConfig) -> pb.VmConfig:
    m = pb.VmConfig(
        memory_bytes=c.memory_bytes,
        vcpus=c.vcpus,
        vcpu_type=pb.VcpuType.ValueType(c.vcpu_type),
        policy=c.policy,
        firmware_path=c.firmware_path,
        kernel_path=c.kernel_path,
        initrd_path=c.initrd_path,
        cmdline=c.cmdline,
        id_block=c.id_block,
        id_auth=c.id_auth,
        author_key_en=c.author_key_en,
        vcek_disabled=c.vcek_disabled,
        host_data=c.host_data,
        guest_features=c.guest_features,
        firmware=c.firmware,
        kernel=c.kernel,
        initrd=c.initrd,
    )
    if c.throttle is not None:
        m.throttle.CopyFrom(
            pb.GuestRequestThrottle(interval_ms=c.throttle.interval_ms, burst=c.throttle.burst)
        )
    return m
