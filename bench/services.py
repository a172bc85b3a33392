"""What the benchmarks share: free ports, a service started as its own process, percentiles."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from snpemu.launcher.supervisor import grpc_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(module: str, env: dict[str, str], port: int, service: str) -> subprocess.Popen[bytes]:
    """`python -m module` with env, returned once its health check says SERVING."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module], env={**os.environ, **env}, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while grpc_health(f"127.0.0.1:{port}", service) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{module} did not start")
        time.sleep(0.1)
    return proc


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
