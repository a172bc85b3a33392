"""The agent's VMM side of an exit kvm hands it (guest/vmm_exits.py), with kvm stood in for:
the range converted and the vCPU run with hypercall.ret 0; any failure of the conversion still
completes the exit, as a failed change (EINVAL), so the vCPU is never left out in the VMM;
and a caller that goes away mid-exit does not stop the completion."""

from __future__ import annotations

import asyncio
import errno

import pytest
from snpemu.errors import Unavailable
from snpemu.guest import vmm_exits
from snpemu.guest.ports import MsrReply, VmHandle, VmmExit

# KERNEL: include/uapi/linux/kvm.h KVM_EXIT_HYPERCALL; kvm_para.h KVM_HC_MAP_GPA_RANGE;
# arch/x86/include/uapi/asm/kvm_para.h KVM_MAP_GPA_RANGE_ENCRYPTED
EXIT = VmmExit(3, 12, (0x5000, 2, 1 << 4, 0, 0, 0))
VM = VmHandle("vm-1", b"t")


class Vmm:
    def __init__(self, fail: BaseException | None = None, gate: asyncio.Event | None = None):
        self.fail, self.gate = fail, gate
        self.attributes: list[tuple[int, int, bool]] = []
        self.runs: list[tuple[int, int]] = []

    async def set_memory_attributes(self, vm: VmHandle, address: int, size: int, private: bool):  # type: ignore[no-untyped-def]
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.attributes.append((address, size, private))

    async def run_vcpu(self, vm: VmHandle, vcpu_id: int, ret: int) -> MsrReply:
        self.runs.append((vcpu_id, ret))
        return MsrReply(0x15)


async def test_the_range_is_converted_and_the_vcpu_run() -> None:
    vmm = Vmm()
    done = await vmm_exits.complete(vmm, VM, 0, MsrReply(0, exit=EXIT))  # type: ignore[arg-type]
    assert done == MsrReply(0x15)
    assert vmm.attributes == [(0x5000, 2 * 4096, True)] and vmm.runs == [(0, 0)]


async def test_a_failed_conversion_still_completes_the_exit() -> None:
    vmm = Vmm(fail=Unavailable("kvm SetMemoryAttributes: gone"))
    await vmm_exits.complete(vmm, VM, 0, MsrReply(0, exit=EXIT))  # type: ignore[arg-type]
    assert vmm.runs == [(0, errno.EINVAL)]


async def test_a_caller_cancelled_mid_exit_leaves_the_exit_completed() -> None:
    gate = asyncio.Event()
    vmm = Vmm(gate=gate)
    task = asyncio.ensure_future(vmm_exits.complete(vmm, VM, 0, MsrReply(0, exit=EXIT)))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert vmm.runs == [(0, 0)]
