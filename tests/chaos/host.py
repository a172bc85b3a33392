"""A live host for the fuzz suite: the in-process stack of tests/service/host_stack.py with two
launched VMs (A, the target, and B, whose handles are the foreign ones), a netd device of A's,
and a guest agent; every RPC of every service called generically from its method descriptor;
the state of the host as the services report it, to compare around a refused call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from snp.common.v1 import handles_pb2
from snp.guest.v1 import guest_pb2
from snp.kvm.v1 import kvm_pb2
from snp.netd.v1 import netd_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.rmp.reasons import RmpReason
from snpemu.runtime.status import error_info

from tests.chaos.strategies import Known
from tests.service.host_stack import HOST, VMM, Guest, Stack, agent, host_stack

T = TypeVar("T")
SERVICES: dict[str, ServiceDescriptor] = {
    "rmp": rmp_pb2.DESCRIPTOR.services_by_name["RmpService"],
    "psp": psp_pb2.DESCRIPTOR.services_by_name["PspService"],
    "kvm": kvm_pb2.DESCRIPTOR.services_by_name["KvmService"],
    "netd": netd_pb2.DESCRIPTOR.services_by_name["NetdService"],
    "guest": guest_pb2.DESCRIPTOR.services_by_name["GuestService"],
}
CALL_TIMEOUT_S = 20.0  # a bound on one call; an RPC still running then is a finding
STREAM_FIRST_S = 2.0  # a server stream that has said nothing by then is taken as held open
MAC_A = "02:00:00:00:00:a1"
RX = netd_pb2.Ring(ring_gpa=0x200000, buffers_gpa=0x201000, entries=8, buffer_size=2048)
TX = netd_pb2.Ring(ring_gpa=0x210000, buffers_gpa=0x211000, entries=8, buffer_size=2048)
# the credentials a fuzzed call carries: the host's most often, none, a wrong one, a VMM's
METADATA: tuple[tuple[tuple[str, str], ...], ...] = (
    HOST,
    HOST,
    HOST,
    (),
    (("x-snpemu-host-credential", "not-the-credential"),),
    (("x-snpemu-host-credential", VMM),),
)


@dataclass
class Outcome:
    code: grpc.StatusCode
    info: error_details_pb2.ErrorInfo | None
    details: str
    responses: int
    held: bool  # a server stream that was open and answering when the client hung up


def without(msg: Message, *fields: str) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    for f in fields:
        out.ClearField(f)
    return out


def method_path(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


class FuzzHost:
    """One host stack for one service's fuzzing, driven from synchronous tests on its own
    loop (as tests/service/live.py's Live)."""

    def __init__(self, tmp: Path, with_agent: bool, follow_firmware: bool = True) -> None:
        self.runner = asyncio.Runner()
        self.exit = contextlib.AsyncExitStack()
        # fuzzing psp, an SNP_SHUTDOWN answered OK is a firmware reset kvm would answer in the
        # background (its VMs terminated, their pages reclaimed) while later requests are
        # judged: kvm's firmware watch is off there, so a snapshot moves only by the call made
        kvm_env = {} if follow_firmware else {"SNPEMU_KVM_FIRMWARE_POLL_S": "0"}
        self.stack: Stack = self.run(
            self.exit.enter_async_context(host_stack(tmp, memory="128M", **kvm_env))
        )
        self.a: Guest = self.run(self.stack.launch(memory=16 << 20))
        self.b: Guest = self.run(self.stack.launch(memory=16 << 20))
        dev = self.run(
            self.stack.netd.RegisterDevice(
                netd_pb2.RegisterDeviceRequest(vm=self.a.vm, mac=MAC_A, rx=RX, tx=TX),
                metadata=HOST,
            )
        )
        self.device = dev.device
        self.addresses = {name: rt.address for name, rt in self.stack.runtimes.items()}
        self.agent_runtime = None
        if with_agent:
            # a #VC is reported, not fatal, and a refused guest request is not retried for a
            # minute: the agent stays running for every example
            opts = {"SNPEMU_GUEST_ON_VC": "log", "SNPEMU_GUEST_RETRY_TIMEOUT_S": "1"}
            _, rt = self.run(self.exit.enter_async_context(agent(self.stack, "guest-fuzz", **opts)))
            self.agent_runtime = rt
            self.addresses["guest"] = rt.address
        self.channels = {
            name: grpc.aio.insecure_channel(addr) for name, addr in self.addresses.items()
        }
        self.known = self.run(self._known())

    def run(self, aw: Awaitable[T]) -> T:
        async def wait() -> T:
            return await aw

        return self.runner.run(wait())

    def close(self) -> None:
        async def down() -> None:
            for ch in self.channels.values():
                await ch.close()
            await self.exit.aclose()

        self.run(down())
        self.runner.close()

    # --- what the strategies mix in --------------------------------------------------------

    async def _known(self) -> Known:
        a, b = self.a, self.b
        info_a = (await self.stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=a.vm), metadata=HOST)).vm
        info_b = (await self.stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=b.vm), metadata=HOST)).vm
        mm = await self.stack.kvm.GetMemoryMap(kvm_pb2.GetMemoryMapRequest(vm=a.vm), metadata=HOST)
        spas = [int(r.spa) for r in mm.regions][:4]
        ident_a, ident_b = a.ident, b.ident

        def forged_ident(**change: Any) -> handles_pb2.VcpuIdentity:
            x = handles_pb2.VcpuIdentity()
            x.CopyFrom(ident_a)
            for k, v in change.items():
                if isinstance(v, Message):
                    getattr(x, k).CopyFrom(v)
                else:
                    setattr(x, k, v)
            return x

        vms = [
            a.vm,
            b.vm,
            handles_pb2.VmHandle(id=a.vm.id, token=b.vm.token),  # A's id, B's capability
            handles_pb2.VmHandle(id=a.vm.id),  # A's id, no capability (public: GetStatus)
            handles_pb2.VmHandle(id="vm-forged", token=a.vm.token),
        ]
        return Known(
            messages={
                "snp.common.v1.VmHandle": vms,
                "snp.common.v1.VcpuHandle": [
                    handles_pb2.VcpuHandle(vm=v, vcpu_id=i) for v in vms[:3] for i in (0, 1)
                ],
                "snp.common.v1.VcpuIdentity": [
                    ident_a,
                    ident_b,
                    forged_ident(token=ident_b.token),
                    forged_ident(asid=ident_b.asid),
                    forged_ident(vmpl=3),
                    forged_ident(vcpu=ident_b.vcpu),
                ],
                "snp.common.v1.GuestContextHandle": [info_a.gctx, info_b.gctx],
                "snp.netd.v1.DeviceHandle": [
                    self.device,
                    netd_pb2.DeviceHandle(id=self.device.id + "0"),
                ],
            },
            ints=sorted(
                {
                    *spas,
                    *(s >> 12 for s in spas),
                    info_a.asid,
                    info_b.asid,
                    info_a.gctx.gctx_paddr,
                    info_a.gctx.gctx_paddr >> 12,
                    0x100000,
                    0x200000,
                    16 << 20,
                }
            ),
            strings=[a.vm.id, b.vm.id, MAC_A, self.device.id, str(self.stack.firmware)],
            blobs=[bytes(a.vm.token), bytes(ident_a.token)],
        )

    # --- calls -----------------------------------------------------------------------------

    def call(
        self, service: str, method: MethodDescriptor, requests: Sequence[Message], metadata: Any
    ) -> Outcome:
        return self.run(self._call(service, method, requests, metadata))

    async def _call(
        self, service: str, method: MethodDescriptor, requests: Sequence[Message], metadata: Any
    ) -> Outcome:
        ch = self.channels[service]
        path = method_path(SERVICES[service], method)
        out_cls = message_factory.GetMessageClass(method.output_type)
        ser, de = (lambda m: m.SerializeToString()), out_cls.FromString
        responses, held = 0, False
        try:
            if method.client_streaming:
                call = ch.stream_stream(path, request_serializer=ser, response_deserializer=de)(
                    iter(requests), metadata=metadata, timeout=CALL_TIMEOUT_S
                )
                async for _ in call:
                    responses += 1
            elif method.server_streaming:
                scall = ch.unary_stream(path, request_serializer=ser, response_deserializer=de)(
                    requests[0], metadata=metadata, timeout=CALL_TIMEOUT_S
                )
                try:
                    first = await asyncio.wait_for(scall.read(), STREAM_FIRST_S)
                except TimeoutError:
                    first = None
                    held = True
                if first is not None and first is not grpc.aio.EOF:
                    responses, held = 1, True
                if held:
                    scall.cancel()
                    return Outcome(grpc.StatusCode.OK, None, "", responses, True)
                code = await scall.code()
                if code != grpc.StatusCode.OK:  # pragma: no cover - read() raises first
                    return Outcome(code, None, await scall.details(), responses, False)
            else:
                await ch.unary_unary(path, request_serializer=ser, response_deserializer=de)(
                    requests[0], metadata=metadata, timeout=CALL_TIMEOUT_S
                )
                responses = 1
        except grpc.aio.AioRpcError as e:
            try:
                info = error_info(e)
            except ValueError:  # status details whose code is not the call's (trailers cut)
                info = None
            return Outcome(e.code(), info, str(e.details() or ""), responses, False)
        return Outcome(grpc.StatusCode.OK, None, "", responses, held)

    def serving(self, service: str) -> bool:
        """Health says SERVING for the server ("") and for the service's own name."""

        async def check() -> bool:
            stub = health_pb2_grpc.HealthStub(self.channels[service])
            for name in ("", SERVICES[service].full_name):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                if r.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
            return True

        return self.run(check())

    def panicked(self) -> bool:
        """The virtual host panicked (rmp answers every call HOST_PANIC until a reboot)."""

        async def check() -> bool:
            try:
                await self.stack.rmp.GetPlatformInfo(
                    rmp_pb2.GetPlatformInfoRequest(), metadata=HOST
                )
            except grpc.aio.AioRpcError as e:
                info = error_info(e)
                return info is not None and info.reason == RmpReason.HOST_PANIC
            return False

        return self.run(check())

    # --- the host's state ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self.run(self._snapshot())

    def settled(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The snapshot once two in a row agree (after a hold was dropped, the service may
        still be tearing down what it held), within a bound."""
        deadline = time.monotonic() + timeout_s
        last = self.snapshot()
        while time.monotonic() < deadline:
            self.run(asyncio.sleep(0.05))
            now = self.snapshot()
            if now == last:
                return now
            last = now
        return last

    async def _snapshot(self) -> dict[str, Any]:
        s = self.stack
        info = await s.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
        entries = await s.rmp_entries()
        maps = await s.rmp.ListHostMaps(rmp_pb2.ListHostMapsRequest(), metadata=HOST)
        leaked = await s.rmp.ListLeakedPages(rmp_pb2.ListLeakedPagesRequest(), metadata=HOST)
        policy = await s.rmp.GetViolationPolicy(rmp_pb2.GetViolationPolicyRequest(), metadata=HOST)
        sev = await s.psp.SevPlatformStatus(psp_pb2.SevPlatformStatusRequest(), metadata=HOST)
        ext = await s.psp.GetExtendedConfig(psp_pb2.GetExtendedConfigRequest(), metadata=HOST)
        vms = await s.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)
        devices = await s.netd.ListDevices(netd_pb2.ListDevicesRequest(), metadata=HOST)
        backed = 0
        for v in vms.vms:
            mm = await s.kvm.GetMemoryMap(kvm_pb2.GetMemoryMapRequest(vm=v.vm), metadata=HOST)
            backed += sum(r.size for r in mm.regions) // 4096
        snap: dict[str, Any] = {
            # resident_pages left out: the first touch of any page makes it resident (memory
            # backing, not RMP state), and a refused access may touch one. Likewise kvm takes
            # a guest's frames from the free ones when the guest first touches them: what
            # must not move is the free frames and those backing guest memory together.
            "platform": str(without(info, "resident_pages", "free_pages")),
            "frames": info.free_pages + backed,
            "rmp": entries,
            "host_maps": sorted((m.map_id, m.pfn, m.holder) for m in maps.maps),
            "leaked": list(leaked.pfns),
            "policy": int(policy.policy),
            "sev": str(sev),
            "ext_config": ext.SerializeToString(deterministic=True),
            "vms": sorted(v.SerializeToString(deterministic=True) for v in vms.vms),
            "devices": sorted(d.SerializeToString(deterministic=True) for d in devices.devices),
        }
        for v in vms.vms:
            if v.gctx.gctx_paddr:
                try:
                    g = await s.psp.GuestStatus(
                        psp_pb2.GuestStatusRequest(gctx=v.gctx), metadata=HOST
                    )
                    snap[f"gctx {v.gctx.gctx_paddr:#x}"] = str(g)
                except grpc.aio.AioRpcError as e:
                    snap[f"gctx {v.gctx.gctx_paddr:#x}"] = e.code().name
        if "guest" in self.channels:
            snap["guest"] = await self.guest_status()
        return snap

    async def guest_status(self) -> str:
        from snp.guest.v1 import guest_pb2_grpc

        stub = guest_pb2_grpc.GuestServiceStub(self.channels["guest"])
        r = await stub.GetStatus(guest_pb2.GetStatusRequest())
        del r.events[:]  # the event log records what the guest took (#VC, retries), not state
        return str(r)
