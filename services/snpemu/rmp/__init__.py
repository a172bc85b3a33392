"""The `rmp` service: the RMP table, host MMU and memory encryption engine."""

from snp.rmp.v1.rmp_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

SPEC = ServiceSpec(name="rmp", descriptor=_FILE.services_by_name["RmpService"])
