"""Crashes that end in a working host: psp restarted (a firmware reset), a guest's VM gone from
under its agent, kvm restarted; health tells the truth meanwhile (ISSUE 19, "Restarts")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from snp.common.v1 import handles_pb2, types_pb2
from snp.guest.v1 import guest_pb2
from snp.kvm.v1 import kvm_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu import kvm as kvm_service
from snpemu import psp as psp_service
from snpemu.abi import msr_protocol as msr
from snpemu.runtime.server import ServiceRuntime
from snpemu.runtime.status import error_info

from tests.service.host_stack import HOST, Stack, agent, host_stack

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TMR_PAGES = 512  # SEV_ES_TMR_SIZE (2 MiB): KERNEL: drivers/crypto/ccp/sev-dev.c


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60.0) -> None:
    """Poll until `check` holds; a bound on the wait, never a duration asserted."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"never happened within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.02)


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(r.status)


class HealthLog:
    """Every status a service's health Watch stream sent, in order."""

    def __init__(self, address: str, service: str) -> None:
        self.address, self.service = address, service
        self.seen: list[int] = []
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=self.service)
            )
            async for r in stream:
                self.seen.append(int(r.status))

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


@contextlib.asynccontextmanager
async def restarted(s: Stack, name: str, spec: Any) -> AsyncIterator[ServiceRuntime]:
    """Service `name` of the stack stopped, and a fresh one (new state, same data directory)
    serving on the same port; stopped again at the end."""
    old = s.runtimes[name]
    port = old.grpc_port
    await old.stop()
    new = ServiceRuntime(spec, dataclasses.replace(old.config, grpc_port=port), old.options)
    await new.start()
    s.runtimes[name] = new
    try:
        yield new
    finally:
        await new.stop()


async def firmware_pages(s: Stack) -> int:
    """Pages in firmware state on the host (the TMR and guests' firmware pages)."""
    total, pfn = 0, 0
    info = await s.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    while pfn < info.max_pfn:
        count = min(4096, info.max_pfn - pfn)
        r = await s.rmp.ListRmpEntries(
            rmp_pb2.ListRmpEntriesRequest(first_pfn=pfn, count=count, non_default_only=True),
            metadata=HOST,
        )
        total += sum(1 for e in r.entries if e.state == types_pb2.PAGE_STATE_FIRMWARE)
        pfn += count
    return total


async def vm_state(s: Stack, vm: Any) -> int:
    try:
        r = await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=vm), metadata=HOST)
    except grpc.aio.AioRpcError as e:
        return -int(e.code().value[0])
    return int(r.vm.state)


async def test_psp_restart_is_a_firmware_reset_kvm_recovers(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s:
        k = s.runtimes["kvm"]
        old = await s.launch()
        await old.register_ghcb()
        r, _, body = await old.guest_request(bytes(96))
        assert r.sw_exit_info_2 == 0 and body is not None
        fw_before = await firmware_pages(s)
        kvm_health = HealthLog(k.address, "snp.kvm.v1.KvmService")
        await until(lambda: _true(kvm_health.seen), "kvm's health watched")
        try:
            async with restarted(s, "psp", psp_service.SPEC):
                # kvm notices, is NOT_SERVING while it brings SNP up again, then SERVING
                await until(lambda: _true(NOT_SERVING in kvm_health.seen), "kvm NOT_SERVING")
                await until(lambda: _true(kvm_health.seen[-1] == SERVING), "kvm SERVING again", 60)
                st = await s.psp.SevPlatformStatus(
                    psp_pb2.SevPlatformStatusRequest(), metadata=HOST
                )
                assert st.state == psp_pb2.PLATFORM_STATE_INIT
                # the old VM's firmware context is gone: it terminated, and its exits say so
                assert await vm_state(s, old.vm) == kvm_pb2.VM_STATE_TERMINATED
                info = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=old.vm), metadata=HOST)).vm
                assert (info.term_reason_set, info.term_reason_code) == (0xF, 2)
                with pytest.raises(grpc.aio.AioRpcError) as exit_info:
                    await old.msr(msr.SEV_INFO_REQ)
                assert error_info(exit_info.value).reason == "VM_TERMINATED"  # type: ignore[union-attr]
                # one TMR, never a second beside a lost first: the old VM's firmware pages
                # went back, the old TMR too, a new one taken
                assert await firmware_pages(s) == TMR_PAGES <= fw_before
                # its memory went back: no frame of it is in its map, and its ioctls are
                # refused (EIO) without changing anything; only DestroyVm remains
                mm = await s.kvm.GetMemoryMap(kvm_pb2.GetMemoryMapRequest(vm=old.vm), metadata=HOST)
                assert list(mm.regions) == []
                with pytest.raises(grpc.aio.AioRpcError) as ioctl:
                    await s.kvm.SetMemoryAttributes(
                        kvm_pb2.SetMemoryAttributesRequest(vm=old.vm, address=0, size=4096),
                        metadata=HOST,
                    )
                assert ioctl.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(ioctl.value).metadata["errno"] == "EIO"  # type: ignore[union-attr]
                # its VMM destroys it; a new VM launches and its report request works
                d = await s.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=old.vm), metadata=HOST)
                assert d.leaked_pages == 0
                new = await s.launch()
                await new.register_ghcb()
                r, _, body = await new.guest_request(bytes(96))
                assert r.sw_exit_info_2 == 0 and body is not None
        finally:
            await kvm_health.close()


async def _true(value: object) -> bool:
    return bool(value)


async def test_kvm_restart_keeps_the_tmr_it_recorded(tmp_path: Path) -> None:
    """A restarted kvm finds the TMR its predecessor gave the firmware (it takes no second
    one), and hands it back when psp is reset after that."""
    async with host_stack(tmp_path) as s:
        assert await firmware_pages(s) == TMR_PAGES
        async with restarted(s, "kvm", kvm_service.SPEC) as k:
            assert await health(k.address) == SERVING
            assert await firmware_pages(s) == TMR_PAGES
            kvm_health = HealthLog(k.address, "snp.kvm.v1.KvmService")
            try:
                await until(lambda: _true(kvm_health.seen), "kvm's health watched")
                async with restarted(s, "psp", psp_service.SPEC):
                    await until(lambda: _true(NOT_SERVING in kvm_health.seen), "NOT_SERVING")
                    await until(lambda: _true(kvm_health.seen[-1] == SERVING), "SERVING again")
                    assert await firmware_pages(s) == TMR_PAGES
                    info = await s.rmp.GetPlatformInfo(
                        rmp_pb2.GetPlatformInfoRequest(), metadata=HOST
                    )
                    assert info.leaked_pages == 0
            finally:
                await kvm_health.close()


async def _serving(address: str) -> bool:
    return await health(address) == SERVING


async def test_agent_whose_vm_is_destroyed_boots_again_and_attests(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s, agent(s) as (g, rt):
        st = await g.GetStatus(guest_pb2.GetStatusRequest())
        assert st.state == guest_pb2.BOOT_STATE_RUNNING
        await g.GetReport(guest_pb2.GetReportRequest(report_data=b"before"))
        old_vm = st.vm_id
        watch = HealthLog(rt.address, "snp.guest.v1.GuestService")
        try:
            await until(lambda: _true(watch.seen), "the agent's health watched")
            await s.kvm.DestroyVm(
                kvm_pb2.DestroyVmRequest(vm=handles_pb2.VmHandle(id=old_vm)),
                metadata=HOST,
            )
            await until(lambda: _true(NOT_SERVING in watch.seen), "the agent NOT_SERVING")

            async def booted_again() -> bool:
                st = await g.GetStatus(guest_pb2.GetStatusRequest())
                return st.vm_id != old_vm and st.state == guest_pb2.BOOT_STATE_RUNNING

            await until(booted_again, "the agent booted a new VM")
            await until(lambda: _true(watch.seen[-1] == SERVING), "the agent SERVING again")
            r = await g.GetReport(guest_pb2.GetReportRequest(report_data=b"after"))
            assert r.fields.report_data[:5] == b"after"
        finally:
            await watch.close()


async def _reboots_and_attests(g: Any, watch: HealthLog, old_vm: str, nonce: bytes) -> None:
    await until(lambda: _true(NOT_SERVING in watch.seen), "the agent NOT_SERVING")

    async def booted_again() -> bool:
        st = await g.GetStatus(guest_pb2.GetStatusRequest())
        return st.vm_id != old_vm and st.state == guest_pb2.BOOT_STATE_RUNNING

    await until(booted_again, "the agent booted a new VM")
    await until(lambda: _true(watch.seen[-1] == SERVING), "the agent SERVING again")
    st = await g.GetStatus(guest_pb2.GetStatusRequest())
    assert not st.disabled_vmpcks and "vm_lost" in [e.kind for e in st.events]
    r = await g.GetReport(guest_pb2.GetReportRequest(report_data=nonce))
    assert r.fields.report_data[: len(nonce)] == nonce


async def test_agents_boot_again_after_a_firmware_reset(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s, agent(s) as (g, rt):
        old_vm = (await g.GetStatus(guest_pb2.GetStatusRequest())).vm_id
        watch = HealthLog(rt.address, "snp.guest.v1.GuestService")
        try:
            await until(lambda: _true(watch.seen), "the agent's health watched")
            async with restarted(s, "psp", psp_service.SPEC):
                await _reboots_and_attests(g, watch, old_vm, b"after psp")
                # the old VM went with its agent's DestroyVm: only the new one is left
                vms = (await s.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
                assert [v.state for v in vms] == [kvm_pb2.VM_STATE_RUNNING]
        finally:
            await watch.close()


async def test_agents_boot_again_after_a_kvm_restart(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s, agent(s) as (g, rt):
        old_vm = (await g.GetStatus(guest_pb2.GetStatusRequest())).vm_id
        watch = HealthLog(rt.address, "snp.guest.v1.GuestService")
        try:
            await until(lambda: _true(watch.seen), "the agent's health watched")
            async with restarted(s, "kvm", kvm_service.SPEC):
                await _reboots_and_attests(g, watch, old_vm, b"after kvm")
        finally:
            await watch.close()
