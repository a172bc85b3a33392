"""What the guest agent refuses or reports failed, and why (the ErrorInfo reasons it raises)."""

from __future__ import annotations

import enum

from snpemu.errors import WrongState


class GuestReason(enum.StrEnum):
    GUEST_FAULT = "GUEST_FAULT"
    GUEST_TERMINATED = "GUEST_TERMINATED"
    GUEST_NOT_RUNNING = "GUEST_NOT_RUNNING"
    BAD_RANGE = "BAD_RANGE"
    VMPCK_DISABLED = "VMPCK_DISABLED"
    GUEST_REQUEST_FAILED = "GUEST_REQUEST_FAILED"
    REPORT_STATUS = "REPORT_STATUS"  # the firmware's status in MSG_REPORT_RSP
    KEY_STATUS = "KEY_STATUS"  # the firmware's status in MSG_KEY_RSP
    NO_DEVICE = "NO_DEVICE"
    BAD_RING = "BAD_RING"
    NO_COPY = "NO_COPY"
    RMPADJUST_FAILED = "RMPADJUST_FAILED"
    # caller errors of the agent's own API, refused before the guest does anything
    BAD_ENUM = "BAD_ENUM"  # an enum field holds a number its .proto does not define
    BAD_FIELD = "BAD_FIELD"  # a field outside its range, or a required one missing
    TOO_LARGE = "TOO_LARGE"  # a length past the RPC's limit
    BAD_MAC = "BAD_MAC"  # not six hex octets of a unicast MAC


class GuestFault(WrongState):
    """A guest access that faulted and was not resolved (a #VC the guest chose not to die of)."""

    default_reason = GuestReason.GUEST_FAULT


class Terminated(WrongState):
    default_reason = GuestReason.GUEST_TERMINATED
