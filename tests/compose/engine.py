"""The compose test's container engine: Debian's podman run as root, its Docker-compatible API
for Debian's docker-compose 1.29, and base images built from the Debian mirror.

What this kind of machine needs (found by trying, see the README's compose section): runc,
not crun (crun refuses the mixed cgroup v1/v2 setup); cgroupfs and file events (no systemd);
default ulimits within the hard limits; health checks run by the harness (`podman healthcheck
run`: without systemd nothing runs them); and the netavark network backend, whose DNS
(aardvark-dns) answers compose's service names on an internal network (CNI's dnsname plugin
refuses internal networks). An internal network has no port forwarding (netavark sets none up,
as Docker does not), so the host reaches each service at its address on the bridge, where the
host has the gateway address.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# podman's storage and configuration: kept between local runs so the base images are built
# once; a CI machine starts without it
STATE = Path(os.environ.get("SNPEMU_COMPOSE_TEST_STATE", "/var/tmp/snpemu-compose-test"))
# the tags the project's files name: the Dockerfile's FROM and compose's Prometheus image
PYTHON_BASE = "docker.io/library/python:3.11-slim-bookworm"
PROMETHEUS = "docker.io/prom/prometheus:v2.53.2"
SUITE = "bookworm"
NEEDED = ("podman", "runc", "docker-compose", "mmdebstrap", "catatonit", "netavark", "aardvark-dns")


def missing_tools() -> list[str]:
    found = [
        t
        for t in NEEDED
        if shutil.which(t)
        or any(Path(d, t).exists() for d in ("/usr/libexec/podman", "/usr/lib/podman"))
    ]
    return [t for t in NEEDED if t not in found]


def _at_most(limit: int, most: int) -> int:
    hard = resource.getrlimit(limit)[1]
    return most if hard == resource.RLIM_INFINITY else min(hard, most)


class Podman:
    def __init__(self, state: Path = STATE) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        # podman refuses to start a container whose ulimits exceed the caller's hard limits
        nofile, nproc = (
            _at_most(resource.RLIMIT_NOFILE, 20000),
            _at_most(resource.RLIMIT_NPROC, 32768),
        )
        (state / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            "[network]\n"
            # netavark's aardvark-dns resolves compose's service names on an internal network;
            # the CNI backend would need the dnsname plugin, which an internal network disables
            'network_backend = "netavark"\n'
        )
        (state / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'runroot = "{state}/run"\n'
            f'graphroot = "{state}/storage"\n'
        )
        self.socket = state / "podman.sock"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(state / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(state / "storage.conf"),
            "DOCKER_HOST": f"unix://{self.socket}",
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {out.stderr.strip()}")
        return out

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def debian_image(self, ref: str, packages: list[str], *changes: str) -> None:
        """A minbase Debian image with `packages`, from the mirror apt already uses."""
        if self.image_exists(ref):
            return
        rootfs = self.state / f"{ref.rsplit('/', 1)[-1].replace(':', '-')}.tar"
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, rootfs],
            check=True,
            capture_output=True,
            timeout=900,
        )
        args = [a for c in changes for a in ("--change", c)]
        self.run("import", *args, str(rootfs), ref)
        rootfs.unlink()

    @contextlib.contextmanager
    def api(self) -> Iterator[subprocess.Popen[bytes]]:
        """`podman system service`: the Docker-compatible API on a socket, for docker-compose."""
        self.socket.unlink(missing_ok=True)
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.state / "service.log", "wb"),  # noqa: SIM115
        )
        try:
            deadline = time.monotonic() + 30
            while not self.socket.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (
                    self.state / "service.log"
                ).read_text()
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def containers(self, project: str, all_states: bool = False) -> list[dict[str, Any]]:
        args = ["ps", "--format", "json", "--filter", f"label=com.docker.compose.project={project}"]
        out = self.run(*args, *(["--all"] if all_states else []))
        return json.loads(out.stdout or "[]")  # type: ignore[no-any-return]

    def run_health_checks(self, project: str) -> dict[str, str]:
        """Run each running container's health check once (nothing else runs them here); the
        health of each service."""
        health = {}
        for c in self.containers(project):
            self.run("healthcheck", "run", c["Id"], check=False, timeout=60)
            service = c["Labels"]["com.docker.compose.service"]
            state = self.run(
                "inspect", "--format", "{{.State.Health.Status}}", c["Id"], check=False
            )
            health[service] = state.stdout.strip()
        return health

    def network(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("network", "inspect", name).stdout)[0]  # type: ignore[no-any-return]

    def address(self, container: str, network: str) -> str:
        """A container's address on the project's network (the host has the bridge's)."""
        fmt = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
        return self.run("inspect", "--format", fmt, container).stdout.strip()

    def ports(self, container: str) -> set[str]:
        """The ports the engine bound for a container, as `podman port` prints them."""
        return set(self.run("port", container).stdout.split("\n")) - {""}
