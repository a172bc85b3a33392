"""The `netd` service: the host-wide device daemon."""

from snp.netd.v1.netd_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

SPEC = ServiceSpec(name="netd", descriptor=_FILE.services_by_name["NetdService"])
