"""The `psp` service: the AMD Secure Processor firmware."""

from snp.psp.v1.psp_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

SPEC = ServiceSpec(name="psp", descriptor=_FILE.services_by_name["PspService"])
