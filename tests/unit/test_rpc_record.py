"""The run-time check behind `@pytest.mark.rpc`: a marker whose call the test did not make (or
did not see end that way) fails the test. Each case runs a small test file in its own pytest
with tests/conftest.py's hook, against a real rmp service on port 0."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from tests import rpc_record
from tests.conftest import ROOT

HEADER = """
import asyncio

import grpc
import pytest
import pytest_asyncio
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc
from snpemu import rmp
from snpemu.rmp.client import RmpUserWriter
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime

CRED = "unit-credential-0123456789"
HOST = (("x-snpemu-host-credential", CRED),)
INFO = "snp.rmp.v1.RmpService/GetPlatformInfo"


async def serve(body):
    env = {"SNPEMU_GRPC_PORT": "0", "SNPEMU_METRICS_PORT": "0",
           "SNPEMU_HOST_CREDENTIAL": CRED, "SNPEMU_SHUTDOWN_GRACE_S": "0"}
    rt = ServiceRuntime(rmp.SPEC, ServiceConfig.from_env("rmp", env),
                        rmp.SPEC.options({"SNPEMU_RMP_MEMORY": "64M"}))
    await rt.start()
    try:
        async with grpc.aio.insecure_channel(rt.address) as ch:
            await body(rmp_pb2_grpc.RmpServiceStub(ch), rt)
    finally:
        await rt.stop()


def with_rmp(body):
    asyncio.run(serve(body))


@pytest_asyncio.fixture
async def rmp_stub():
    # the channel opened by a fixture, before the test function runs: still the test's
    env = {"SNPEMU_GRPC_PORT": "0", "SNPEMU_METRICS_PORT": "0",
           "SNPEMU_HOST_CREDENTIAL": CRED, "SNPEMU_SHUTDOWN_GRACE_S": "0"}
    rt = ServiceRuntime(rmp.SPEC, ServiceConfig.from_env("rmp", env),
                        rmp.SPEC.options({"SNPEMU_RMP_MEMORY": "64M"}))
    await rt.start()
    try:
        async with grpc.aio.insecure_channel(rt.address) as ch:
            yield rmp_pb2_grpc.RmpServiceStub(ch)
    finally:
        await rt.stop()


async def info_ok(stub, rt):
    await stub.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)


async def info_denied(stub, rt):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest())
    assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
"""


def run_inner(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import (  # noqa\n"
        "    pytest_runtest_call, pytest_runtest_setup, pytest_runtest_teardown,\n"
        ")\n"
    )
    (tmp_path / "test_inner.py").write_text(HEADER + textwrap.dedent(body))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT)]),
    }
    env.pop("SNPEMU_RPC_RECORD", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_claim_the_test_bears_out_passes(tmp_path: Path) -> None:
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc(INFO, "ok")
        def test_ok():
            with_rmp(info_ok)

        @pytest.mark.rpc(INFO, "error")
        def test_error():
            with_rmp(info_denied)

        @pytest.mark.rpc(INFO, "ok", "error")
        def test_both():
            async def body(stub, rt):
                await info_ok(stub, rt)
                await info_denied(stub, rt)
            with_rmp(body)

        @pytest.mark.rpc(INFO, "ok")
        @pytest.mark.asyncio
        async def test_through_an_async_fixture(rmp_stub):
            await info_ok(rmp_stub, None)
        """,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 passed" in out.stdout


def test_an_error_claim_on_a_test_that_only_succeeds_fails(tmp_path: Path) -> None:
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc(INFO, "error")
        def test_claims_error():
            with_rmp(info_ok)
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "rpc markers claim calls this test did not make: "
        "snp.rmp.v1.RmpService/GetPlatformInfo error" in out.stdout
    )
    # what it did see is shown
    assert "('snp.rmp.v1.RmpService/GetPlatformInfo', 'StatusCode.OK', 0)" in out.stdout


def test_an_ok_claim_on_a_refused_call_fails(tmp_path: Path) -> None:
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc(INFO, "ok")
        def test_claims_ok():
            with_rmp(info_denied)
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "did not make: snp.rmp.v1.RmpService/GetPlatformInfo ok" in out.stdout


def test_a_claim_for_a_method_never_called_fails(tmp_path: Path) -> None:
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc("snp.rmp.v1.RmpService/Wbinvd", "ok")
        def test_other_method():
            with_rmp(info_ok)
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "did not make: snp.rmp.v1.RmpService/Wbinvd ok" in out.stdout


def test_a_call_a_service_module_makes_is_not_the_tests(tmp_path: Path) -> None:
    """snpemu.rmp.client (services/) opens its own channel: its HostWrite is not recorded."""
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc("snp.rmp.v1.RmpService/HostWrite", "ok")
        def test_through_a_service_client():
            async def body(stub, rt):
                writer = RmpUserWriter(rt.address, CRED, "unit")
                pfn = (await stub.AllocatePages(
                    rmp_pb2.AllocatePagesRequest(count=1, placement=rmp_pb2.PLACEMENT_ANY),
                    metadata=HOST)).pfns[0]
                reply = await asyncio.to_thread(writer.write, pfn << 12, b"x")
                writer.close()
                assert reply.outcome == rmp_pb2.VIOLATION_OUTCOME_NONE
            with_rmp(body)
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "did not make: snp.rmp.v1.RmpService/HostWrite ok" in out.stdout


def test_markers_naming_no_rpc_or_no_outcome_fail(tmp_path: Path) -> None:
    out = run_inner(
        tmp_path,
        """
        @pytest.mark.rpc("snp.rmp.v1.RmpService/NoSuchMethod", "ok")
        def test_unknown():
            with_rmp(info_ok)

        @pytest.mark.rpc(INFO, "fine")
        def test_bad_outcome():
            with_rmp(info_ok)
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "methods that do not exist: ['snp.rmp.v1.RmpService/NoSuchMethod']" in out.stdout
    assert "rpc(method, 'ok' | 'error' | 'unbuilt', ...)" in out.stdout
    assert "2 failed" in out.stdout


def test_outcomes_of_calls() -> None:
    """Which ends count: OK; a caller error; a stream that answered before the client hung up;
    a session's in-band error."""
    c = rpc_record.Call
    assert c("m", grpc.StatusCode.OK).outcomes() == {rpc_record.OK}
    assert c("m", grpc.StatusCode.NOT_FOUND).outcomes() == {rpc_record.ERROR}
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        assert c("m", code).outcomes() == set()
    assert c("m", grpc.StatusCode.CANCELLED).outcomes() == set()
    assert c("m", grpc.StatusCode.UNIMPLEMENTED).outcomes() == {rpc_record.UNBUILT}
    held = c("m", grpc.StatusCode.CANCELLED, responses=1, response_stream=True)
    assert held.outcomes() == {rpc_record.OK}
    assert c("m", None, responses=0, response_stream=True).outcomes() == set()

    from snp.rmp.v1 import rmp_pb2

    session = c("m", grpc.StatusCode.OK, response_stream=True)
    session.seen(rmp_pb2.FirmwareSessionResponse(error=rmp_pb2.SessionError(code=9)))
    assert session.outcomes() == {rpc_record.OK, rpc_record.ERROR}
    # an in-band error alone, then the client hung up: no success seen
    failed = c("m", grpc.StatusCode.CANCELLED, response_stream=True)
    failed.seen(rmp_pb2.FirmwareSessionResponse(error=rmp_pb2.SessionError(code=3)))
    assert failed.outcomes() == {rpc_record.ERROR}
    internal = c("m", None, response_stream=True)
    internal.seen(rmp_pb2.FirmwareSessionResponse(error=rmp_pb2.SessionError(code=13)))
    assert internal.outcomes() == set()


@pytest.mark.parametrize(
    ("argv", "rc", "seen"),
    [
        (["/x/grpcurl", "-plaintext", "-d", "{}", "h:1", "snp.kvm.v1.KvmService/GetVm"], 0, "ok"),
        # 64 + NOT_FOUND (5)
        (["grpcurl", "-plaintext", "h:1", "snp.kvm.v1.KvmService/GetVm"], 69, "error"),
        # no connection: exit 1, no status
        (["grpcurl", "-plaintext", "h:1", "snp.kvm.v1.KvmService/GetVm"], 1, None),
        (["grpcurl", "-plaintext", "h:1", "describe", "snp.kvm.v1.KvmService.GetVm"], 0, None),
    ],
)
def test_grpcurl_runs_are_read_by_exit_status(argv: list[str], rc: int, seen: str | None) -> None:
    rec = rpc_record.Recording()
    rpc_record.record_grpcurl(rec, argv, rc)
    expected = set() if seen is None else {("snp.kvm.v1.KvmService/GetVm", seen)}
    assert rec.outcomes() == expected


async def test_the_real_grpcurl_is_recorded_by_its_exit_status() -> None:
    """grpcurl run from test code: its exit status (64 + the code; 80 = UNAUTHENTICATED)."""
    import asyncio

    from snpemu import rmp
    from snpemu.runtime.config import ServiceConfig
    from snpemu.runtime.server import ServiceRuntime

    from tests.conftest import tool

    cred = "grpcurl-credential-0123456789"
    method = "snp.rmp.v1.RmpService/GetPlatformInfo"

    async def main() -> list[int]:
        env = {
            "SNPEMU_GRPC_PORT": "0",
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_HOST_CREDENTIAL": cred,
            "SNPEMU_SHUTDOWN_GRACE_S": "0",
        }
        rt = ServiceRuntime(
            rmp.SPEC,
            ServiceConfig.from_env("rmp", env),
            rmp.SPEC.options({"SNPEMU_RMP_MEMORY": "64M"}),
        )
        await rt.start()
        try:

            def both() -> list[int]:
                codes = []
                for header in ([], ["-H", f"x-snpemu-host-credential: {cred}"]):
                    argv = [tool("grpcurl"), "-plaintext", *header, rt.address, method]
                    codes.append(subprocess.run(argv, capture_output=True, timeout=60).returncode)
                return codes

            return await asyncio.to_thread(both)
        finally:
            await rt.stop()

    with rpc_record.recording() as rec:
        codes = await main()
    assert codes == [64 + 16, 0]
    assert rec.outcomes() == {(method, rpc_record.ERROR), (method, rpc_record.OK)}
