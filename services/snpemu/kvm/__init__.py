"""The `kvm` service: KVM/SVM and the VMM's launch control."""

from snp.kvm.v1.kvm_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

SPEC = ServiceSpec(name="kvm", descriptor=_FILE.services_by_name["KvmService"])
