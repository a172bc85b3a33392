"""The whole virtual host as real processes, driven with the real grpcurl and Prometheus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from snpemu.launcher.plan import service_name_of
from snpemu.launcher.supervisor import grpc_health

from tests.cluster.conftest import (
    Cluster,
    launch_env,
    processes_with_marker,
    start_launcher,
)
from tests.conftest import tool
from tests.style.readme import not_built_from_readme

pytestmark = pytest.mark.cluster

NAMES = ["rmp", "psp", "kvm", "netd", "guest-0", "guest-1"]


def grpcurl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [tool("grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=30
    )
    if check and result.returncode != 0:
        pytest.fail(f"grpcurl {' '.join(args)} failed: {result.stderr}")
    return result


def test_banner_names_every_service_and_commands_to_try(prometheus: Cluster) -> None:
    cluster = prometheus
    text = "".join(cluster.output)
    assert "snpemu virtual host is up: 6 services" in text
    for name in NAMES:
        assert f"  {name:<10} {cluster.address(name)}" in text
    assert f"prometheus http://127.0.0.1:{cluster.config.prometheus_port}" in text
    assert f"-plaintext {cluster.address('rmp')} list" in text


@pytest.mark.parametrize("name", NAMES)
def test_grpcurl_list_shows_service_health_and_reflection(cluster: Cluster, name: str) -> None:
    listed = grpcurl(cluster.address(name), "list").stdout.split()
    assert sorted(listed) == sorted(
        [service_name_of(name), "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_grpcurl_health_check_is_serving(cluster: Cluster, name: str) -> None:
    for service in ("", service_name_of(name)):
        out = grpcurl(
            "-d",
            json.dumps({"service": service}),
            cluster.address(name),
            "grpc.health.v1.Health/Check",
        ).stdout
        assert json.loads(out) == {"status": "SERVING"}


def test_grpcurl_describe_uses_reflection(cluster: Cluster) -> None:
    out = grpcurl(cluster.address("kvm"), "describe", "snp.kvm.v1.KvmService.CreateVm").stdout
    assert (
        "rpc CreateVm ( .snp.kvm.v1.CreateVmRequest ) returns ( .snp.kvm.v1.CreateVmResponse )"
        in out
    )
    out = grpcurl(cluster.address("rmp"), "describe", "snp.rmp.v1.RmpEntry").stdout
    assert "bytes raw = 13;" in out
    out = grpcurl(
        cluster.address("rmp"), "describe", "snp.rmp.v1.ViolationPolicy.VIOLATION_POLICY_GMEM"
    ).stdout
    assert "VIOLATION_POLICY_GMEM = 4;" in out


def test_every_rpc_the_readme_lists_as_not_built_answers_unimplemented(cluster: Cluster) -> None:
    not_built = not_built_from_readme()
    for name in ("rmp", "psp", "kvm", "netd", "guest-0"):
        service = service_name_of(name)
        for method in not_built.get(service, []):
            result = grpcurl("-d", "{}", cluster.address(name), f"{service}/{method}", check=False)
            assert result.returncode != 0, f"{service}/{method} answered: {result.stdout}"
            assert "Code: Unimplemented" in result.stderr, (service, method, result.stderr)
            assert '"reason":"NOT_BUILT"' in result.stderr, (service, method, result.stderr)
    # the ioctl RPCs the README listed until they were built answer an empty request without a
    # credential as any built RPC does (refused), not UNIMPLEMENTED
    for method in ("SetMemoryRegion", "SnpLaunchStart", "CreateVcpu"):
        result = grpcurl(
            "-d", "{}", cluster.address("kvm"), f"snp.kvm.v1.KvmService/{method}", check=False
        )
        assert result.returncode != 0, result.stdout
        assert "Code: Unimplemented" not in result.stderr, (method, result.stderr)


def test_prometheus_scrapes_every_service(prometheus: Cluster) -> None:
    cluster = prometheus
    expected = {
        (
            ("guest" if n.startswith("guest-") else n),
            f"127.0.0.1:{cluster.config.endpoint(n).metrics_port}",
        )
        for n in NAMES
    }
    deadline = time.monotonic() + 60
    seen: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        seen = {
            (r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
            for r in cluster.query("up", timeout=5)
        }
        if set(seen) == expected and all(v == "1" for v in seen.values()):
            break
        time.sleep(1)
    assert set(seen) == expected
    assert all(v == "1" for v in seen.values()), seen
    # The standard gRPC families reach Prometheus from every service.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = {r["metric"]["job"] for r in cluster.query("grpc_server_handled_total", timeout=5)}
        if jobs == {"rmp", "psp", "kvm", "netd", "guest"}:
            break
        time.sleep(1)
    assert jobs == {"rmp", "psp", "kvm", "netd", "guest"}


def test_status_command_reports_every_service(cluster: Cluster) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snpemu.launcher", "status"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Prometheus is listed when this launch has one (it is optional, as for `make up`)
    monitoring = ["prometheus"] if cluster.prometheus_started else []
    assert [line.split()[0] for line in lines] == [*NAMES, *monitoring]
    assert all(" SERVING " in line for line in lines), lines


def test_a_service_that_dies_is_restarted(cluster: Cluster) -> None:
    before = {c["name"]: c for c in cluster.state()["children"]}
    os.kill(before["netd"]["pid"], signal.SIGKILL)
    restarts = before["netd"]["restarts"] + 1
    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline:
        after = {c["name"]: c for c in cluster.state()["children"]}
        if (
            after["netd"]["restarts"] == restarts
            and grpc_health(cluster.address("netd"), "snp.netd.v1.NetdService") == "SERVING"
        ):
            break
        time.sleep(0.2)
    assert after["netd"]["restarts"] == restarts
    assert after["netd"]["pid"] != before["netd"]["pid"]
    assert grpc_health(cluster.address("netd"), "snp.netd.v1.NetdService") == "SERVING"
    # Nobody else was touched.
    assert set(after) == set(before)
    for name in set(before) - {"netd"}:
        assert (after[name]["pid"], after[name]["restarts"]) == (
            before[name]["pid"],
            before[name]["restarts"],
        ), name


def test_stop_leaves_no_process_behind(own_cluster: Cluster) -> None:
    cluster = own_cluster
    pids = processes_with_marker(cluster.marker)
    # launcher + 6 services (+ Prometheus when this launch has one)
    assert len(pids) == 7 + cluster.prometheus_started, pids
    assert cluster.stop() == 0
    text = "".join(cluster.output)
    assert "SIGTERM received: stopping every service" in text
    assert processes_with_marker(cluster.marker) == []
    assert not (cluster.state_dir / "launcher.json").exists()
    for name in NAMES:
        assert (
            grpc_health(cluster.address(name), service_name_of(name), timeout=0.5) == "UNREACHABLE"
        )


def test_busy_port_fails_startup_clearly_and_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    env = launch_env(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(env["SNPEMU_KVM_GRPC_PORT"])))
    blocker.listen()
    try:
        proc = start_launcher(env, "--no-prometheus")
        out, _ = proc.communicate(timeout=120)
    finally:
        blocker.close()
    assert proc.returncode == 1, out
    assert "start-up failed: kvm exited with exit code 1" in out
    assert f"cannot listen for gRPC on 127.0.0.1:{env['SNPEMU_KVM_GRPC_PORT']}" in out
    assert processes_with_marker(env["SNPEMU_TEST_RUN"]) == []


def test_busy_prometheus_port_leaves_the_host_running_without_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    env = launch_env(tmp_path, SNPEMU_GUESTS="0")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(env["SNPEMU_PROMETHEUS_PORT"])))
    blocker.listen()
    proc = start_launcher(env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert "snpemu virtual host is up: 4 services" in text, text
        assert "Prometheus did not start" in text
        assert "prometheus not started (it failed to start" in text
        rmp = f"127.0.0.1:{env['SNPEMU_RMP_GRPC_PORT']}"
        assert grpc_health(rmp, "snp.rmp.v1.RmpService") == "SERVING"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        blocker.close()
    assert proc.returncode == 0
    assert processes_with_marker(env["SNPEMU_TEST_RUN"]) == []


def test_a_killed_launcher_takes_every_service_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL gives the launcher no chance to stop anything: each child dies with it
    (PR_SET_PDEATHSIG, set before exec by the spawn shim)."""
    env = launch_env(tmp_path, SNPEMU_GUESTS="1")
    proc = start_launcher(env, "--no-prometheus")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Ctrl-C"):
            break
    assert len(processes_with_marker(env["SNPEMU_TEST_RUN"])) >= 6  # launcher + 5 services
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while processes_with_marker(env["SNPEMU_TEST_RUN"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_marker(env["SNPEMU_TEST_RUN"]) == []
