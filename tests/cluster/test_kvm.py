"""kvm across real processes: bring-up at start, a VM created and launched with grpcurl from
Debian's OVMF, a guest request through kvm, psp and rmp, teardown, and Prometheus."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc
from snp.netd.v1 import netd_pb2_grpc
from snp.psp.v1 import psp_pb2_grpc
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu.rmp.client import read_credential

from tests.cluster.conftest import Cluster
from tests.conftest import ROOT, sev_snp_measure, tool
from tests.service.host_stack import Guest, Stack

pytestmark = pytest.mark.cluster
OVMF = "/usr/share/OVMF/OVMF_CODE.fd"


def grpcurl(
    cluster: Cluster, method: str, body: dict[str, object] | None = None
) -> dict[str, object]:
    out = cluster.grpcurl(
        *("-d", json.dumps(body or {}), cluster.address("kvm")), f"snp.kvm.v1.KvmService/{method}"
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_the_step_by_step_walk_through_measures_like_sev_snp_measure(cluster: Cluster) -> None:
    """The README's walk-through (scripts/launch-step-by-step.sh): the guest launched RPC by
    RPC with the real grpcurl, as QEMU launches it over KVM's ioctls."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "launch-step-by-step.sh"), OVMF, "256", "2"],
        env={
            **os.environ,
            "KVM": cluster.address("kvm"),
            "CREDENTIAL": str(cluster.state_dir / "host-credential"),
            "GRPCURL": tool("grpcurl"),
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    measurement, vm_id = out.stdout.split()
    assert measurement == sev_snp_measure(ovmf=OVMF, vcpus=2)
    info = grpcurl(cluster, "GetVm", {"vm": {"id": vm_id}})["vm"]
    assert info["state"] == "VM_STATE_RUNNING"  # type: ignore[index]
    slots = [m.get("slot", 0) for m in info["memslots"]]  # type: ignore[index]
    assert slots == [0, 1]  # (grpcurl leaves out a 0)
    assert grpcurl(cluster, "DestroyVm", {"vm": {"id": vm_id}}) == {}


def test_host_came_up_with_snp(cluster: Cluster) -> None:
    caps = grpcurl(cluster, "GetCapabilities")
    assert caps["snp_enabled"] is True and caps["firmware_api_minor"] == 55


def test_launch_with_grpcurl_measures_like_sev_snp_measure(cluster: Cluster) -> None:
    vm = grpcurl(
        cluster,
        "CreateVm",
        {
            "config": {
                "memory_bytes": str(256 << 20),
                "vcpus": 2,
                "vcpu_type": "VCPU_TYPE_EPYC_MILAN",
            }
        },
    )["vm"]
    launched = grpcurl(cluster, "LaunchVm", {"vm": vm})
    expected = sev_snp_measure()
    assert base64.b64decode(launched["measurement"]).hex() == expected  # type: ignore[arg-type]
    info = grpcurl(cluster, "GetVm", {"vm": vm})["vm"]
    assert info["state"] == "VM_STATE_RUNNING"  # type: ignore[index]
    assert grpcurl(cluster, "DestroyVm", {"vm": vm}) == {}


def test_a_gmem_vms_psc_reaches_the_vmm_with_grpcurl(cluster: Cluster) -> None:
    """The README's gmem VM with the real grpcurl: the guest's GHCB MSR PSC comes back as a
    KVM_HC_MAP_GPA_RANGE exit (KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc_msr()), the VMM
    sets the attributes and runs the vCPU, and the guest gets GHCB_MSR_PSC_RESP (0x15)."""
    vm = grpcurl(
        cluster,
        "CreateVm",
        {
            "config": {"memory_bytes": str(64 << 20), "vcpus": 1},
            "memory_model": "MEMORY_MODEL_GMEM",
        },
    )["vm"]
    assert grpcurl(cluster, "EnableCap", {"vm": vm, "cap": 201, "args": ["4096"]}) == {}
    ident = grpcurl(cluster, "LaunchVm", {"vm": vm})["vcpus"][0]  # type: ignore[index]
    gfn = 0x2000
    request = 2 << 52 | gfn << 12 | 0x14  # GHCB_MSR_PSC_REQ: gfn, SNP_PAGE_STATE_SHARED
    out = grpcurl(cluster, "VmgexitMsr", {"identity": ident, "ghcb_msr": str(request)})
    hc = out["exit"]["hypercall"]  # type: ignore[index]
    assert out["exit"]["exit_reason"] == 3 and hc["nr"] == "12"  # type: ignore[index]
    # args {gpa, 1 page, KVM_MAP_GPA_RANGE_DECRYPTED | 4K}
    assert hc["args"][:3] == [str(gfn << 12), "1", "0"]  # type: ignore[index]
    body = {"vm": vm, "address": str(gfn << 12), "size": "4096", "attributes": "0"}
    assert grpcurl(cluster, "SetMemoryAttributes", body) == {}
    done = grpcurl(cluster, "RunVcpu", {"vcpu": {"vm": vm, "vcpu_id": 0}})
    assert done["msr"]["ghcb_msr"] == str(0x15)  # type: ignore[index]
    assert grpcurl(cluster, "DestroyVm", {"vm": vm}) == {}


async def test_guest_request_across_processes(prometheus: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from snpemu.vmm import tiny_firmware

    cluster = prometheus
    labels = {"msg_type": "report", "result": "success"}
    want = str(int(cluster.metric("kvm", "snp_guest_requests_total", **labels)) + 1)

    fw = tmp_path / "tiny.fd"
    fw.write_bytes(tiny_firmware.build())
    cred = read_credential(cluster.state_dir)

    md = (("x-snpemu-host-credential", cred),)
    async with (
        grpc.aio.insecure_channel(cluster.address("rmp")) as rc,
        grpc.aio.insecure_channel(cluster.address("psp")) as pc,
        grpc.aio.insecure_channel(cluster.address("kvm")) as kc,
        grpc.aio.insecure_channel(cluster.address("netd")) as nc,
    ):
        stack = Stack(
            rmp_pb2_grpc.RmpServiceStub(rc),
            psp_pb2_grpc.PspServiceStub(pc),
            kvm_pb2_grpc.KvmServiceStub(kc),
            netd_pb2_grpc.NetdServiceStub(nc),
            {},
            fw,
        )
        # kvm reads no file outside its image directory: the firmware goes as bytes
        cfg = kvm_pb2.VmConfig(memory_bytes=64 << 20, vcpus=1, firmware=fw.read_bytes())
        vm = (await stack.kvm.CreateVm(kvm_pb2.CreateVmRequest(config=cfg), metadata=md)).vm
        r = await stack.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=vm), metadata=md)
        guest = Guest(stack, vm, list(r.vcpus), bytes(r.measurement))
        await guest.register_ghcb()
        res, _, payload = await guest.guest_request(b"Z" * 64 + bytes(32))
        assert res.sw_exit_info_2 == 0 and payload is not None
        await stack.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=vm), metadata=md)
        reported, measured = payload[0x20 + 0x90 : 0x20 + 0xC0], guest.measurement

    assert reported == measured
    # Prometheus scraped kvm's exit counters: one report more than before this test
    deadline = time.monotonic() + 60
    value = ""
    while time.monotonic() < deadline:
        result = cluster.query('snp_guest_requests_total{msg_type="report",result="success"}')
        value = result[0]["value"][1] if result else ""
        if value == want:
            break
        await asyncio.sleep(1)
    assert value == want
