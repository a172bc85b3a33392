"""Guest agent benchmark: boot to RUNNING (lazy and eager acceptance) next to the bare kvm launch
of the same VM, and report latency through the agent next to a plain round trip to it; rmp, psp,
kvm and the agents as separate processes, every limit measured in the same run.

    .venv/bin/python bench/guest_bench.py       # or: make bench
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from kvm_bench import MD, OVMF
from psp_bench import crypto_floor
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc
from snpemu.psp import report as signature
from snpemu.runtime.credentials import vmm_credential

from services import free_port, pct, start

CRED = MD[0][1]
MEMORY = 256 << 20


def launch_only(kvm_addr: str) -> float:
    with grpc.insecure_channel(kvm_addr) as ch:
        kvm = kvm_pb2_grpc.KvmServiceStub(ch)
        t = time.perf_counter()
        cfg = kvm_pb2.VmConfig(memory_bytes=MEMORY, vcpus=2, firmware_path=OVMF)
        vm = kvm.CreateVm(kvm_pb2.CreateVmRequest(config=cfg), metadata=MD).vm
        kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=vm), metadata=MD)
        seconds = time.perf_counter() - t
        kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=vm), metadata=MD)
        return seconds


def boot(
    common: dict[str, str], accept: str, index: int
) -> tuple[float, subprocess.Popen[bytes], str]:
    """Start an agent; seconds from SERVING (it boots in the background) to RUNNING."""
    port = free_port()
    host_only = {"SNPEMU_HOST_CREDENTIAL"}
    env = {
        **{k: v for k, v in common.items() if k not in host_only},
        # each agent its own VMM credential, never the host's
        "SNPEMU_VMM_CREDENTIAL": vmm_credential(CRED, f"guest-{index}"),
        "SNPEMU_INSTANCE": f"guest-{index}",
        "SNPEMU_GRPC_PORT": str(port),
        "SNPEMU_METRICS_PORT": str(free_port()),
        "SNPEMU_GUEST_MEMORY": "256M",
        "SNPEMU_GUEST_ACCEPT": accept,
    }
    t = time.perf_counter()
    proc = start("snpemu.guest", env, port, "snp.guest.v1.GuestService")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = guest_pb2_grpc.GuestServiceStub(ch)
        while True:
            st = stub.GetStatus(guest_pb2.GetStatusRequest())
            if st.state == guest_pb2.BOOT_STATE_RUNNING:
                return time.perf_counter() - t, proc, f"127.0.0.1:{port}"
            if st.state == guest_pb2.BOOT_STATE_TERMINATED:
                raise SystemExit(f"guest-{index} terminated: {list(st.events)[-1:]}")
            time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def main() -> int:
    assert Path(OVMF).exists(), "install Debian's ovmf (make install)"
    ports = {n: (free_port(), free_port()) for n in ("rmp", "psp", "kvm")}
    addrs = {n: f"127.0.0.1:{p[0]}" for n, p in ports.items()}
    with tempfile.TemporaryDirectory() as d:
        common = {
            "SNPEMU_HOST_CREDENTIAL": CRED,
            "SNPEMU_RMP_ADDR": addrs["rmp"],
            "SNPEMU_PSP_ADDR": addrs["psp"],
            "SNPEMU_KVM_ADDR": addrs["kvm"],
            "SNPEMU_KDS_PORT": "0",
            "SNPEMU_DATA_DIR": str(Path(d) / "data"),
        }
        procs = []
        try:
            for name, service, extra in (
                ("rmp", "snp.rmp.v1.RmpService", {"SNPEMU_RMP_MEMORY": "8G"}),
                ("psp", "snp.psp.v1.PspService", {}),
                ("kvm", "snp.kvm.v1.KvmService", {}),
            ):
                g_port, m_port = ports[name]
                env = {
                    **common,
                    **extra,
                    "SNPEMU_GRPC_PORT": str(g_port),
                    "SNPEMU_METRICS_PORT": str(m_port),
                }
                procs.append(start(f"snpemu.{name}", env, g_port, service))
            print(f"guest benchmark: rmp, psp, kvm and agents as processes, {os.cpu_count()} CPUs")

            launches = [launch_only(addrs["kvm"]) for _ in range(3)]
            base = statistics.median(launches)
            print(f"kvm launch alone, 2 vCPUs, 256 MiB, Debian OVMF: median {base:.2f} s")
            for accept in ("lazy", "eager"):
                times = []
                for i in range(3):
                    seconds, proc, _ = boot(common, accept, i)
                    times.append(seconds)
                    stop(proc)
                med = statistics.median(times)
                print(
                    f"agent start to RUNNING, {accept} acceptance: median {med:.2f} s "
                    f"(min {min(times):.2f}, max {max(times):.2f}); "
                    f"{med / base:.2f} x the bare launch"
                )

            _, proc, addr = boot(common, "lazy", 9)
            procs.append(proc)
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:"))
            print(f"agent RSS after boot (256 MiB guest, lazy): {rss:.0f} MiB   target <= 80 MiB")
            with grpc.insecure_channel(addr) as ch:
                stub = guest_pb2_grpc.GuestServiceStub(ch)
                rtt, rep = [], []
                for _ in range(200):
                    t = time.perf_counter()
                    stub.GetStatus(guest_pb2.GetStatusRequest())
                    rtt.append(time.perf_counter() - t)
                ext = stub.GetExtendedReport(guest_pb2.GetExtendedReportRequest())
                vcek = next(c.der for c in ext.certificates if c.guid == "vcek")
                key = x509.load_der_x509_certificate(vcek).public_key()
                assert isinstance(key, ec.EllipticCurvePublicKey)
                for i in range(200):
                    data = i.to_bytes(64, "little")
                    t = time.perf_counter()
                    r = stub.GetReport(guest_pb2.GetReportRequest(report_data=data))
                    ok = signature.verify(r.report, key) and r.fields.report_data == data
                    rep.append(time.perf_counter() - t)
                    assert ok, "a report did not verify"
                # reports per second: 8 callers at once for 3 s, each report verified
                done, stop_at = [0], time.perf_counter() + 3

                def caller() -> None:
                    while time.perf_counter() < stop_at:
                        r = stub.GetReport(guest_pb2.GetReportRequest(report_data=b"r"))
                        assert signature.verify(r.report, key)
                        done[0] += 1

                started = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda _: caller(), range(8)))
                per_s = done[0] / (time.perf_counter() - started)
            floor = statistics.median(crypto_floor())
            print(f"round trip to the agent (GetStatus): p50 {pct(rtt, 0.5) * 1e3:.2f} ms")
            print(
                f"GetReport through the agent to verified bytes (seal, GHCB exit, kvm, psp, open, "
                f"ECDSA verify): p50 {pct(rep, 0.5) * 1e3:.2f} ms, p99 {pct(rep, 0.99) * 1e3:.2f} "
                f"ms; crypto floor (P-384 sign + 2 AES-GCM) {floor * 1e3:.2f} ms; target p50 <= 2 "
                f"ms and <= 1.5 x (floor + the gRPC hops on the path)"
            )
            print(f"reports per second through one agent, 8 callers, throttle off: {per_s:.0f}")
        finally:
            for p in reversed(procs):
                stop(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
