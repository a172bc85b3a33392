"""The cluster fixture: the real launcher starting every service as a real process.

cluster -> (tests drive it with grpcurl and a real Prometheus) -> stopped, nothing left.

The ladder, each rung a fixture on the one below (tests/README.md):

    cluster         module    the launcher up (its banner printed)              -> Cluster
    host_ready      module    cluster + rmp, psp, kvm and netd answering SERVING  -> Cluster
    guests_running  module    host_ready + every guest agent BOOT_STATE_RUNNING   -> Cluster
    own_cluster     function  a launch of the test's own (to stop, kill, panic)   -> Cluster
Each launch gets free ports (every port of .env overridden) and a marker variable that every
child inherits, so a test can find any process the launch left behind.

Prometheus is optional, as for `make up`: a launch without it still serves, and only the tests
that need it fail, saying why (they request the `prometheus` fixture; `Cluster.query` and
`Cluster.prometheus_url` fail the same way). `SNPEMU_PROMETHEUS_BIN=/bin/false pytest -m cluster`
shows which tests those are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snpemu.hostconfig import HostConfig
from snpemu.launcher.supervisor import grpc_health
from snpemu.rmp.client import read_credential
from snpemu.runtime.credentials import OWNER_HEADER, read_owner_credential
from snpemu.runtime.servicer import CREDENTIAL_HEADER

from tests.conftest import free_ports, tool

MARKER = "SNPEMU_TEST_RUN"


def processes_with_marker(value: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER}={value}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    env: dict[str, str]
    state_dir: Path
    config: HostConfig
    marker: str
    output: list[str] = field(default_factory=list)

    @property
    def prometheus_started(self) -> bool:
        return not any("prometheus not started" in line for line in self.output)

    def require_prometheus(self) -> None:
        """Fail the calling test, with the launcher's reason and Prometheus' log, unless this
        launch has a Prometheus."""
        if self.prometheus_started:
            return
        log = self.state_dir / "logs" / "prometheus.log"
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        pytest.fail(
            "this test needs Prometheus, and the launcher came up without it:\n"
            + "".join(self.output)
            + tail
        )

    @property
    def guests(self) -> list[str]:
        """The guest agents of this launch, by endpoint name ("guest-0", ...)."""
        return [e.name for e in self.config.endpoints if e.name.startswith("guest-")]

    @property
    def host_services(self) -> list[str]:
        """The host's own services (rmp, psp, kvm, netd): every endpoint but the guests'."""
        return [e.name for e in self.config.endpoints if not e.name.startswith("guest-")]

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.config.endpoint(name).grpc_port}"

    @property
    def prometheus_url(self) -> str:
        self.require_prometheus()
        return f"http://127.0.0.1:{self.config.prometheus_port}"

    def state(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.state_dir / "launcher.json").read_text())

    def grpcurl(
        self, *args: str, host: bool = True, owner: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The real grpcurl, plaintext, with the host credential unless host=False and, on a
        call to a guest agent, that guest owner's credential unless owner=False."""
        header = ["-H", f"{CREDENTIAL_HEADER}: {read_credential(self.state_dir)}"] if host else []
        for guest in self.guests if owner else ():
            if self.address(guest) in args:
                secret = read_owner_credential(self.state_dir, guest)
                header += ["-H", f"{OWNER_HEADER}: {secret}"]
        return subprocess.run(
            [tool("grpcurl"), "-plaintext", *header, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def owner_md(self, guest: str) -> tuple[tuple[str, str], ...]:
        """gRPC metadata with `guest`'s owner credential, for a call to its agent."""
        return ((OWNER_HEADER, read_owner_credential(self.state_dir, guest)),)

    def metric(self, service: str, sample: str, **labels: str) -> float:
        """The sum of one sample's values on a service's own /metrics page (no Prometheus),
        over the series whose labels include the given ones."""
        port = self.config.endpoint(service).metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == sample and labels.items() <= s.labels.items()
        )

    def query(self, expr: str, timeout: float = 10) -> list[dict]:  # type: ignore[type-arg]
        """An instant PromQL query against the launch's Prometheus; its result vector."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self.output.append(out)
        return self.proc.returncode


def launch_env(tmp: Path, **extra: str) -> dict[str, str]:
    names = [
        "SNPEMU_RMP_GRPC_PORT",
        "SNPEMU_PSP_GRPC_PORT",
        "SNPEMU_KVM_GRPC_PORT",
        "SNPEMU_NETD_GRPC_PORT",
        "SNPEMU_GUEST_0_GRPC_PORT",
        "SNPEMU_GUEST_1_GRPC_PORT",
        "SNPEMU_RMP_METRICS_PORT",
        "SNPEMU_PSP_METRICS_PORT",
        "SNPEMU_KVM_METRICS_PORT",
        "SNPEMU_NETD_METRICS_PORT",
        "SNPEMU_GUEST_0_METRICS_PORT",
        "SNPEMU_GUEST_1_METRICS_PORT",
        "SNPEMU_PROMETHEUS_PORT",
        "SNPEMU_GRAFANA_PORT",
        "SNPEMU_KDS_PORT",
    ]
    ports = free_ports(len(names))
    env = {**os.environ, **dict(zip(names, map(str, ports), strict=True))}
    env["SNPEMU_GUEST_METRICS_PORT_BASE"] = env["SNPEMU_GUEST_0_METRICS_PORT"]
    env["SNPEMU_GUEST_GRPC_PORT_BASE"] = env["SNPEMU_GUEST_0_GRPC_PORT"]
    env["SNPEMU_STATE_DIR"] = str(tmp / "state")
    env["SNPEMU_GUESTS"] = "2"
    env[MARKER] = uuid.uuid4().hex
    env.update(extra)
    return env


def start_launcher(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "snpemu.launcher", "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def running_cluster(tmp: Path, **extra: str) -> Iterator[Cluster]:
    """A launch of the whole host (two guests unless extra says otherwise), up until the
    banner's last line; stopped afterwards, and any process it left behind killed."""
    env = launch_env(tmp, **extra)
    proc = start_launcher(env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("launcher exited during start-up:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        else:
            pytest.fail("launcher not up in 120 s:\n" + "".join(lines))
        cluster = Cluster(
            proc, env, Path(env["SNPEMU_STATE_DIR"]), HostConfig.load(env), env[MARKER], lines
        )
        yield cluster
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            lines.append(out)
        for pid in processes_with_marker(env[MARKER]):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One launch shared by a module's tests: each test sets up (and leaves alone) what it
    needs, and a test that has to stop, kill or panic the host uses `own_cluster`."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A launch for one test alone."""
    with running_cluster(tmp_path_factory.mktemp("own-cluster")) as c:
        yield c


@pytest.fixture
def prometheus(cluster: Cluster) -> Cluster:
    """The module's launch, for a test that needs its Prometheus: fails unless it runs."""
    cluster.require_prometheus()
    return cluster


def wait_host_ready(cluster: Cluster, timeout: float = 120) -> None:
    """Until every host service answers the gRPC health check (the whole server) SERVING."""
    deadline = time.monotonic() + timeout
    waiting = list(cluster.host_services)
    while waiting:
        waiting = [n for n in waiting if grpc_health(cluster.address(n), "") != "SERVING"]
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"host services not SERVING within {timeout:g} s: {waiting}")
        if waiting:
            time.sleep(0.5)


def wait_guests_running(cluster: Cluster, timeout: float = 300) -> None:
    """Until every guest agent says BOOT_STATE_RUNNING; a guest that terminated instead fails
    the calling test (it will not come back on its own)."""
    deadline = time.monotonic() + timeout
    waiting = list(cluster.guests)
    while waiting:
        for name in list(waiting):
            with grpc.insecure_channel(cluster.address(name)) as channel:
                try:
                    state = (
                        guest_pb2_grpc.GuestServiceStub(channel)
                        .GetStatus(
                            guest_pb2.GetStatusRequest(), timeout=5, metadata=cluster.owner_md(name)
                        )
                        .state
                    )
                except grpc.RpcError:
                    continue  # not serving yet
            if state == guest_pb2.BOOT_STATE_TERMINATED:
                pytest.fail(f"{name} terminated during boot")
            if state == guest_pb2.BOOT_STATE_RUNNING:
                waiting.remove(name)
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"guests not running within {timeout:g} s: {waiting}")
        if waiting:
            time.sleep(1)


@pytest.fixture(scope="module")
def host_ready(cluster: Cluster) -> Cluster:
    """The module's launch once rmp, psp, kvm and netd all serve: a test that calls the host's
    APIs and must not race the launcher's start-up asks for this rung."""
    wait_host_ready(cluster)
    return cluster


@pytest.fixture(scope="module")
def guests_running(host_ready: Cluster) -> Cluster:
    """The module's launch once every guest agent has booted (BOOT_STATE_RUNNING)."""
    wait_guests_running(host_ready)
    return host_ready
