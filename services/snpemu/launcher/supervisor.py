"""Start, watch, restart and stop the processes of a virtual host.

Children run in their own sessions (a Ctrl-C reaches only the launcher, which then stops them
in reverse start order) and get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG), so no
process outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snpemu.spawn import Spawned

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


def grpc_health(address: str, service: str, timeout: float = 1.0) -> str:
    """The health status name of `service` at `address`, or "UNREACHABLE"."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def http_ready(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    ready: Callable[[], bool]
    process: Spawned | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 0.5
    next_start: float = 0.0
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # spawned, not forked: this process has used gRPC, whose at-fork handlers can hang
        self.process = Spawned(
            self.argv, {**os.environ, **self.env}, output=self.log_path, die_with_parent=True
        )
        self.pids.append(self.process.pid)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exited()
            if code is not None:
                raise LaunchError(f"{self.name} exited with {describe_exit(code)}; {self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise LaunchError(f"{self.name} was not ready after {timeout:.0f} s; {self.tail()}")

    def stop(self, timeout: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The session may hold grandchildren (none today): make sure none are left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n    " + "\n    ".join(text)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    """Keeps children running: a child that dies after start-up is restarted with backoff.

    A child named in `reboot_on` holds what every other one stands on (rmp: the host's memory
    and RMP); its death is a host reboot: when it is due to restart, every child start_all
    started is stopped (in reverse order) and started again in start order, each group ready
    before the next, so that none carries on with state that no longer exists."""

    MAX_BACKOFF_S = 10.0
    HEALTHY_RESET_S = 30.0

    def __init__(self, stop_timeout: float = 10.0, reboot_on: frozenset[str] = frozenset()) -> None:
        self.stop_timeout = stop_timeout
        self.reboot_on = reboot_on
        self.running: list[Child] = []
        self.groups: list[list[Child]] = []
        self.ready_timeout = 30.0
        self.reboots = 0

    def start_all(self, ready_timeout: float, groups: Sequence[Sequence[Child]]) -> None:
        """Start group by group; each group must be ready before the next starts."""
        self.ready_timeout = ready_timeout
        self.groups = [list(g) for g in groups]
        for group in groups:
            for child in group:
                child.start()
                self.running.append(child)
                log.info("started %s (pid %d)", child.name, child.pid)
            for child in group:
                child.wait_ready(ready_timeout)
                log.info("%s is ready", child.name)

    def start_optional(self, child: Child, ready_timeout: float) -> str | None:
        """Start a child the host can do without; on failure stop it and say why."""
        child.start()
        self.running.append(child)
        log.info("started %s (pid %d)", child.name, child.pid)
        try:
            child.wait_ready(ready_timeout)
        except LaunchError as e:
            self.running.remove(child)
            child.stop(self.stop_timeout)
            return str(e)
        log.info("%s is ready", child.name)
        return None

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.running:
            code = child.exited()
            if code is None:
                if now - child.started_at > self.HEALTHY_RESET_S:
                    child.backoff_s = 0.5
                continue
            if child.next_start == 0.0:
                child.next_start = now + child.backoff_s
                log.warning(
                    "%s died (%s); restarting in %.1f s",
                    child.name,
                    describe_exit(code),
                    child.backoff_s,
                )
            elif now >= child.next_start:
                child.next_start = 0.0
                child.backoff_s = min(child.backoff_s * 2, self.MAX_BACKOFF_S)
                if child.name in self.reboot_on:
                    self.reboot(child)
                    return
                child.restarts += 1
                child.start()
                log.info("restarted %s (pid %d, restart %d)", child.name, child.pid, child.restarts)

    def reboot(self, cause: Child) -> None:
        """Every child of start_all stopped and started again in start order."""
        self.reboots += 1
        log.warning("%s restarts: the host reboots (every service, in start order)", cause.name)
        members = [c for g in self.groups for c in g]
        for child in reversed(members):
            if child is not cause:
                child.stop(self.stop_timeout)
        for group in self.groups:
            for child in group:
                child.next_start = 0.0
                child.restarts += 1
                child.start()
                log.info("restarted %s (pid %d, host reboot)", child.name, child.pid)
            for child in group:
                try:
                    child.wait_ready(self.ready_timeout)
                except LaunchError as e:  # poll() restarts it as any child that died
                    log.error("%s did not come back after the reboot: %s", child.name, e)

    def stop_all(self) -> None:
        for child in reversed(self.running):
            child.stop(self.stop_timeout)
            log.info("stopped %s", child.name)
        self.running.clear()
