"""A fresh virtual host for one lab run: the real launcher with every service as a process.

Each run gets its own ports, state directory and violation policy, and is stopped (with every
process it started) at the end, so runs cannot leak into each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc

from snpemu.hostconfig import HOST_COMPONENTS, HostConfig, free_ports
from snpemu.launcher.top import scrape, total
from snpemu.rmp.client import credential_metadata, read_credential
from snpemu.runtime.channels import owner_channel
from snpemu.runtime.credentials import read_owner_credential
from snpemu.spawn import Spawned


class LabHostError(RuntimeError):
    pass


class LabHost:
    def __init__(self, workdir: Path, guests: int, env: dict[str, str]) -> None:
        self.workdir, self.guests = workdir, guests
        names = [
            f"SNPEMU_{c.upper()}_{k}_PORT" for c in HOST_COMPONENTS for k in ("GRPC", "METRICS")
        ]
        ports = free_ports(len(names) + 2 * guests + 3)
        self.env = {
            **os.environ,
            **dict(zip(names, map(str, ports), strict=False)),
            "SNPEMU_GUEST_GRPC_PORT_BASE": str(ports[len(names)]),
            "SNPEMU_GUEST_METRICS_PORT_BASE": str(ports[len(names) + guests]),
            "SNPEMU_PROMETHEUS_PORT": str(ports[-3]),
            "SNPEMU_GRAFANA_PORT": str(ports[-2]),
            "SNPEMU_KDS_PORT": str(ports[-1]),
            "SNPEMU_GUESTS": str(guests),
            "SNPEMU_STATE_DIR": str(workdir / "state"),
            **env,
        }
        for i in range(guests):  # .env spells out guest-0 and guest-1; the bases decide here
            self.env.pop(f"SNPEMU_GUEST_{i}_GRPC_PORT", None)
            self.env.pop(f"SNPEMU_GUEST_{i}_METRICS_PORT", None)
            self.env[f"SNPEMU_GUEST_{i}_GRPC_PORT"] = str(ports[len(names) + i])
            self.env[f"SNPEMU_GUEST_{i}_METRICS_PORT"] = str(ports[len(names) + guests + i])
        self.config = HostConfig.load(self.env)
        self.proc: Spawned | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.md: tuple[tuple[str, str], ...] = ()

    @property
    def state_dir(self) -> Path:
        return Path(self.env["SNPEMU_STATE_DIR"])

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.config.endpoint(name).grpc_port}"

    def _channel(self, name: str) -> grpc.aio.Channel:
        if name not in self.channels:
            if name.startswith("guest-"):
                # a guest agent's API is its owner's: the launcher left the credential
                secret = read_owner_credential(self.state_dir, name)
                self.channels[name] = owner_channel(self.address(name), secret)
            else:
                self.channels[name] = grpc.aio.insecure_channel(self.address(name))
        return self.channels[name]

    def guest(self, i: int) -> guest_pb2_grpc.GuestServiceStub:
        return guest_pb2_grpc.GuestServiceStub(self._channel(f"guest-{i}"))

    @property
    def kvm(self) -> kvm_pb2_grpc.KvmServiceStub:
        return kvm_pb2_grpc.KvmServiceStub(self._channel("kvm"))

    async def start(self, timeout: float = 120) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Spawned(
            [sys.executable, "-m", "snpemu.launcher", "up", "--no-prometheus"],
            self.env,
            output=self.workdir / "launcher.log",
            die_with_parent=True,
        )
        state_file = self.state_dir / "launcher.json"
        deadline = time.monotonic() + timeout
        while not state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabHostError(
                    f"the virtual host did not start: see {self.workdir}/launcher.log"
                )
            await asyncio.sleep(0.1)
        self.md = credential_metadata(read_credential(self.state_dir))
        for i in range(self.guests):
            while True:
                st = await self.guest(i).GetStatus(guest_pb2.GetStatusRequest(), timeout=10)
                if st.state == guest_pb2.BOOT_STATE_RUNNING:
                    break
                if st.state == guest_pb2.BOOT_STATE_TERMINATED or time.monotonic() > deadline:
                    raise LabHostError(f"guest-{i} did not boot ({st.state})")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        self.channels.clear()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    # --- what the lab reads back ------------------------------------------------------------

    def restarts(self, name: str) -> int:
        data: dict[str, Any] = json.loads((self.state_dir / "launcher.json").read_text())
        return sum(c["restarts"] for c in data["children"] if c["name"] == name)

    def metric(self, name: str, family: str) -> float:
        """One sample from a service's /metrics (the sum over labels), or NaN if unreachable."""
        series = scrape(f"http://127.0.0.1:{self.config.endpoint(name).metrics_port}/metrics", 5)
        return total(series, family).get("", 0.0) if series else float("nan")

    async def vms(self) -> list[kvm_pb2.VmInfo]:
        r = await self.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=self.md, timeout=10)
        return list(r.vms)
