"""The agent keeps its VM (guest/vm_keeper.py): which ends of a VM make it boot a new one, and
what it does meanwhile, on a stand-in kernel whose boot only creates a VM."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from snpemu.errors import SnpemuError, Unavailable
from snpemu.guest.exits import BootState
from snpemu.guest.ports import VmHandle, VmStatus
from snpemu.guest.vm_keeper import VmKeeper
from snpemu.runtime.peers import PeerError


def not_found() -> PeerError:
    e = PeerError.__new__(PeerError)
    SnpemuError.__init__(e, "kvm GetVm: no VM", reason="NOT_FOUND")
    e.code = grpc.StatusCode.NOT_FOUND
    e.fw_status = None
    return e


class Hold:
    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.cancelled = False

    async def wait(self) -> None:
        await self.ended.wait()

    def cancel(self) -> None:
        self.cancelled = True


class Vmm:
    def __init__(self) -> None:
        self.status: VmStatus | Exception = VmStatus(0, 0)
        self.destroyed: list[str] = []
        self.created = 0
        self.create_failures = 0

    async def get_vm(self, vm: VmHandle) -> VmStatus:
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    async def destroy_vm(self, vm: VmHandle) -> None:
        self.destroyed.append(vm.id)


class Kernel:
    """What VmKeeper touches of GuestKernel; boot() makes a running VM."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.events: list[str] = []
        self.forget_vm()

    def forget_vm(self) -> None:
        self.vm: VmHandle | None = None
        self.hold: Hold | None = None
        self.state = BootState.CREATED
        self.vmpcks = [bytes(32)] * 4
        self.disabled: set[int] = set()

    def event(self, kind: str, gpa: int = 0, detail: str = "") -> None:
        self.events.append(kind)

    async def boot(self) -> None:
        if self.vmm.create_failures:
            self.vmm.create_failures -= 1
            raise Unavailable("kvm is unreachable")
        self.vmm.created += 1
        self.vm, self.hold = VmHandle(f"vm-{self.vmm.created}"), Hold()
        self.vmpcks = [bytes([self.vmm.created]) * 32] * 4
        self.state = BootState.RUNNING


class Net:
    dev = None


class Driver:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()


async def keeper() -> tuple[VmKeeper, Kernel, Vmm, list[bool], asyncio.Task[None]]:
    vmm = Vmm()
    kernel = Kernel(vmm)
    health: list[bool] = []

    async def set_health(serving: bool) -> None:
        health.append(serving)

    k = VmKeeper(kernel, Driver(), Net(), set_health, interval=0.01)  # type: ignore[arg-type]
    task = asyncio.ensure_future(k.run())
    await until(lambda: kernel.state == BootState.RUNNING)
    return k, kernel, vmm, health, task


async def until(cond: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "never happened"
        await asyncio.sleep(0.005)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "end",
    ["hold ended", "NOT_FOUND", "firmware reset"],
)
async def test_a_vm_that_is_gone_is_replaced_not_serving_meanwhile(end: str) -> None:
    k, kernel, vmm, health, task = await keeper()
    old_hold = kernel.hold
    assert old_hold is not None
    vmm.create_failures = 2  # the host is still recovering: retried
    if end == "hold ended":
        old_hold.ended.set()
    elif end == "NOT_FOUND":
        vmm.status = not_found()
    else:
        vmm.status = VmStatus(0xF, 2)  # kvm's TERM_SET_HOST, TERM_HOST_FIRMWARE_RESET
    await until(lambda: k.reboots == 1)
    vmm.status = VmStatus(0, 0)
    assert health == [False, True]
    assert kernel.vm == VmHandle("vm-2") and kernel.state == BootState.RUNNING
    assert kernel.vmpcks[0] == bytes([2]) * 32  # the new VM's keys, not the lost one's
    assert vmm.destroyed == ["vm-1"] and old_hold.cancelled
    assert "vm_lost" in kernel.events
    await stop(task)


@pytest.mark.parametrize(
    "status",
    [VmStatus(0xF, 1), VmStatus(1, 6), Unavailable("kvm restarting")],
    ids=["convert-killed", "guest terminated itself", "kvm unreachable"],
)
async def test_a_vm_that_is_not_gone_is_kept(status: VmStatus | Exception) -> None:
    k, kernel, vmm, health, task = await keeper()
    vmm.status = status
    polls = 0
    original = vmm.get_vm

    async def counted(vm: VmHandle) -> VmStatus:
        nonlocal polls
        polls += 1
        return await original(vm)

    vmm.get_vm = counted  # type: ignore[method-assign]
    await until(lambda: polls >= 5)
    assert k.reboots == 0 and health == [] and kernel.vm == VmHandle("vm-1")
    await stop(task)
