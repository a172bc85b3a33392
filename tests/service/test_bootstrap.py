"""The shared service bootstrap: one real gRPC server in-process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc
from snpemu import errors, guest, kvm, netd, psp, rmp
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime, ServiceSpec, StartupError
from snpemu.runtime.status import error_info

from tests.conftest import eventually

SPECS = {"rmp": rmp.SPEC, "psp": psp.SPEC, "kvm": kvm.SPEC, "netd": netd.SPEC, "guest": guest.SPEC}


def _config(service: str, **env: str) -> ServiceConfig:
    return ServiceConfig.from_env(
        service,
        {
            "SNPEMU_GRPC_PORT": "0",
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_SHUTDOWN_GRACE_S": "2",
            "SNPEMU_DATA_DIR": tempfile.mkdtemp(prefix="snpemu-test-"),
            **env,
        },
    )


@contextlib.asynccontextmanager
async def _with_runtime(
    spec: ServiceSpec, **env: str
) -> AsyncIterator[tuple[ServiceRuntime, grpc.aio.Channel]]:
    # kvm's start-up waits for rmp and psp, which these tests do not run
    options = spec.options({"SNPEMU_KVM_PEER_WAIT_S": "0", "SNPEMU_KDS_PORT": "0"})
    runtime = ServiceRuntime(spec, _config(spec.name, **env), options)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            yield runtime, channel
    finally:
        await runtime.stop()


@pytest.mark.parametrize("name", sorted(SPECS))
async def test_health_and_reflection(name: str) -> None:
    spec = SPECS[name]

    async with _with_runtime(spec) as (runtime, channel):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", spec.descriptor.full_name):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # Reflection with the sync client (it is not asyncio-aware).
    async with _with_runtime(spec) as (runtime, _channel):

        def blocking() -> list[str]:
            with grpc.insecure_channel(runtime.address) as ch:
                db = ProtoReflectionDescriptorDatabase(ch)
                services = list(db.get_services())
                pool = descriptor_pool.DescriptorPool(db)
                described = pool.FindServiceByName(spec.descriptor.full_name)
                assert [m.name for m in described.methods] == [
                    m.name for m in spec.descriptor.methods
                ]
                return services

        services = await asyncio.to_thread(blocking)
        assert sorted(services) == sorted(
            [
                spec.descriptor.full_name,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        )


async def test_unbuilt_rpcs_answer_unimplemented_with_reason() -> None:
    # kvm's API with nothing built behind it
    async with _with_runtime(ServiceSpec(name="kvm", descriptor=kvm.SPEC.descriptor)) as (
        runtime,
        channel,
    ):
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListVms(kvm_pb2.ListVmsRequest())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "snp.kvm.v1.KvmService/ListVms is not built yet" in (info.value.details() or "")
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "NOT_BUILT"
        assert detail.domain == "kvm.snpemu"
        call = stub.StreamTraceEvents(kvm_pb2.StreamTraceEventsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        labels = {
            "grpc_type": "unary",
            "grpc_service": "snp.kvm.v1.KvmService",
            "grpc_method": "ListVms",
        }
        reg = runtime.registry
        assert reg.get_sample_value("grpc_server_started_total", labels) == 1
        assert (
            reg.get_sample_value(
                "grpc_server_handled_total", {**labels, "grpc_code": "Unimplemented"}
            )
            == 1
        )
        stream_labels = {**labels, "grpc_type": "server_stream", "grpc_method": "StreamTraceEvents"}
        assert (
            reg.get_sample_value(
                "grpc_server_handled_total", {**stream_labels, "grpc_code": "Unimplemented"}
            )
            == 1
        )


class _FakeKvm:
    """A test implementation: two RPCs built, the rest left to the bootstrap."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()  # a GetVm with a vm.id reached the implementation
        self.release = asyncio.Event()

    async def ListVms(self, request: Any, context: Any) -> kvm_pb2.ListVmsResponse:
        return kvm_pb2.ListVmsResponse(vms=[kvm_pb2.VmInfo(asid=7)])

    async def GetVm(self, request: Any, context: Any) -> kvm_pb2.GetVmResponse:
        if not request.vm.id:
            raise errors.InvalidArgument(
                "vm.id is required", reason="MISSING_VM", metadata={"field": "vm.id"}
            )
        self.entered.set()
        await self.release.wait()
        return kvm_pb2.GetVmResponse()

    async def StreamTraceEvents(
        self, request: Any, context: Any
    ) -> AsyncIterator[kvm_pb2.StreamTraceEventsResponse]:
        for i in range(3):
            yield kvm_pb2.StreamTraceEventsResponse(name="kvm_vmgexit_enter", exit_code=i)
        raise errors.WrongState("trace buffer overrun", reason="OVERRUN")


def _fake_spec(impl: _FakeKvm) -> ServiceSpec:
    return ServiceSpec(name="kvm", descriptor=kvm.SPEC.descriptor, make_impl=lambda _rt: impl)


async def test_built_rpcs_and_error_mapping() -> None:
    impl = _FakeKvm()

    async with _with_runtime(_fake_spec(impl)) as (runtime, channel):
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        reply = await stub.ListVms(kvm_pb2.ListVmsRequest())
        assert [v.asid for v in reply.vms] == [7]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetVm(kvm_pb2.GetVmRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "vm.id is required"
        detail = error_info(info.value)
        assert detail is not None
        assert (detail.reason, dict(detail.metadata)) == ("MISSING_VM", {"field": "vm.id"})
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for event in stub.StreamTraceEvents(kvm_pb2.StreamTraceEventsRequest()):
                got.append(event.exit_code)
        assert got == [0, 1, 2]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reg = runtime.registry
        base = {"grpc_service": "snp.kvm.v1.KvmService"}
        assert (
            reg.get_sample_value(
                "grpc_server_handled_total",
                {**base, "grpc_type": "unary", "grpc_method": "ListVms", "grpc_code": "OK"},
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "grpc_server_handled_total",
                {
                    **base,
                    "grpc_type": "unary",
                    "grpc_method": "GetVm",
                    "grpc_code": "InvalidArgument",
                },
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "grpc_server_handled_total",
                {
                    **base,
                    "grpc_type": "server_stream",
                    "grpc_method": "StreamTraceEvents",
                    "grpc_code": "FailedPrecondition",
                },
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "grpc_server_handling_seconds_count",
                {**base, "grpc_type": "unary", "grpc_method": "ListVms"},
            )
            == 1
        )


async def test_metrics_endpoint_serves_the_registry() -> None:
    async with _with_runtime(psp.SPEC) as (runtime, channel):
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        url = f"http://127.0.0.1:{runtime.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Check",'
            'grpc_service="grpc.health.v1.Health",grpc_type="unary"} 1.0'
        ) in text
        # Every method of the service's API has its series from the start.
        for method in psp.SPEC.descriptor.methods:
            assert f'grpc_method="{method.name}",grpc_service="snp.psp.v1.PspService"' in text


async def test_graceful_stop_drains_in_flight_calls_and_reports_not_serving() -> None:
    """Stop says NOT_SERVING, refuses new calls, and lets a call already in its handler finish
    (within the shutdown grace, long here so that only a stop that cuts it off fails)."""
    impl = _FakeKvm()

    async def refused(address: str) -> bool:
        try:
            async with grpc.aio.insecure_channel(address) as fresh:
                await kvm_pb2_grpc.KvmServiceStub(fresh).ListVms(
                    kvm_pb2.ListVmsRequest(), timeout=1
                )
        except grpc.aio.AioRpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return True
        return False

    runtime = ServiceRuntime(_fake_spec(impl), _config("kvm", SNPEMU_SHUTDOWN_GRACE_S="60"))
    await runtime.start()
    async with grpc.aio.insecure_channel(runtime.address) as channel:
        stub = kvm_pb2_grpc.KvmServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="snp.kvm.v1.KvmService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(stub.GetVm(kvm_pb2.GetVmRequest(vm={"id": "vm-1"})))
        await asyncio.wait_for(impl.entered.wait(), 30)  # the call is in the handler
        stopping = asyncio.ensure_future(runtime.stop())
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream, too, would hold the stop for the whole grace
        # the server is shutting down (new calls refused) while the held call lives on
        deadline = asyncio.get_running_loop().time() + 30
        while not await refused(runtime.address):
            assert asyncio.get_running_loop().time() < deadline, "new calls still served"
        assert not in_flight.done() and not stopping.done()
        impl.release.set()
        assert isinstance(await in_flight, kvm_pb2.GetVmResponse)
        await stopping
    assert await refused(runtime.address)


async def test_busy_grpc_port_fails_loudly() -> None:
    first = ServiceRuntime(rmp.SPEC, _config("rmp"))
    await first.start()
    try:
        second = ServiceRuntime(rmp.SPEC, _config("rmp", SNPEMU_GRPC_PORT=str(first.grpc_port)))
        with pytest.raises(
            StartupError, match=f"cannot listen for gRPC on 127.0.0.1:{first.grpc_port}"
        ):
            await second.start()
        await second.stop()
    finally:
        await first.stop()


async def test_busy_metrics_port_fails_loudly() -> None:
    first = ServiceRuntime(rmp.SPEC, _config("rmp"))
    await first.start()
    try:
        second = ServiceRuntime(
            rmp.SPEC, _config("rmp", SNPEMU_METRICS_PORT=str(first.metrics_port))
        )
        with pytest.raises(StartupError, match="cannot listen for metrics"):
            await second.start()
        await second.stop()
    finally:
        await first.stop()


async def test_startup_work_runs_before_serving() -> None:
    seen: list[int] = []

    async def startup(_impl: object | None) -> None:
        # Still NOT_SERVING while start-up work runs.
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        seen.append(reply.status)

    spec = ServiceSpec(name="netd", descriptor=netd.SPEC.descriptor, startup=startup)
    runtime = ServiceRuntime(spec, _config("netd"))
    await runtime.start()
    await runtime.stop()
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_each_service_gets_its_own_registry() -> None:
    a = ServiceRuntime(rmp.SPEC, _config("rmp"))
    b = ServiceRuntime(rmp.SPEC, _config("rmp"))
    assert isinstance(a.registry, CollectorRegistry) and a.registry is not b.registry


async def test_cancelled_calls_are_counted_as_canceled() -> None:
    impl = _FakeKvm()

    async with _with_runtime(_fake_spec(impl)) as (runtime, channel):
        call = kvm_pb2_grpc.KvmServiceStub(channel).GetVm(kvm_pb2.GetVmRequest(vm={"id": "v"}))
        await asyncio.wait_for(impl.entered.wait(), 30)  # cancelled in the handler, not before
        call.cancel()
        labels = {
            "grpc_type": "unary",
            "grpc_service": "snp.kvm.v1.KvmService",
            "grpc_method": "GetVm",
            "grpc_code": "Canceled",
        }
        await eventually(
            lambda: runtime.registry.get_sample_value("grpc_server_handled_total", labels) == 1
        )
