"""The launcher's supervisor: an rmp restart is a host reboot (every service stopped and started
again in start order), any other child's death restarts that child alone (ISSUE 19)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from snpemu.launcher.supervisor import Child, Supervisor

SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")


def child(name: str, tmp: Path, started: list[str]) -> Child:
    c = Child(name=name, argv=SLEEPER, env={}, log_path=tmp / f"{name}.log", ready=lambda: True)
    original = c.start

    def start() -> None:
        started.append(name)
        original()

    c.start = start  # type: ignore[method-assign]
    return c


def poll_until(sup: Supervisor, done: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the supervisor never acted"
        sup.poll()
        time.sleep(0.05)


def test_rmp_death_reboots_every_service_in_start_order(tmp_path: Path) -> None:
    started: list[str] = []
    names = ["rmp", "psp", "kvm", "netd"]
    kids = {n: child(n, tmp_path, started) for n in [*names, "guest-0", "guest-1"]}
    sup = Supervisor(stop_timeout=5, reboot_on=frozenset({"rmp"}))
    try:
        sup.start_all(5, [[kids[n]] for n in names] + [[kids["guest-0"], kids["guest-1"]]])
        first = {n: c.pid for n, c in kids.items()}
        started.clear()
        os.kill(first["rmp"], signal.SIGKILL)  # type: ignore[arg-type]
        poll_until(sup, lambda: len(started) == len(kids))
        assert started == [*names, "guest-0", "guest-1"]
        for n, c in kids.items():
            assert c.pid != first[n] and c.exited() is None, n
            assert c.restarts == 1
        assert sup.reboots == 1
    finally:
        sup.stop_all()


def test_another_death_restarts_that_child_alone(tmp_path: Path) -> None:
    started: list[str] = []
    kids = {n: child(n, tmp_path, started) for n in ("rmp", "psp", "kvm")}
    sup = Supervisor(stop_timeout=5, reboot_on=frozenset({"rmp"}))
    try:
        sup.start_all(5, [[c] for c in kids.values()])
        before = {n: c.pid for n, c in kids.items()}
        started.clear()
        os.kill(before["psp"], signal.SIGKILL)  # type: ignore[arg-type]
        poll_until(sup, lambda: started == ["psp"])
        assert kids["rmp"].pid == before["rmp"] and kids["kvm"].pid == before["kvm"]
        assert sup.reboots == 0
    finally:
        sup.stop_all()
