"""Guest agents across real processes: both guests of `make up` boot from Debian's OVMF, a report
asked for with grpcurl verifies with snpemu-verify against the root psp's KDS endpoint serves, a
tampered report does not, and Prometheus scrapes the agents."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from snpemu.rmp.client import read_credential
from snpemu.runtime.credentials import vmm_credential
from snpemu.runtime.servicer import CREDENTIAL_HEADER

from tests.cluster.conftest import Cluster
from tests.conftest import sev_snp_measure, tool
from tests.fidelity.verifiers import secretvm

pytestmark = pytest.mark.cluster


def grpcurl(
    cluster: Cluster, guest: str, method: str, body: dict[str, object]
) -> dict[str, object]:
    # the guest agent's RPCs are the guest's own: no host credential
    out = cluster.grpcurl(
        *("-d", json.dumps(body), cluster.address(guest)),
        f"snp.guest.v1.GuestService/{method}",
        host=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_running(cluster: Cluster, guest: str) -> dict[str, object]:
    deadline = time.monotonic() + 300
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = grpcurl(cluster, guest, "GetStatus", {})
        if status.get("state") in ("BOOT_STATE_RUNNING", "BOOT_STATE_TERMINATED"):
            break
        time.sleep(1)
    assert status.get("state") == "BOOT_STATE_RUNNING", status
    return status


def prometheus_value(cluster: Cluster, query: str, want: str) -> str:
    deadline = time.monotonic() + 60
    value = ""
    while time.monotonic() < deadline:
        result = cluster.query(query, timeout=5)
        value = result[0]["value"][1] if result else ""
        if value == want:
            break
        time.sleep(1)
    return value


def agents_metric(cluster: Cluster, sample: str, **labels: str) -> int:
    """A sample summed over both agents' own /metrics pages."""
    return int(sum(cluster.metric(g, sample, **labels) for g in ("guest-0", "guest-1")))


def test_guests_boot_and_their_reports_verify(prometheus: Cluster, tmp_path: Path) -> None:
    cluster = prometheus
    for guest in ("guest-0", "guest-1"):
        status = wait_running(cluster, guest)
        assert status["vcpus"] == 2 and status["memory_bytes"] == str(256 << 20)
    reports = {"msg_type": "report", "result": "success"}
    reports_before = agents_metric(cluster, "snp_guest_agent_requests_total", **reports)
    nonce = bytes(range(64))
    ext = grpcurl(
        cluster,
        "guest-0",
        "GetExtendedReport",
        {"report_data": base64.b64encode(nonce).decode(), "certs_pages": 4},
    )
    fields = ext["fields"]
    assert isinstance(fields, dict) and base64.b64decode(fields["report_data"]) == nonce
    report = base64.b64decode(ext["report"])  # type: ignore[arg-type]
    (tmp_path / "report.bin").write_bytes(report)
    (tmp_path / "certs.bin").write_bytes(base64.b64decode(ext["certs_blob"]))  # type: ignore[arg-type]
    kds = f"http://127.0.0.1:{cluster.config.kds_port}/vcek/v1/Milan/cert_chain"
    with urllib.request.urlopen(kds, timeout=10) as reply:
        (tmp_path / "chain.pem").write_bytes(reply.read())

    def verify(report_file: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                tool("snpemu-verify"),
                str(tmp_path / report_file),
                str(tmp_path / "certs.bin"),
                "--ark",
                str(tmp_path / "chain.pem"),
                "--report-data",
                nonce.hex(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = verify("report.bin")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK  : report signature verifies with the VCEK" in good.stdout
    tampered = bytearray(report)
    tampered[0x90] ^= 1  # one bit of MEASUREMENT
    (tmp_path / "tampered.bin").write_bytes(bytes(tampered))
    bad = verify("tampered.bin")
    assert bad.returncode == 1
    assert "FAIL: report signature verifies with the VCEK" in bad.stdout

    # a third-party verifier agrees (secretvm-verify, pinned to the emulated ARK and fed the
    # certificates the guest got and the CRL psp's KDS endpoint serves)
    evidence = {
        str(c["guid"]): base64.b64decode(c["der"])
        for c in ext["certificates"]  # type: ignore[attr-defined]
    }
    with urllib.request.urlopen(kds.replace("cert_chain", "crl"), timeout=10) as reply:
        evidence["crl"] = reply.read()
    ok, res = secretvm(evidence, report, tmp_path / "secretvm")
    assert ok, res
    # the measurement is sev-snp-measure's prediction for the guest's config (the launcher's
    # defaults: Debian's OVMF, 2 EPYC-Milan vCPUs)
    expected = sev_snp_measure()
    assert base64.b64decode(fields["measurement"]).hex() == expected

    # the two guests are different VMs: different ASID-bound keys, same firmware measurement
    other = grpcurl(cluster, "guest-1", "GetReport", {"report_data": ""})["fields"]
    assert isinstance(other, dict) and other["measurement"] == fields["measurement"]
    assert other["report_id"] != fields["report_id"]

    assert prometheus_value(cluster, 'sum(snp_guest_agent_state{state="running"})', "2") == "2"
    # the two reports of this test, on top of what the agents had answered before it
    query = 'sum(snp_guest_agent_requests_total{msg_type="report",result="success"})'
    want = str(reports_before + 2)
    assert prometheus_value(cluster, query, want) == want


def test_a_tampered_sequence_number_costs_only_that_guest_its_key(own_cluster: Cluster) -> None:
    """On a launch of its own: the wiped VMPCK0 stays wiped for the life of guest-1's VM."""
    cluster = own_cluster
    for guest in ("guest-0", "guest-1"):
        wait_running(cluster, guest)
    r = grpcurl(cluster, "guest-1", "TamperSequenceNumber", {"offset": 5})
    assert "refused" in str(r["outcome"]) and "VMPCK0 wiped" in str(r["outcome"])
    refused = cluster.grpcurl(
        "-d", "{}", cluster.address("guest-1"), "snp.guest.v1.GuestService/GetReport", host=False
    )
    assert refused.returncode != 0 and "VMPCK0 is disabled" in refused.stderr
    assert grpcurl(cluster, "guest-1", "GetStatus", {})["disabled_vmpcks"] == [0]
    # the other guest is untouched
    assert "report" in grpcurl(cluster, "guest-0", "GetReport", {})
    assert "disabled_vmpcks" not in grpcurl(cluster, "guest-0", "GetStatus", {})


def test_guests_talk_through_netd_with_grpcurl(prometheus: Cluster) -> None:
    cluster = prometheus
    for guest in ("guest-0", "guest-1"):
        wait_running(cluster, guest)
        assert grpcurl(cluster, guest, "AttachNetDevice", {})["device_id"]
    delivered = int(cluster.metric("netd", "snp_netd_packets_total", result="delivered"))
    received = agents_metric(
        cluster, "snp_guest_agent_packets_total", direction="received", result="ok"
    )
    payload = b"hello from guest-0"
    sent = grpcurl(
        cluster,
        "guest-0",
        "SendPacket",
        {"destination_mac": "02:00:00:00:00:02", "payload": base64.b64encode(payload).decode()},
    )
    assert sent == {"result": "delivered"}
    got = grpcurl(cluster, "guest-1", "ReceivePackets", {})["packets"]
    assert got == [
        {"source_mac": "02:00:00:00:00:01", "payload": base64.b64encode(payload).decode()}
    ]
    listed = cluster.grpcurl(
        "-d", "{}", cluster.address("netd"), "snp.netd.v1.NetdService/ListDevices"
    )
    assert listed.returncode == 0, listed.stderr
    devices = {d["mac"]: d for d in json.loads(listed.stdout)["devices"]}
    assert devices["02:00:00:00:00:02"]["rx_packets"] == "1"  # uint64 as a JSON string
    # one packet more than before this test, each way
    query = 'sum(snp_netd_packets_total{result="delivered"})'
    assert prometheus_value(cluster, query, str(delivered + 1)) == str(delivered + 1)
    query = 'sum(snp_guest_agent_packets_total{direction="received",result="ok"})'
    assert prometheus_value(cluster, query, str(received + 1)) == str(received + 1)


def test_a_killed_agent_takes_its_vm_with_it(cluster: Cluster) -> None:
    """SIGKILL a guest agent (no DestroyVm): its HoldVm stream closes and kvm destroys the VM;
    the launcher restarts the agent, which boots a new VM. No VM is left behind."""

    def vm_ids() -> set[str]:
        out = cluster.grpcurl(cluster.address("kvm"), "snp.kvm.v1.KvmService/ListVms")
        assert out.returncode == 0, out.stderr
        return {v["vm"]["id"] for v in json.loads(out.stdout).get("vms", [])}

    for guest in ("guest-0", "guest-1"):
        wait_running(cluster, guest)
    before = vm_ids()
    assert len(before) == 2
    state = {c["name"]: c for c in cluster.state()["children"]}
    os.kill(state["guest-1"]["pid"], signal.SIGKILL)
    restarts = state["guest-1"]["restarts"] + 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        restarted = {c["name"]: c for c in cluster.state()["children"]}["guest-1"]
        if restarted["restarts"] == restarts and len(vm_ids() - before) == 1:
            break
        time.sleep(0.5)
    wait_running(cluster, "guest-1")
    after = vm_ids()
    assert len(after) == 2 and len(after & before) == 1, (before, after)


def test_one_guests_side_cannot_touch_another_guests_vm(cluster: Cluster) -> None:
    """Under the launcher: each agent has a VMM credential of its own and the owner's API is
    closed to everyone else, the host included."""
    vm0 = wait_running(cluster, "guest-0")["vm_id"]
    wait_running(cluster, "guest-1")
    # guest-1's VMM credential (derived here from the host's, as kvm checks it) names guest-0's
    # VM by its public id: refused, and the VM runs on
    own = vmm_credential(read_credential(cluster.state_dir), "guest-1")
    for method in ("DestroyVm", "GetVm", "LaunchVm"):
        out = cluster.grpcurl(
            "-H",
            f"{CREDENTIAL_HEADER}: {own}",
            *("-d", json.dumps({"vm": {"id": vm0}}), cluster.address("kvm")),
            f"snp.kvm.v1.KvmService/{method}",
            host=False,
        )
        assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
        assert "VM_TOKEN_MISSING" in out.stderr, out.stderr
    assert wait_running(cluster, "guest-0")["vm_id"] == vm0
    # a guest agent without its owner's credential, or with the host's, answers nothing
    for header in ([], ["-H", f"{CREDENTIAL_HEADER}: {read_credential(cluster.state_dir)}"]):
        out = cluster.grpcurl(
            *header,
            *("-d", "{}", cluster.address("guest-0")),
            "snp.guest.v1.GuestService/ReadMemory",
            host=False,
            owner=False,
        )
        assert out.returncode != 0 and "Unauthenticated" in out.stderr, out.stderr
