"""The reasons netd's errors carry (ErrorInfo.reason on the wire); a client compares by member."""

from __future__ import annotations

import enum


class NetdReason(enum.StrEnum):
    """The reasons netd's errors carry (google.rpc.ErrorInfo.reason on the wire)."""

    MAC_IN_USE = "MAC_IN_USE"
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
    BROKEN_RING = "BROKEN_RING"
    UNKNOWN_VM = "UNKNOWN_VM"
    # the four areas of a device (two ring pages, two buffer arrays) share bytes
    RINGS_OVERLAP = "RINGS_OVERLAP"
    # a VMM's call without the capability: the VM's token (register) or the device's
    VM_TOKEN_MISSING = "VM_TOKEN_MISSING"
    DEVICE_TOKEN_MISSING = "DEVICE_TOKEN_MISSING"
    DEVICE_TOKEN_WRONG = "DEVICE_TOKEN_WRONG"
    TOO_MANY_DEVICES = "TOO_MANY_DEVICES"
    HOST_ONLY = "HOST_ONLY"
