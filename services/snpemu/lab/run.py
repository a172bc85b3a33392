"""One lab run (a scenario under a policy on a fresh virtual host), and the whole matrix."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from snp.guest.v1 import guest_pb2
from snp.kvm.v1 import kvm_pb2

from snpemu.lab.host import LabHost
from snpemu.lab.scenarios import POLICIES, SCENARIOS, Scenario
from snpemu.lab.traffic import Traffic, mac

GUESTS = 4
INNOCENTS = [1, 2, 3]


@dataclass
class RunResult:
    scenario: str
    policy: str
    daemon_deaths: int
    host_panics: int
    guests_terminated: list[str]
    guests_with_vc: list[str]
    innocent_guests_losing_packets: int
    packets_sent: int
    packets_delivered: int
    packets_lost_counted: int
    packets_lost_with_host: int
    recovery_s: float | None
    silent_corruptions: int
    silently_lost: int
    trigger: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        # INVARIANT: every packet sent is in exactly one column
        accounted = (
            self.packets_delivered
            + self.packets_lost_counted
            + self.packets_lost_with_host
            + self.silently_lost
        )
        if accounted != self.packets_sent:
            raise ValueError(f"{self.packets_sent} packets sent, {accounted} accounted for")
        if self.packets_lost_with_host and not self.host_panics:
            raise ValueError("packets lost with a host that did not panic")

    def as_json(self) -> dict[str, object]:
        return asdict(self)


async def _guest_views(host: LabHost) -> tuple[list[str], list[str]]:
    """Terminated (kvm's word, else the agent's) and #VC-seeing guests."""
    terminated: set[str] = set()
    with_vc: set[str] = set()
    by_vm: dict[str, str] = {}
    for i in range(GUESTS):
        try:
            st = await host.guest(i).GetStatus(guest_pb2.GetStatusRequest(), timeout=10)
        except grpc.aio.AioRpcError:
            continue
        if st.state == guest_pb2.BOOT_STATE_TERMINATED:
            terminated.add(f"guest-{i}")
        if any(e.kind == "vc" for e in st.events):
            with_vc.add(f"guest-{i}")
        by_vm[st.vm_id] = f"guest-{i}"
    try:
        for vm in await host.vms():
            if vm.state == kvm_pb2.VM_STATE_TERMINATED:
                terminated.add(by_vm.get(vm.vm.id, vm.vm.id))
    except grpc.aio.AioRpcError:
        pass
    return sorted(terminated), sorted(with_vc)


async def run_one(scenario: Scenario, policy: str, workdir: Path) -> RunResult:
    started = time.monotonic()
    env = {
        "SNPEMU_RMP_POLICY": policy,
        "SNPEMU_RMP_MEMORY": "2G",
        "SNPEMU_GUEST_MEMORY": "128M",
        "SNPEMU_GUEST_VCPUS": "1",
        "SNPEMU_GUEST_ON_VC": "log",  # a #VC is reported, not fatal: who saw one is the result
        **scenario.netd_env,
        **scenario.rmp_env,
    }
    host = LabHost(workdir, GUESTS, env)
    try:
        await host.start()
        for i in INNOCENTS:
            await host.guest(i).AttachNetDevice(
                guest_pb2.AttachNetDeviceRequest(mac=mac(i)), timeout=60
            )
        traffic = Traffic(host, INNOCENTS)
        traffic.start()
        await asyncio.sleep(0.5)
        trigger = await scenario.run(host)
        # keep traffic going until it has come back (or clearly will not)
        deadline = time.monotonic() + 15
        await asyncio.sleep(1.5)
        while time.monotonic() < deadline:
            books = traffic.books
            if books.recovery_s() is not None and (
                not books.sent or books.sent[-1].result == "delivered"
            ):
                break
            await asyncio.sleep(0.25)
        books = await traffic.finish()
        panics = host.metric("rmp", "snp_host_panics_total")
        panicked = 1 if math.isnan(panics) else int(panics)  # rmp unreachable: the host is gone
        terminated, with_vc = await _guest_views(host)
        audit = books.audit(host_panicked=bool(panicked))
        return RunResult(
            scenario=scenario.name,
            policy=policy,
            daemon_deaths=host.restarts("netd"),
            host_panics=panicked,
            guests_terminated=terminated,
            guests_with_vc=with_vc,
            innocent_guests_losing_packets=books.innocent_guests_losing(),
            packets_sent=audit.sent,
            packets_delivered=audit.delivered,
            packets_lost_counted=audit.lost_counted,
            packets_lost_with_host=audit.lost_with_host,
            recovery_s=books.recovery_s(),
            silent_corruptions=audit.silent_corruptions,
            silently_lost=audit.silently_lost,
            trigger=trigger,
            seconds=round(time.monotonic() - started, 1),
        )
    finally:
        await host.stop()


async def run_matrix(
    workdir: Path,
    scenarios: list[str] | None = None,
    policies: list[str] | None = None,
    progress: bool = True,
) -> list[RunResult]:
    results = []
    for sc in SCENARIOS:
        if scenarios and sc.name not in scenarios:
            continue
        for policy in policies or POLICIES:
            r = await run_one(sc, policy, workdir / f"{sc.name}-{policy}")
            if progress:
                print(
                    f"{sc.name:<15} {policy:<13} deaths={r.daemon_deaths} panics={r.host_panics} "
                    f"terminated={r.guests_terminated} vc={r.guests_with_vc} "
                    f"lost={r.packets_lost_counted}+{r.packets_lost_with_host} "
                    f"corrupt={r.silent_corruptions} ({r.seconds} s)",
                    flush=True,
                )
            results.append(r)
    return results
