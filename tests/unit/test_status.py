"""snpemu errors become gRPC status with ErrorInfo, in one table."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from snpemu import errors
from snpemu.runtime.status import grpc_code, to_status


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.Aborted, grpc.StatusCode.ABORTED),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (errors.NotBuilt, grpc.StatusCode.UNIMPLEMENTED),
        (errors.SnpemuError, grpc.StatusCode.INTERNAL),
    ],
)
def test_code_table(cls: type[errors.SnpemuError], code: grpc.StatusCode) -> None:
    assert grpc_code(cls("x")) == code


def test_subclass_inherits_code() -> None:
    class PlatformState(errors.WrongState):
        pass

    assert grpc_code(PlatformState("x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_status_carries_error_info() -> None:
    err = errors.WrongState(
        "SNP is not initialised", reason="INVALID_PLATFORM_STATE", metadata={"fw_status": "0x0001"}
    )
    status = to_status(err, "psp")
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "SNP is not initialised"
    ((key, blob),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    proto = status_pb2.Status.FromString(blob)
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "INVALID_PLATFORM_STATE",
        "psp.snpemu",
        {"fw_status": "0x0001"},
    )
