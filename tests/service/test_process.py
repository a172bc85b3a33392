"""A service as its own process: `python -m snpemu.<service>`, config errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from snpemu.launcher.supervisor import grpc_health

from tests.conftest import free_ports


def _start(service: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"snpemu.{service}"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_serving(address: str, service: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if grpc_health(address, service) == "SERVING":
            return
        time.sleep(0.1)
    pytest.fail(f"{service} not serving at {address}")


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    proc = _start("psp", SNPEMU_GRPC_PORT="fifty")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    entry = json.loads(err.strip().splitlines()[-1])
    assert entry["level"] == "ERROR"
    assert entry["msg"] == "bad configuration: SNPEMU_GRPC_PORT='fifty': not a port number"


def test_sigterm_stops_cleanly_with_json_logs() -> None:
    grpc_port, metrics_port = free_ports(2)
    proc = _start(
        "guest",
        SNPEMU_GRPC_PORT=str(grpc_port),
        SNPEMU_METRICS_PORT=str(metrics_port),
        SNPEMU_INSTANCE="guest-7",
        SNPEMU_GUEST_BOOT="0",  # no kvm here: this is about the process, not the boot
    )
    _wait_serving(f"127.0.0.1:{grpc_port}", "snp.guest.v1.GuestService", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    entries = [json.loads(line) for line in err.strip().splitlines()]
    events = [e.get("event") for e in entries]
    assert events == ["serving", "stopping", "stopped"]
    assert entries[0]["grpc_port"] == grpc_port and entries[0]["metrics_port"] == metrics_port
    assert {e["instance"] for e in entries} == {"guest-7"}
    assert {e["service"] for e in entries} == {"guest"}


def test_second_process_on_a_busy_port_exits_1() -> None:
    grpc_port, m1, m2 = free_ports(3)
    first = _start("rmp", SNPEMU_GRPC_PORT=str(grpc_port), SNPEMU_METRICS_PORT=str(m1))
    try:
        _wait_serving(f"127.0.0.1:{grpc_port}", "snp.rmp.v1.RmpService", first)
        second = _start("rmp", SNPEMU_GRPC_PORT=str(grpc_port), SNPEMU_METRICS_PORT=str(m2))
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"cannot listen for gRPC on 127.0.0.1:{grpc_port}" in err
        # The first process still owns the port and still serves.
        assert grpc_health(f"127.0.0.1:{grpc_port}", "snp.rmp.v1.RmpService") == "SERVING"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
