"""Firmware status codes and the error a failing command raises.

KERNEL: include/uapi/linux/psp-sev.h enum sev_ret_code (docs/abi.md#status-codes). A failing command
raises FirmwareError, which carries the code and leaves the firmware state unchanged; the
servicer reports it as a gRPC error whose ErrorInfo reason is the code's name and whose
metadata has fw_status = "0x00NN". The psp's other reasons (PspReason) are those of the checks
the servicer makes before the firmware sees a request.
"""

from __future__ import annotations

import enum

from snpemu import errors


class SevStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWSEV_RET_PLATFORM = 0x13
    HWSEV_RET_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    EXIT_RING_BUFFER = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27

    @classmethod
    def from_reason(cls, reason: str) -> SevStatus | None:
        """The status a FirmwareError's reason names, for a client to compare by member
        (`SevStatus.from_reason(e.reason) is SevStatus.INVALID_PAGE_STATE`); None for a reason
        that is not a firmware status."""
        return cls.__members__.get(reason)


class PspReason(enum.StrEnum):
    """The reasons psp raises that are not a firmware status (the wire strings)."""

    # a request field the servicer refuses before the firmware sees it
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MISSING_FIELD = "MISSING_FIELD"
    # an enum value the proto does not define
    UNKNOWN_ENUM_VALUE = "UNKNOWN_ENUM_VALUE"
    # a number wider than the command buffer's field (a u8 SPL of 999)
    OUT_OF_RANGE = "OUT_OF_RANGE"
    # more bytes or entries than the command buffer holds
    TOO_LONG = "TOO_LONG"
    # a TcbVersion whose raw u64 and decoded fields disagree
    TCB_MISMATCH = "TCB_MISMATCH"


# snp_psp_commands_total's status label for a command that raised something other than a
# firmware status (a bug or an unreachable rmp)
COMMAND_ERROR = "ERROR"


# State errors are FAILED_PRECONDITION; the rest are bad input (INVALID_ARGUMENT).
_STATE_CODES = {
    SevStatus.INVALID_PLATFORM_STATE,
    SevStatus.INVALID_GUEST_STATE,
    SevStatus.INACTIVE,
    SevStatus.ASID_OWNED,
    SevStatus.DFFLUSH_REQUIRED,
    SevStatus.WBINVD_REQUIRED,
    SevStatus.ACTIVE,
    SevStatus.INVALID_PAGE_STATE,
    SevStatus.INVALID_PAGE_OWNER,
    SevStatus.RMP_INIT_REQUIRED,
    SevStatus.SHUTDOWN_REQUIRED,
    SevStatus.ALREADY_OWNED,
}


class FirmwareError(errors.SnpemuError):
    """A firmware command failed with `status`; nothing changed."""

    def __init__(self, status: SevStatus, message: str) -> None:
        super().__init__(
            f"{status.name} (0x{status:02x}): {message}",
            reason=status.name,
            metadata={"fw_status": f"0x{status:04x}"},
        )
        self.status = status


class FirmwareStateError(FirmwareError, errors.WrongState):
    pass


class FirmwareInputError(FirmwareError, errors.InvalidArgument):
    pass


def is_state_error(status: SevStatus) -> bool:
    """Whether a caller seeing `status` met a wrong state (FAILED_PRECONDITION) rather than
    gave bad input (INVALID_ARGUMENT)."""
    return status in _STATE_CODES


def fail(status: SevStatus, message: str) -> FirmwareError:
    cls = FirmwareStateError if is_state_error(status) else FirmwareInputError
    return cls(status, message)
