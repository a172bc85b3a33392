"""The cluster fixture: the real launcher starting every service as a real process.

cluster -> (tests drive it with grpcurl and a real Prometheus) -> stopped, nothing left.
Each launch gets free ports (every port of .env overridden) and a marker variable that every
child inherits, so a test can find any process the launch left behind.
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
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from snpemu.hostconfig import HostConfig
from snpemu.rmp.client import read_credential
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

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.config.endpoint(name).grpc_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.config.prometheus_port}"

    def state(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.state_dir / "launcher.json").read_text())

    def grpcurl(
        self, *args: str, host: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The real grpcurl, plaintext, with the host credential unless host=False."""
        header = ["-H", f"{CREDENTIAL_HEADER}: {read_credential(self.state_dir)}"] if host else []
        return subprocess.run(
            [tool("grpcurl"), "-plaintext", *header, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    env = launch_env(tmp)
    proc = start_launcher(env)
    lines: list[str] = []
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
        proc.kill()
        pytest.fail("launcher not up in 120 s:\n" + "".join(lines))
    cluster = Cluster(
        proc, env, Path(env["SNPEMU_STATE_DIR"]), HostConfig.load(env), env[MARKER], lines
    )
    if any("prometheus not started" in line for line in lines):
        log = Path(env["SNPEMU_STATE_DIR"]) / "logs" / "prometheus.log"
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        cluster.stop()
        pytest.fail("the launcher came up without Prometheus:\n" + "".join(lines) + tail)
    yield cluster
    if proc.poll() is None:
        cluster.stop()
    for pid in processes_with_marker(cluster.marker):
        os.kill(pid, signal.SIGKILL)
