"""The one exception hierarchy of snpemu, free of gRPC.

Models raise these; `snpemu.runtime.status` maps them to gRPC status codes in one place:

    SnpemuError              INTERNAL            (a bug: should not escape)
    +-- InvalidArgument      INVALID_ARGUMENT    bad input; nothing changed
    +-- WrongState           FAILED_PRECONDITION wrong platform/guest/page state for the request
    +-- NotFound             NOT_FOUND           unknown handle
    +-- AlreadyExists        ALREADY_EXISTS      the thing to create is there already
    +-- Aborted              ABORTED             lost a race (e.g. FAIL_INUSE); retry may succeed
    +-- Unavailable          UNAVAILABLE         a peer service is down
    +-- PermissionDenied     PERMISSION_DENIED   caller lacks the identity the operation needs
    +-- Unauthenticated      UNAUTHENTICATED     a host-only RPC called without the host credential
    +-- NotBuilt             UNIMPLEMENTED       an RPC of the API that is not built yet
    +-- ResourceExhausted    RESOURCE_EXHAUSTED  the caller holds as many of a thing as it may

Each carries a `reason` (UPPER_SNAKE: the SEV status name such as INVALID_PLATFORM_STATE, a
GHCB error such as GHCB_ERR_INVALID_INPUT, or a generic one) and string metadata such as
`fw_status: "0x0001"`, which reach the client in google.rpc.ErrorInfo. Each model keeps the
reasons it raises as a StrEnum beside it (a member is its wire string), and clients compare a
reason by member, never by a string literal.
"""

from __future__ import annotations

from collections.abc import Mapping


class SnpemuError(Exception):
    """Base class. `reason` defaults to the class's own; message is for people."""

    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(SnpemuError):
    default_reason = "INVALID_ARGUMENT"


class WrongState(SnpemuError):
    default_reason = "WRONG_STATE"


class NotFound(SnpemuError):
    default_reason = "NOT_FOUND"


class AlreadyExists(SnpemuError):
    default_reason = "ALREADY_EXISTS"


class Aborted(SnpemuError):
    default_reason = "ABORTED"


class Unavailable(SnpemuError):
    default_reason = "UNAVAILABLE"


class PermissionDenied(SnpemuError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(SnpemuError):
    default_reason = "UNAUTHENTICATED"


class NotBuilt(SnpemuError):
    default_reason = "NOT_BUILT"


class ResourceExhausted(SnpemuError):
    default_reason = "RESOURCE_EXHAUSTED"
