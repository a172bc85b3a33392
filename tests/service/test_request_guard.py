"""What the shared handler does before and around an implementation: a request over its RPC's
size limit or not parseable is refused with ErrorInfo; an exception no model meant to raise
answers INTERNAL with ErrorInfo and is logged once, as one JSON line; a long error message is
clipped so the status still fits the client's metadata limit."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc
from snpemu import errors, kvm
from snpemu.runtime.logs import JsonFormatter
from snpemu.runtime.server import ServiceSpec
from snpemu.runtime.status import error_info

from tests.service.test_bootstrap import _with_runtime

GET_VM = "/snp.kvm.v1.KvmService/GetVm"


class _Impl:
    async def GetVm(self, request: Any, context: Any) -> kvm_pb2.GetVmResponse:
        if request.vm.id == "bug":
            raise KeyError("a bug, not the caller's fault")
        # an error quoting its whole input, as a careless model might
        raise errors.NotFound(
            f"no VM {request.vm.id!r} (looked for {request.vm.id})", metadata={"id": request.vm.id}
        )

    async def ListVms(self, request: Any, context: Any) -> kvm_pb2.ListVmsResponse:
        return kvm_pb2.ListVmsResponse()


def _spec() -> ServiceSpec[_Impl]:
    return ServiceSpec(
        name="kvm",
        descriptor=kvm.SPEC.descriptor,
        make_impl=lambda _rt: _Impl(),
        request_limits={"GetVm": 1024},
    )


async def test_a_request_over_its_rpcs_limit_is_refused_before_the_model() -> None:
    async with _with_runtime(_spec()) as (_rt, channel):
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        big = kvm_pb2.GetVmRequest()
        big.vm.id = "x" * 2000
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetVm(big)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "REQUEST_TOO_LARGE"
        assert detail.metadata["limit"] == "1024"
        # the other RPCs keep gRPC's own 4 MiB default
        assert await stub.ListVms(kvm_pb2.ListVmsRequest()) == kvm_pb2.ListVmsResponse()


async def test_bytes_that_are_no_message_are_invalid_argument() -> None:
    async with _with_runtime(_spec()) as (_rt, channel):
        raw = channel.unary_unary(GET_VM)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            # field 1, wire type 2 (length-delimited), a length running past the end
            await raw(b"\x0a\x7f\x01")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "MALFORMED_REQUEST"


async def test_a_bug_is_internal_with_error_info_and_one_json_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _with_runtime(_spec()) as (_rt, channel):
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetVm(kvm_pb2.GetVmRequest(vm={"id": "bug"}))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "INTERNAL"
        records = [r for r in caplog.records if getattr(r, "event", "") == "rpc_bug"]
        assert len(records) == 1
        line = JsonFormatter("kvm", "kvm").format(records[0])
        assert "\n" not in line
        entry = json.loads(line)
        assert "KeyError" in entry["exc"] and entry["method"] == "GetVm"


async def test_a_long_error_message_is_clipped_to_fit_the_trailers() -> None:
    async with _with_runtime(_spec()) as (_rt, channel):
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        long_id = "y" * 900  # under the limit: the model sees it and quotes it whole
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetVm(kvm_pb2.GetVmRequest(vm={"id": long_id}))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        detail = error_info(info.value)
        assert detail is not None and len(detail.metadata["id"]) < 300
        assert len(info.value.details()) < 1100 and info.value.details().startswith("no VM 'yyy")
