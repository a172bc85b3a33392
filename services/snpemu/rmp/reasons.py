"""The reasons rmp's errors carry (ErrorInfo.reason on the wire), one member each.

A StrEnum member is its own string, so the wire text is the member's value; clients compare
against the member, never a string literal.
"""

from __future__ import annotations

import enum


class RmpReason(enum.StrEnum):
    # request fields refused before anything changes
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MISSING_FIELD = "MISSING_FIELD"
    UNKNOWN_ENUM_VALUE = "UNKNOWN_ENUM_VALUE"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    BEYOND_MEMORY = "BEYOND_MEMORY"
    TOO_LONG = "TOO_LONG"
    DUPLICATE_PAGE = "DUPLICATE_PAGE"
    UNKNOWN_SESSION_OP = "UNKNOWN_SESSION_OP"
    # a vCPU identity
    ALREADY_REGISTERED = "ALREADY_REGISTERED"
    BAD_VCPU_IDENTITY = "BAD_VCPU_IDENTITY"
    # page states a host operation needs
    PAGE_NOT_SHARED = "PAGE_NOT_SHARED"
    PAGE_NOT_HYPERVISOR = "PAGE_NOT_HYPERVISOR"
    PAGE_STATE_MISMATCH = "PAGE_STATE_MISMATCH"
    # frames
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NOT_ALLOCATED = "NOT_ALLOCATED"
    PAGE_LEAKED = "PAGE_LEAKED"
    # memory encryption keys
    NO_KEY = "NO_KEY"
    # the host as a whole
    HOST_PANIC = "HOST_PANIC"
    # a host process writing guest-private memory (rmp.client, under the gmem policy)
    GUEST_PRIVATE_MEMORY = "GUEST_PRIVATE_MEMORY"
