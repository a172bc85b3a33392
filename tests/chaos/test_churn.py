"""Create/launch/destroy churn with a failure injected at each launch step (ISSUE 19,
deliverable 6): whatever step of CreateVm or LaunchVm fails, the caller gets a clear answer,
DestroyVm leaves nothing behind (no leaked page, no stuck VM, no RMP entry, no host map, no
guest context), and the host launches the next VM.

The steps are learnt from a clean launch (tests/chaos/faults.py records the calls kvm makes
to rmp and psp); each cycle fails one of them, refused by the peer with one of FAULT_CODES
before it did anything. A method called many times in a launch (SNP_LAUNCH_UPDATE once per
page, RMPUPDATE) is failed at its first, second and last call.

Short form (part of `make test`): every step once. Long form: SNPEMU_CHURN_CYCLES=1000
cycles, round the steps and codes. SNPEMU_CHURN_FIGURES=file appends one JSON line of
figures (docs/reliability.md).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

import grpc
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.runtime.status import error_info

from tests.chaos.faults import Faults, Step
from tests.service.host_stack import HOST, Stack, host_stack

FAULT_CODES = (
    grpc.StatusCode.UNAVAILABLE,  # the peer not there
    grpc.StatusCode.FAILED_PRECONDITION,  # the peer refuses, as firmware refuses a command
    grpc.StatusCode.INVALID_ARGUMENT,  # the peer refuses a value it was sent
)
# What a caller may be answered when a step fails: the peer's code passed on, never UNKNOWN or
# INTERNAL. (A peer's RESOURCE_EXHAUSTED is not injected: rmp and psp answer it only for a
# message too large, which is kvm's own bug, and kvm says INTERNAL.)
CLEAR = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ABORTED,
    }
)
MEMORY = 16 << 20


async def snapshot(s: Stack) -> dict[str, Any]:
    """What a VM can leave behind, host-wide, as the services report it."""
    info = await s.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    entries = await s.rmp_entries()
    maps = await s.rmp.ListHostMaps(rmp_pb2.ListHostMapsRequest(), metadata=HOST)
    sev = await s.psp.SevPlatformStatus(psp_pb2.SevPlatformStatusRequest(), metadata=HOST)
    vms = await s.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)
    return {
        "free pages": int(info.free_pages),
        "leaked pages": int(info.leaked_pages),
        "rmp": entries,
        "host maps": sorted((m.map_id, m.pfn, m.holder) for m in maps.maps),
        "guests": int(sev.guest_count),
        "vms": [v.vm.id for v in vms.vms],
    }


async def launch(s: Stack, made: list[handles_pb2.VmHandle]) -> None:
    """CreateVm then LaunchVm, the VM CreateVm made added to `made`. Raises what the caller
    is told."""
    cfg = kvm_pb2.VmConfig(memory_bytes=MEMORY, vcpus=2, firmware_path=str(s.firmware))
    made.append((await s.kvm.CreateVm(kvm_pb2.CreateVmRequest(config=cfg), metadata=HOST)).vm)
    await s.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=made[-1]), metadata=HOST)


def steps_of(trace: list[Step]) -> list[Step]:
    """Each method's first, second and last call."""
    last: dict[tuple[str, str], int] = {}
    for service, method, n in trace:
        last[service, method] = n
    out = []
    for service, method, n in trace:
        if n <= 2 or n == last[service, method]:
            out.append((service, method, n))
    return out


async def test_a_failure_at_any_launch_step_leaves_nothing_behind(tmp_path: Path) -> None:
    faults = Faults()
    async with host_stack(
        tmp_path,
        memory="128M",
        interceptors={"rmp": [faults.interceptor("rmp")], "psp": [faults.interceptor("psp")]},
        SNPEMU_KVM_FIRMWARE_POLL_S="0",  # no firmware-status polls among the launch's calls
    ) as s:
        baseline = await snapshot(s)
        faults.record()
        made: list[handles_pb2.VmHandle] = []
        await launch(s, made)
        steps = steps_of(faults.disarm())
        await s.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=made.pop()), metadata=HOST)
        assert await snapshot(s) == baseline
        # the calls a launch makes to its peers, in order: enough of them to mean something
        methods = {(svc, m) for svc, m, _ in steps}
        assert {("rmp", "AllocatePages"), ("psp", "LaunchStart"), ("psp", "LaunchFinish")} <= (
            methods
        ), sorted(methods)

        cycles = int(os.environ.get("SNPEMU_CHURN_CYCLES", "0")) or len(steps)
        answered: collections.Counter[str] = collections.Counter()
        for i in range(cycles):
            step = steps[i % len(steps)]
            # every code in the short form; each round of the steps shifts the codes by one,
            # so 3 rounds try every (step, code) pair
            code = FAULT_CODES[(i % len(steps) + i // len(steps)) % len(FAULT_CODES)]
            faults.arm(step, code)
            try:
                await launch(s, made)
                answered["OK"] += 1
            except grpc.aio.AioRpcError as e:
                answered[e.code().name] += 1
                assert e.code() in CLEAR, (step, code, e.code(), e.details())
                assert error_info(e) is not None, (step, e.details())
            finally:
                faults.disarm()
            assert faults.injected[-1:] == [step], f"{step} was never called"
            while made:  # what CreateVm made, launched or not
                await s.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=made.pop()), metadata=HOST)
            assert await snapshot(s) == baseline, (step, code)

        # and the host still launches
        await launch(s, made)
        await s.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=made.pop()), metadata=HOST)
        assert await snapshot(s) == baseline
        if figures := os.environ.get("SNPEMU_CHURN_FIGURES"):
            with open(figures, "a") as f:
                record = {
                    "cycles": cycles,
                    "steps": len(steps),
                    "methods": sorted(f"{svc}.{m}" for svc, m in methods),
                    "answered": dict(answered),
                    "leaked_pages": (await snapshot(s))["leaked pages"],
                    "vms_left": len((await snapshot(s))["vms"]),
                }
                f.write(json.dumps(record) + "\n")
