"""Label values of the standard gRPC metric families."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry
from snpemu.runtime.metrics import GrpcServerMetrics, go_code_name, rpc_type


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (grpc.StatusCode.OK, "OK"),
        (grpc.StatusCode.CANCELLED, "Canceled"),
        (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        (grpc.StatusCode.FAILED_PRECONDITION, "FailedPrecondition"),
        (grpc.StatusCode.UNIMPLEMENTED, "Unimplemented"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceeded"),
    ],
)
def test_codes_use_go_spelling(code: grpc.StatusCode, name: str) -> None:
    assert go_code_name(code) == name


def test_rpc_types() -> None:
    assert rpc_type(False, False) == "unary"
    assert rpc_type(False, True) == "server_stream"
    assert rpc_type(True, False) == "client_stream"
    assert rpc_type(True, True) == "bidi_stream"


def test_initialise_creates_zero_series() -> None:
    registry = CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    metrics.initialise([("unary", "snp.kvm.v1.KvmService", "ListVms")])
    labels = {
        "grpc_type": "unary",
        "grpc_service": "snp.kvm.v1.KvmService",
        "grpc_method": "ListVms",
    }
    assert registry.get_sample_value("grpc_server_started_total", labels) == 0
    # every code, as go-grpc-prometheus's preRegisterMethod() creates them: Go's
    # codes.Code.String() of grpc-go codes/code_string.go, written out here
    for code in (
        *("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound"),
        *("AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition"),
        *("Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss"),
        "Unauthenticated",
    ):
        handled = {**labels, "grpc_code": code}
        assert registry.get_sample_value("grpc_server_handled_total", handled) == 0, code
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 0
