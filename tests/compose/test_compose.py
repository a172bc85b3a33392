"""`docker compose up`, for real: the project's own docker-compose.yml and Dockerfile under
Debian's podman and docker-compose, on an internal network, driven from the host with grpcurl
and checked through the compose Prometheus; then `down` leaves nothing behind.

An internal network forwards no published port (podman's netavark sets none up, and Docker
does the same), so the host reaches each service on the network's bridge at the port compose
publishes, and the test checks that the engine bound each published port as compose asks.

Run alone with `make test-compose` (root: podman runs rootful here). A cold run builds two
Debian base images with mmdebstrap (about a minute); later local runs reuse them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.compose.engine import PROMETHEUS, PYTHON_BASE, Podman, missing_tools
from tests.conftest import ROOT, tool
from tests.style.compose_file import compose_file

pytestmark = pytest.mark.compose

PROJECT = "snpemu-compose-test"
NETWORK = f"{PROJECT}_default"
OVERRIDE = ROOT / "tests/compose/internal.yml"
# the services `docker compose up` starts (Grafana is behind the `grafana` profile)
SERVICES = ["rmp", "psp", "kvm", "netd", "guest-0", "guest-1", "prometheus"]
GRPC = {"rmp": "RmpService", "psp": "PspService", "kvm": "KvmService", "netd": "NetdService"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Host:
    podman: Podman
    workdir: Path
    ports: dict[str, list[int]]  # service -> its container ports (published on the same numbers)
    addresses: dict[str, str] = field(default_factory=dict)  # service -> address on NETWORK
    down_done: bool = False

    def at(self, service: str, index: int = 0) -> str:
        """Where the host reaches a service's port: its address on the internal network (which
        forwards no published port) and the container port compose publishes."""
        return f"{self.addresses[service]}:{self.ports[service][index]}"

    @staticmethod
    def compose_command() -> list[str]:
        """The project's own compose file, with the test's internal network."""
        return ["docker-compose", "-p", PROJECT, "-f", "docker-compose.yml", "-f", str(OVERRIDE)]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose_command(), *args],
            cwd=self.workdir,
            env=self.podman.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def grpcurl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60
        )

    def down(self) -> subprocess.CompletedProcess[str]:
        self.down_done = True
        return self.compose("down", "--volumes", "--remove-orphans")


def project_copy(dest: Path) -> None:
    """The project as a checkout has it (tracked and new files, nothing ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())


def published(services: dict[str, Any]) -> dict[str, list[int]]:
    """Each service's container ports, from compose's "127.0.0.1:HOST:CONTAINER" entries."""
    return {n: [int(p.rsplit(":", 1)[1]) for p in services[n]["ports"]] for n in SERVICES}


def container_processes() -> list[str]:
    """Processes of a container or its runtime on this machine: conmon, catatonit, or a
    process whose working directory is the image's /app."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if "conmon" in cmd or "catatonit" in cmd or (cwd == "/app" and "snpemu" in cmd):
            found.append(f"{pid}: {cmd.strip()}")
    return found


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.fail("the compose test runs podman as root: run it as root (CI does)")
    if missing := missing_tools():
        pytest.fail(f"{', '.join(missing)} missing: run `make test-compose` (it installs them)")
    podman = Podman()
    # the base images, under the names the project's files use, from the Debian mirror
    podman.debian_image(PYTHON_BASE, ["python3", "python3-venv", "ovmf"], 'CMD ["python3"]')
    podman.debian_image(
        PROMETHEUS,
        ["prometheus", "wget"],
        'ENTRYPOINT ["/usr/bin/prometheus"]',
        'CMD ["--config.file=/etc/prometheus/prometheus.yml"]',
    )
    work = tmp_path_factory.mktemp("compose")
    project_copy(work)
    # the project's dependencies as wheels in the build context: the build has no network
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:"),
            *("--dest", str(work / "wheelhouse"), str(work), "setuptools>=77", "wheel"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    built = podman.run("build", "--network=none", "--tag", "snpemu:latest", str(work), timeout=900)
    assert "Successfully tagged" in built.stdout + built.stderr
    h = Host(podman, work, published(compose_file()["services"]))
    with podman.api() as service:
        try:
            yield h
        finally:
            if not h.down_done:
                h.down()
            assert service.poll() is None, "podman's API service died during the test"


def test_up_brings_every_service_to_healthy(host: Host) -> None:
    # up waits on depends_on: service_healthy, so the health checks run while it waits
    up = subprocess.Popen(
        [*host.compose_command(), "up", "-d", "--no-build"],
        cwd=host.workdir,
        env=host.podman.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        health = host.podman.run_health_checks(PROJECT)
        if up.poll() is not None and health == dict.fromkeys(SERVICES, "healthy"):
            break
        time.sleep(1)
    out = up.communicate(timeout=60)[0]
    assert up.returncode == 0, out
    assert health == dict.fromkeys(SERVICES, "healthy"), (health, out)
    # Grafana is in the `grafana` profile: not started
    names = {c["Labels"]["com.docker.compose.service"] for c in host.podman.containers(PROJECT)}
    assert names == set(SERVICES)
    for c in host.podman.containers(PROJECT):
        service = c["Labels"]["com.docker.compose.service"]
        host.addresses[service] = host.podman.address(c["Id"], NETWORK)


def test_the_network_is_internal(host: Host) -> None:
    net = host.podman.network(NETWORK)
    assert net["internal"] is True  # no gateway, no masquerade: packets stay on this machine
    # and a container has no default route past the bridge
    routes = host.podman.run("exec", f"{PROJECT}_rmp_1", "cat", "/proc/net/route").stdout
    assert all(line.split()[1] != "00000000" for line in routes.splitlines()[1:])


def test_the_engine_binds_the_ports_compose_publishes(host: Host) -> None:
    services = compose_file()["services"]
    for c in host.podman.containers(PROJECT):
        service = c["Labels"]["com.docker.compose.service"]
        want = set()
        for entry in services[service]["ports"]:
            ip, outside, inside = entry.split(":")
            want.add(f"{inside}/tcp -> {ip}:{outside}")
        assert host.podman.ports(c["Id"]) == want, service


def test_every_grpc_port_answers_list_and_health(host: Host) -> None:
    for service, interface in GRPC.items():
        address = host.at(service)
        listed = host.grpcurl(address, "list")
        assert listed.returncode == 0, (service, listed.stderr)
        assert f"snp.{service}.v1.{interface}" in listed.stdout.split()
        checked = host.grpcurl(
            "-d",
            json.dumps({"service": f"snp.{service}.v1.{interface}"}),
            address,
            "grpc.health.v1.Health/Check",
        )
        assert json.loads(checked.stdout) == {"status": "SERVING"}, (service, checked.stderr)
    for guest in ("guest-0", "guest-1"):
        address = host.at(guest)
        listed = host.grpcurl(address, "list")
        assert "snp.guest.v1.GuestService" in listed.stdout.split(), listed.stderr
        checked = host.grpcurl(address, "grpc.health.v1.Health/Check")
        assert json.loads(checked.stdout) == {"status": "SERVING"}


def test_a_guest_gives_a_report_that_verifies(host: Host, tmp_path: Path) -> None:
    guest = host.at("guest-0")
    nonce = bytes(range(64))
    deadline = time.monotonic() + 120
    while True:  # the agent boots its guest after it is SERVING
        status = json.loads(host.grpcurl(guest, "snp.guest.v1.GuestService/GetStatus").stdout)
        if status.get("state") == "BOOT_STATE_RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(1)
    got = host.grpcurl(
        "-d",
        json.dumps({"report_data": base64.b64encode(nonce).decode(), "certs_pages": 4}),
        guest,
        "snp.guest.v1.GuestService/GetExtendedReport",
    )
    assert got.returncode == 0, got.stderr
    ext = json.loads(got.stdout)
    (tmp_path / "report.bin").write_bytes(base64.b64decode(ext["report"]))
    (tmp_path / "certs.bin").write_bytes(base64.b64decode(ext["certs_blob"]))
    kds = host.at("psp", 2)  # psp publishes gRPC, metrics, then its KDS endpoint
    with NO_PROXY.open(f"http://{kds}/vcek/v1/Milan/cert_chain", timeout=10) as r:
        (tmp_path / "chain.pem").write_bytes(r.read())
    verified = subprocess.run(
        [
            *(tool("snpemu-verify"), str(tmp_path / "report.bin"), str(tmp_path / "certs.bin")),
            *("--ark", str(tmp_path / "chain.pem"), "--report-data", nonce.hex()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK  : report signature verifies with the VCEK" in verified.stdout


def test_the_compose_prometheus_scrapes_every_service(host: Host) -> None:
    url = f"http://{host.at('prometheus')}/api/v1/targets"
    want = {"rmp", "psp", "kvm", "netd", "guest"}
    deadline = time.monotonic() + 60
    while True:
        with NO_PROXY.open(url, timeout=10) as reply:
            targets = json.loads(reply.read())["data"]["activeTargets"]
        up = {t["labels"]["job"] for t in targets if t["health"] == "up"}
        down = [(t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        if (want <= up and not down) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert want <= up and not down, down
    guests = [t for t in targets if t["labels"]["job"] == "guest"]
    assert len(guests) == 2


def test_down_leaves_no_container_network_volume_or_process(host: Host) -> None:
    gone = host.down()
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert host.podman.containers(PROJECT, all_states=True) == []
    networks = host.podman.run("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(PROJECT)]
    volumes = host.podman.run("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [v for v in volumes if v.startswith(PROJECT)]
    deadline = time.monotonic() + 30
    while (left := container_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
