"""psp across real processes: grpcurl firmware commands with their status codes, the KDS
endpoint, and an identity that survives the process being killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest
from cryptography import x509
from snp.psp.v1 import psp_pb2, psp_pb2_grpc
from snpemu.launcher.supervisor import grpc_health
from snpemu.rmp.client import credential_metadata, read_credential

from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.cluster


def grpcurl(
    cluster: Cluster, method: str, body: dict[str, object] | None = None, *flags: str
) -> subprocess.CompletedProcess[str]:
    return cluster.grpcurl(
        *flags,
        *("-d", json.dumps(body or {}), cluster.address("psp")),
        f"snp.psp.v1.PspService/{method}",
        timeout=30,
    )


def answer(cluster: Cluster, method: str, body: dict[str, object] | None = None) -> object:
    """A call that must succeed: grpcurl's exit status 0 and its whole response, every field
    spelled out (-emit-defaults), so a zero field is there to compare, not merely absent."""
    out = grpcurl(cluster, method, body, "-emit-defaults")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_grpcurl_drives_firmware_commands(cluster: Cluster) -> None:
    # kvm brought the platform up at start (SNP_INIT, DF_FLUSH, legacy INIT)
    again = grpcurl(cluster, "SnpInit")
    assert again.returncode != 0
    assert (
        "Code: FailedPrecondition" in again.stderr
        and "INVALID_PLATFORM_STATE (0x01)" in again.stderr
    )
    assert '"fw_status":"0x0001"' in again.stderr
    status = answer(cluster, "SevPlatformStatus")
    assert isinstance(status, dict)
    assert status["api_major"] == 1 and status["api_minor"] == 55
    assert status["state"] == "PLATFORM_STATE_INIT"
    # a context page must be a firmware page: page 1 is a hypervisor page
    bad = grpcurl(cluster, "GctxCreate", {"gctx_paddr": 4096 * 4000})
    assert bad.returncode != 0
    assert "INVALID_PAGE_STATE (0x1a)" in bad.stderr and '"fw_status":"0x001a"' in bad.stderr
    # no optional feature is emulated: every register of leaf 0 reads zero
    assert answer(cluster, "SnpFeatureInfo") == {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0}


def test_kds_serves_the_chain(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{cluster.config.kds_port}/vcek/v1/Milan/cert_chain"
    with urllib.request.urlopen(url, timeout=10) as reply:
        chain = x509.load_pem_x509_certificates(reply.read())
    assert len(chain) == 2


def test_identity_survives_a_psp_restart(cluster: Cluster) -> None:
    md = credential_metadata(read_credential(cluster.state_dir))
    with grpc.insecure_channel(cluster.address("psp")) as ch:
        before = psp_pb2_grpc.PspServiceStub(ch).GetCertificates(
            psp_pb2.GetCertificatesRequest(), metadata=md
        )
    state = {c["name"]: c for c in cluster.state()["children"]}
    os.kill(state["psp"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        restarted = {c["name"]: c for c in cluster.state()["children"]}["psp"]
        if (
            restarted["restarts"] == 1
            and grpc_health(cluster.address("psp"), "snp.psp.v1.PspService") == "SERVING"
        ):
            break
        time.sleep(0.2)
    with grpc.insecure_channel(cluster.address("psp")) as ch:
        after = psp_pb2_grpc.PspServiceStub(ch).GetCertificates(
            psp_pb2.GetCertificatesRequest(), metadata=md
        )
    assert (after.chip_id, after.ark_der, after.vcek_der) == (
        before.chip_id,
        before.ark_der,
        before.vcek_der,
    )
