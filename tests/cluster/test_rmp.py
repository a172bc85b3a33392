"""rmp across real processes: grpcurl with the host credential, a user-mode writer process
that dies of SIGBUS under `sigbus` and survives under `gmem`, a kernel write that panics the
host, and 64 GiB of configured memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu.launcher.supervisor import grpc_health
from snpemu.rmp.client import credential_metadata, read_credential

from tests.cluster.conftest import Cluster
from tests.conftest import free_ports

pytestmark = pytest.mark.cluster

ASID = 9


def grpcurl(cluster: Cluster, *args: str, cred: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.grpcurl(*args, host=cred, timeout=30)


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> rmp_pb2_grpc.RmpServiceStub:
    channel = grpc.insecure_channel(cluster.address("rmp"))
    return rmp_pb2_grpc.RmpServiceStub(channel)


@pytest.fixture(scope="module")
def host(cluster: Cluster) -> tuple[tuple[str, str], ...]:
    return credential_metadata(read_credential(cluster.state_dir))


@pytest.fixture(scope="module")
def private_page(stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...]) -> int:
    """A guest-private, validated page (what kvm and psp would have set up); returns its SPA."""
    (pfn,) = stub.AllocatePages(
        pb.AllocatePagesRequest(count=1, placement=pb.PLACEMENT_ANY), metadata=host
    ).pfns
    stub.UpdateNestedPageTable(
        pb.UpdateNestedPageTableRequest(
            asid=ASID, map=[pb.NptMapping(gpa=0, first_pfn=pfn, npages=1)]
        ),
        metadata=host,
    )
    stub.InstallMemoryKey(
        pb.InstallMemoryKeyRequest(asid=ASID, key=bytes(range(64))), metadata=host
    )
    ident = handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id="vm"), vcpu_id=0),
        asid=ASID,
        token=bytes(32),
    )
    stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=ident), metadata=host)
    r = stub.RmpUpdate(
        pb.RmpUpdateRequest(
            spa=pfn << 12,
            state=pb.RmpState(gpa=0, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=ASID),
        ),
        metadata=host,
    )
    assert r.result == pb.RMP_RESULT_SUCCESS
    v = stub.Pvalidate(
        pb.PvalidateRequest(identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, validate=True)
    )
    assert v.result == pb.RMP_RESULT_SUCCESS
    stub.GuestWrite(pb.GuestWriteRequest(identity=ident, gpa=0, data=b"guest secret", private=True))
    return int(pfn) << 12


def test_grpcurl_reads_the_platform_and_an_entry(cluster: Cluster, private_page: int) -> None:
    out = grpcurl(cluster, cluster.address("rmp"), "snp.rmp.v1.RmpService/GetPlatformInfo")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["memory_bytes"] == str(8 << 30) and info["snp_capable"] is True
    assert info["iommu_mode"] == "IOMMU_MODE_TRANSLATED"
    out = grpcurl(
        cluster,
        "-d",
        json.dumps({"pfn": private_page >> 12}),
        cluster.address("rmp"),
        "snp.rmp.v1.RmpService/ReadRmpEntry",
    )
    entry = json.loads(out.stdout)["entry"]
    assert (
        entry["state"] == "PAGE_STATE_GUEST_VALID" and entry["asid"] == ASID and entry["validated"]
    )
    denied = grpcurl(
        cluster, cluster.address("rmp"), "snp.rmp.v1.RmpService/GetPlatformInfo", cred=False
    )
    assert denied.returncode != 0 and "Code: Unauthenticated" in denied.stderr


WRITER = """
import sys
from snpemu.rmp.client import HostAccessRefused, RmpUserWriter
w = RmpUserWriter(sys.argv[1], sys.argv[2], "test-daemon")
try:
    w.write(int(sys.argv[3]), b"daemon bytes")
except HostAccessRefused as e:
    print("refused:", e.message)
    sys.exit(0)
print("wrote")
"""


def run_writer(cluster: Cluster, spa: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            WRITER,
            cluster.address("rmp"),
            read_credential(cluster.state_dir),
            str(spa),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_private(
    stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...], spa: int
) -> None:
    r = stub.RmpUpdate(
        pb.RmpUpdateRequest(
            spa=spa,
            state=pb.RmpState(gpa=0, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=ASID),
        ),
        metadata=host,
    )
    assert r.result == pb.RMP_RESULT_SUCCESS


def set_policy(
    stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...], policy: int
) -> None:
    stub.SetViolationPolicy(pb.SetViolationPolicyRequest(policy=policy), metadata=host)


def test_user_writer_dies_of_sigbus_under_sigbus(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: int,
) -> None:
    set_policy(stub, host, pb.VIOLATION_POLICY_SIGBUS)
    result = run_writer(cluster, private_page)
    assert result.returncode == -signal.SIGBUS, result
    assert "Fatal RMP page fault, terminating process" in result.stderr
    assert f"PFN 0x{private_page >> 12:x}, RMP entry: [" in result.stderr
    # rmp logged the violation with the entry dump
    log = (cluster.state_dir / "logs" / "rmp.log").read_text()
    assert '"event": "rmp_violation"' in log


def test_user_writer_survives_under_gmem_and_nothing_changes(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: int,
) -> None:
    set_policy(stub, host, pb.VIOLATION_POLICY_GMEM)
    before = stub.HostRead(pb.HostReadRequest(spa=private_page, length=4096), metadata=host).data
    result = run_writer(cluster, private_page)
    assert result.returncode == 0, result
    assert result.stdout.startswith("refused: PFN")
    assert (
        stub.HostRead(pb.HostReadRequest(spa=private_page, length=4096), metadata=host).data
        == before
    )


def test_prometheus_sees_rmp_families(cluster: Cluster) -> None:
    deadline = time.monotonic() + 60
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": 'snp_rmp_violations_total{origin="user"}'}
        )
        with urllib.request.urlopen(url, timeout=5) as reply:
            result = json.loads(reply.read())["data"]["result"]
        seen = {f"{r['metric']['policy']}/{r['metric']['outcome']}": r["value"][1] for r in result}
        if seen.get("sigbus/sigbus") == "1" and seen.get("gmem/refused") == "1":
            break
        time.sleep(1)
    assert seen.get("sigbus/sigbus") == "1" and seen.get("gmem/refused") == "1", seen


def test_convert_and_convert_kill_across_processes(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: int,
) -> None:
    """Under convert the daemon-like writer survives and the page becomes shared; under
    convert-kill rmp also asks kvm (here the test, subscribed as kvm will be) to terminate."""
    import threading

    notes: list[pb.WatchMmuNotificationsResponse] = []
    watch = stub.WatchMmuNotifications(pb.WatchMmuNotificationsRequest(), metadata=host)

    def follow() -> None:
        try:
            for note in watch:
                notes.append(note)
                stub.AcknowledgeMmuNotification(
                    pb.AcknowledgeMmuNotificationRequest(sequence=note.sequence), metadata=host
                )
        except grpc.RpcError:
            pass

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    set_policy(stub, host, pb.VIOLATION_POLICY_CONVERT)
    result = run_writer(cluster, private_page)
    assert result.returncode == 0 and result.stdout.strip() == "wrote", result
    e = stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=private_page >> 12), metadata=host).entry
    assert e.state == types_pb2.PAGE_STATE_HYPERVISOR
    assert stub.HostRead(pb.HostReadRequest(spa=private_page, length=12), metadata=host).data == (
        b"daemon bytes"
    )
    assert notes == []  # a plain guest page needs no kick
    # make it private again (as kvm would on the guest's next fault) and try convert-kill
    make_private(stub, host, private_page)
    set_policy(stub, host, pb.VIOLATION_POLICY_CONVERT_KILL)
    result = run_writer(cluster, private_page)
    assert result.returncode == 0 and result.stdout.strip() == "wrote", result
    deadline = time.monotonic() + 10
    while not notes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(n.asid, n.terminate) for n in notes] == [(ASID, True)]
    watch.cancel()


def test_kernel_write_under_sigbus_panics_the_host(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: int,
) -> None:
    # the convert tests left the page shared: make it the guest's again
    make_private(stub, host, private_page)
    set_policy(stub, host, pb.VIOLATION_POLICY_SIGBUS)
    r = stub.HostWrite(
        pb.HostWriteRequest(
            spa=private_page, data=b"kvm", origin=pb.ACCESS_ORIGIN_KERNEL, writer="kvm"
        ),
        metadata=host,
    )
    assert r.outcome == pb.VIOLATION_OUTCOME_PANIC
    assert grpc_health(cluster.address("rmp"), "snp.rmp.v1.RmpService") == "NOT_SERVING"
    out = grpcurl(cluster, cluster.address("rmp"), "snp.rmp.v1.RmpService/GetPlatformInfo")
    assert "Code: Unavailable" in out.stderr and "HOST_PANIC" in out.stderr
    log = (cluster.state_dir / "logs" / "rmp.log").read_text()
    assert "Kernel panic - not syncing: RMP violation by a kernel write" in log


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_64_gib_configured_starts_and_answers() -> None:
    grpc_port, metrics_port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snpemu.rmp"],
        env={
            **os.environ,
            "SNPEMU_GRPC_PORT": str(grpc_port),
            "SNPEMU_METRICS_PORT": str(metrics_port),
            "SNPEMU_RMP_MEMORY": "64G",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 60
        while grpc_health(address, "snp.rmp.v1.RmpService") != "SERVING":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        with grpc.insecure_channel(address) as ch:
            s = rmp_pb2_grpc.RmpServiceStub(ch)
            info = s.GetPlatformInfo(pb.GetPlatformInfoRequest())
            assert info.memory_bytes == 64 << 30 and info.max_pfn == (64 << 18) - 1
            last = s.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=info.max_pfn)).entry
            assert last.state == types_pb2.PAGE_STATE_HYPERVISOR
        # Nothing is allocated up front: the RMP of 16 Mi pages stays mostly untouched.
        assert _rss_kib(proc.pid) < 400 * 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
