"""The `guest` service: the guest agent of one SNP VM."""

from snp.guest.v1.guest_pb2 import DESCRIPTOR as _FILE

from snpemu.runtime.server import ServiceSpec

SPEC = ServiceSpec(name="guest", descriptor=_FILE.services_by_name["GuestService"])
