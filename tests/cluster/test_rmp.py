"""rmp across real processes: grpcurl with the host credential, a user-mode writer process
that dies of SIGBUS under `sigbus` and survives under `gmem`, a kernel write that panics the
host, and 64 GiB of configured memory."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu.launcher.supervisor import grpc_health
from snpemu.rmp.client import credential_metadata, read_credential

from tests.cluster.conftest import Cluster
from tests.conftest import free_ports, tool

pytestmark = pytest.mark.cluster

_ASIDS = itertools.count(900)  # above the few ASIDs kvm gives the launch's guests


def grpcurl(cluster: Cluster, *args: str, cred: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.grpcurl(*args, host=cred, timeout=30)


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> rmp_pb2_grpc.RmpServiceStub:
    channel = grpc.insecure_channel(cluster.address("rmp"))
    return rmp_pb2_grpc.RmpServiceStub(channel)


@pytest.fixture(scope="module")
def host(cluster: Cluster) -> tuple[tuple[str, str], ...]:
    return credential_metadata(read_credential(cluster.state_dir))


@dataclass(frozen=True)
class Page:
    spa: int
    asid: int

    @property
    def pfn(self) -> int:
        return self.spa >> 12


def new_private_page(stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...]) -> Page:
    """A guest-private, validated page of an ASID of its own (what kvm and psp would have set
    up), holding "guest secret"."""
    asid = next(_ASIDS)
    (pfn,) = stub.AllocatePages(
        pb.AllocatePagesRequest(count=1, placement=pb.PLACEMENT_ANY), metadata=host
    ).pfns
    stub.UpdateNestedPageTable(
        pb.UpdateNestedPageTableRequest(
            asid=asid, map=[pb.NptMapping(gpa=0, first_pfn=pfn, npages=1)]
        ),
        metadata=host,
    )
    stub.InstallMemoryKey(
        pb.InstallMemoryKeyRequest(asid=asid, key=bytes(range(64))), metadata=host
    )
    ident = handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=f"vm-{asid}"), vcpu_id=0),
        asid=asid,
        token=bytes(32),
    )
    stub.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=ident), metadata=host)
    page = Page(int(pfn) << 12, asid)
    make_private(stub, host, page)
    v = stub.Pvalidate(
        pb.PvalidateRequest(identity=ident, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, validate=True)
    )
    assert v.result == pb.RMP_RESULT_SUCCESS
    stub.GuestWrite(pb.GuestWriteRequest(identity=ident, gpa=0, data=b"guest secret", private=True))
    return page


@pytest.fixture
def private_page(stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...]) -> Page:
    """A page of the test's own, so that no test depends on what another did to its page."""
    return new_private_page(stub, host)


def make_private(
    stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...], page: Page
) -> None:
    r = stub.RmpUpdate(
        pb.RmpUpdateRequest(
            spa=page.spa,
            state=pb.RmpState(
                gpa=0, assigned=True, page_size=types_pb2.PAGE_SIZE_4K, asid=page.asid
            ),
        ),
        metadata=host,
    )
    assert r.result == pb.RMP_RESULT_SUCCESS


def set_policy(
    stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...], policy: int
) -> None:
    stub.SetViolationPolicy(pb.SetViolationPolicyRequest(policy=policy), metadata=host)


def wait_for_log(cluster: Cluster, text: str, timeout: float = 30) -> None:
    log = cluster.state_dir / "logs" / "rmp.log"
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"rmp.log has no {text!r}"
        time.sleep(0.2)


def test_grpcurl_reads_the_platform_and_an_entry(cluster: Cluster, private_page: Page) -> None:
    out = grpcurl(cluster, cluster.address("rmp"), "snp.rmp.v1.RmpService/GetPlatformInfo")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["memory_bytes"] == str(8 << 30) and info["snp_capable"] is True
    assert info["iommu_mode"] == "IOMMU_MODE_TRANSLATED"
    out = grpcurl(
        cluster,
        "-d",
        json.dumps({"pfn": private_page.pfn}),
        cluster.address("rmp"),
        "snp.rmp.v1.RmpService/ReadRmpEntry",
    )
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)["entry"]
    assert entry["state"] == "PAGE_STATE_GUEST_VALID"
    assert entry["asid"] == private_page.asid and entry["validated"]
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


def run_writer(cluster: Cluster, page: Page) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            WRITER,
            cluster.address("rmp"),
            read_credential(cluster.state_dir),
            str(page.spa),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_user_writer_dies_of_sigbus_under_sigbus(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: Page,
) -> None:
    set_policy(stub, host, pb.VIOLATION_POLICY_SIGBUS)
    result = run_writer(cluster, private_page)
    assert result.returncode == -signal.SIGBUS, result
    assert "Fatal RMP page fault, terminating process" in result.stderr
    assert f"PFN 0x{private_page.pfn:x}, RMP entry: [" in result.stderr
    # rmp logged this violation (this page's) with the entry dump
    wait_for_log(cluster, f"user write by test-daemon to PFN 0x{private_page.pfn:x} under sigbus")


def read_page(
    stub: rmp_pb2_grpc.RmpServiceStub, host: tuple[tuple[str, str], ...], page: Page
) -> tuple[pb.RmpEntry, bytes]:
    """What a host can see of a page: its whole RMP entry (the raw 16 bytes too) and bytes."""
    entry = stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=page.pfn), metadata=host).entry
    data = stub.HostRead(pb.HostReadRequest(spa=page.spa, length=4096), metadata=host).data
    return entry, data


def test_user_writer_survives_under_gmem_and_nothing_changes(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: Page,
) -> None:
    set_policy(stub, host, pb.VIOLATION_POLICY_GMEM)
    before = read_page(stub, host, private_page)
    assert before[0].state == types_pb2.PAGE_STATE_GUEST_VALID and before[0].raw
    result = run_writer(cluster, private_page)
    assert result.returncode == 0, result
    assert result.stdout.startswith("refused: PFN")
    assert read_page(stub, host, private_page) == before


def test_prometheus_sees_rmp_families(
    prometheus: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: Page,
) -> None:
    """A user-mode violation under each of sigbus and gmem reaches Prometheus: one more of
    each than rmp counted before this test."""
    cluster = prometheus
    series = {"sigbus": "sigbus", "gmem": "refused"}
    before = {
        f"{policy}/{outcome}": cluster.metric(
            "rmp", "snp_rmp_violations_total", origin="user", policy=policy, outcome=outcome
        )
        for policy, outcome in series.items()
    }
    set_policy(stub, host, pb.VIOLATION_POLICY_SIGBUS)
    assert run_writer(cluster, private_page).returncode == -signal.SIGBUS
    set_policy(stub, host, pb.VIOLATION_POLICY_GMEM)
    assert run_writer(cluster, private_page).returncode == 0
    want = {k: str(int(v) + 1) for k, v in before.items()}
    deadline = time.monotonic() + 60
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        result = cluster.query('snp_rmp_violations_total{origin="user"}', timeout=5)
        seen = {f"{r['metric']['policy']}/{r['metric']['outcome']}": r["value"][1] for r in result}
        if all(seen.get(k) == v for k, v in want.items()):
            break
        time.sleep(1)
    assert {k: seen.get(k) for k in want} == want, seen


def test_convert_and_convert_kill_across_processes(
    cluster: Cluster,
    stub: rmp_pb2_grpc.RmpServiceStub,
    host: tuple[tuple[str, str], ...],
    private_page: Page,
) -> None:
    """Under convert the daemon-like writer survives and the page becomes shared; under
    convert-kill rmp also asks kvm (here the test, subscribed as kvm is) to terminate."""
    notes: list[pb.WatchMmuNotificationsResponse] = []
    watch = stub.WatchMmuNotifications(pb.WatchMmuNotificationsRequest(), metadata=host)

    def follow() -> None:
        try:
            for note in watch:
                notes.append(note)
                try:
                    stub.AcknowledgeMmuNotification(
                        pb.AcknowledgeMmuNotificationRequest(sequence=note.sequence),
                        metadata=host,
                    )
                except grpc.RpcError as e:  # kvm, subscribed too, may have acknowledged it
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
        except grpc.RpcError:
            pass  # the stream, cancelled at the end

    threading.Thread(target=follow, daemon=True).start()
    try:
        # The subscription is live once a kick reaches it: kick a probe page of another ASID
        # (convert-kill asks for one on every write) until the test sees it.
        probe = new_private_page(stub, host)
        set_policy(stub, host, pb.VIOLATION_POLICY_CONVERT_KILL)
        deadline = time.monotonic() + 30
        while not any(n.asid == probe.asid for n in notes):
            assert time.monotonic() < deadline, "the MMU-notification stream never delivered"
            make_private(stub, host, probe)
            assert run_writer(cluster, probe).returncode == 0
            wait = time.monotonic() + 2
            while not any(n.asid == probe.asid for n in notes) and time.monotonic() < wait:
                time.sleep(0.05)
        notes.clear()

        set_policy(stub, host, pb.VIOLATION_POLICY_CONVERT)
        result = run_writer(cluster, private_page)
        assert result.returncode == 0 and result.stdout.strip() == "wrote", result
        e = stub.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=private_page.pfn), metadata=host).entry
        assert e.state == types_pb2.PAGE_STATE_HYPERVISOR
        data = stub.HostRead(pb.HostReadRequest(spa=private_page.spa, length=12), metadata=host)
        assert data.data == b"daemon bytes"
        # make it private again (as kvm would on the guest's next fault) and try convert-kill
        make_private(stub, host, private_page)
        set_policy(stub, host, pb.VIOLATION_POLICY_CONVERT_KILL)
        result = run_writer(cluster, private_page)
        assert result.returncode == 0 and result.stdout.strip() == "wrote", result

        # the write under convert needed no kick (a plain guest page); this one asks for the
        # guest's termination, once (a late probe kick aside)
        def kicks() -> list[tuple[int, bool]]:
            return [(n.asid, n.terminate) for n in notes if n.asid != probe.asid]

        deadline = time.monotonic() + 10
        while not kicks() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kicks() == [(private_page.asid, True)]
    finally:
        watch.cancel()


@contextmanager
def standalone_rmp(
    memory: str, tmp: Path
) -> Iterator[tuple[rmp_pb2_grpc.RmpServiceStub, str, Path, int]]:
    """An rmp process of the test's own (no launcher, no host credential: every RPC open),
    serving; yields its stub, address, stderr log and pid."""
    grpc_port, metrics_port = free_ports(2)
    log = tmp / "rmp.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snpemu.rmp"],
            env={
                **os.environ,
                "SNPEMU_GRPC_PORT": str(grpc_port),
                "SNPEMU_METRICS_PORT": str(metrics_port),
                "SNPEMU_RMP_MEMORY": memory,
            },
            stderr=err,
            text=True,
        )
    try:
        address = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 60
        while grpc_health(address, "snp.rmp.v1.RmpService") != "SERVING":
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with grpc.insecure_channel(address) as ch:
            yield rmp_pb2_grpc.RmpServiceStub(ch), address, log, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_kernel_write_under_sigbus_panics_the_host(tmp_path: Path) -> None:
    """A host panic ends that host: the test panics an rmp of its own, not the launch's."""
    with standalone_rmp("1G", tmp_path) as (s, address, log, _pid):
        (pfn,) = s.AllocatePages(pb.AllocatePagesRequest(count=1, placement=pb.PLACEMENT_ANY)).pfns
        page = Page(int(pfn) << 12, next(_ASIDS))
        make_private(s, (), page)
        set_policy(s, (), pb.VIOLATION_POLICY_SIGBUS)
        r = s.HostWrite(
            pb.HostWriteRequest(
                spa=page.spa, data=b"kvm", origin=pb.ACCESS_ORIGIN_KERNEL, writer="kvm"
            )
        )
        assert r.outcome == pb.VIOLATION_OUTCOME_PANIC
        assert grpc_health(address, "snp.rmp.v1.RmpService") == "NOT_SERVING"
        out = subprocess.run(
            [tool("grpcurl"), "-plaintext", address, "snp.rmp.v1.RmpService/GetPlatformInfo"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0
        assert "Code: Unavailable" in out.stderr and "HOST_PANIC" in out.stderr
        text = log.read_text()
        assert "Kernel panic - not syncing: RMP violation by a kernel write" in text


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# The README's figure for 64 GiB configured (measured: 85.6 MiB with CPython 3.11, grpcio and
# numpy of pyproject.toml; about 72 MiB of it is the interpreter and libraries, the same with
# 8 GiB configured), plus 35 MiB for other builds of them. Touching the RMP up front would cost
# far more: each of its two 8-byte-per-page arrays (table.py lo and hi) is 128 MiB at 16 Mi
# pages, and the frames themselves 64 GiB.
README_RSS_MIB = 85
RSS_MARGIN_MIB = 35


def test_64_gib_configured_starts_and_answers(tmp_path: Path) -> None:
    with standalone_rmp("64G", tmp_path) as (s, _address, _log, pid):
        info = s.GetPlatformInfo(pb.GetPlatformInfoRequest())
        assert info.memory_bytes == 64 << 30 and info.max_pfn == (64 << 18) - 1
        last = s.ReadRmpEntry(pb.ReadRmpEntryRequest(pfn=info.max_pfn)).entry
        assert last.state == types_pb2.PAGE_STATE_HYPERVISOR
        # Nothing is allocated up front: the RMP of 16 Mi pages stays mostly untouched.
        rss = _rss_kib(pid)
        assert rss < (README_RSS_MIB + RSS_MARGIN_MIB) * 1024, f"{rss} KiB"


def test_readme_states_the_rss_the_test_holds_it_to() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"64 GiB starts in about {README_RSS_MIB} MiB" in " ".join(readme.split())
