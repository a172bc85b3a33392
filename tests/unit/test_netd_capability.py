"""netd's devices as capabilities, through its servicer with the caller the runtime records:
a VMM acts only on its own VM (kvm checks the VM token netd passes on) and on devices whose
token it holds; the host on anything. Every refusal changes nothing (the issue's reports)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.netd.v1 import netd_pb2 as pb
from snpemu.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SnpemuError,
    WrongState,
)
from snpemu.netd.daemon import DEVICES_PER_VM, NetDaemon, VmRef
from snpemu.netd.kvm_client import KvmVmm
from snpemu.netd.reasons import NetdReason
from snpemu.netd.servicer import NetdServicer
from snpemu.runtime.caller import HOST, Caller, Role, set_caller
from snpemu.runtime.peers import PeerError
from snpemu.runtime.status import to_status

from tests.unit.test_netd_model import FakeMemory

A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
TOKENS = {"vm-a": b"a" * 32, "vm-b": b"b" * 32}
GUEST_A, GUEST_B = Caller(Role.VMM, "guest-a"), Caller(Role.VMM, "guest-b")
# virtio 1.2 2.7: an 8-entry split ring fits a page; the buffers follow, RX then TX
RX = pb.Ring(ring_gpa=0x0, buffers_gpa=0x2000, entries=8, buffer_size=2048)
TX = pb.Ring(ring_gpa=0x1000, buffers_gpa=0x6000, entries=8, buffer_size=2048)


class TokenVmm:
    """kvm as netd sees it: a VM token, when sent, must be the VM's (a host call may omit it)."""

    def __init__(self) -> None:
        self.asked: list[VmRef] = []

    async def memory_map(
        self, vm: VmRef, populate: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        self.asked.append(vm)
        if vm.id not in TOKENS:
            raise NotFound(f"no VM {vm.id}", reason=NetdReason.UNKNOWN_VM)
        if vm.token and vm.token != TOKENS[vm.id]:
            raise PermissionDenied("wrong VM token", reason="VM_TOKEN_WRONG")
        base = 0 if vm.id == "vm-a" else 1 << 19
        return [(0, base, 1 << 19)]


@pytest.fixture
def netd() -> NetdServicer:
    return NetdServicer(NetDaemon(FakeMemory(), TokenVmm()), 0)


async def as_caller(caller: Caller, call: Callable[[], Awaitable[Any]]) -> Any:
    """The call in a context of its own with `caller` recorded, as the runtime runs an RPC."""

    async def run() -> Any:
        set_caller(caller)
        return await call()

    return await asyncio.get_running_loop().create_task(run(), context=contextvars.copy_context())


def vm(name: str, token: bytes | None = None) -> handles_pb2.VmHandle:
    return handles_pb2.VmHandle(id=name, token=TOKENS[name] if token is None else token)


async def register(
    netd: NetdServicer, caller: Caller, handle: handles_pb2.VmHandle, mac: str
) -> pb.DeviceHandle:
    req = pb.RegisterDeviceRequest(vm=handle, mac=mac, rx=RX, tx=TX)
    r = await as_caller(caller, lambda: netd.RegisterDevice(req, None))
    return r.device  # type: ignore[no-any-return]


def snapshot(netd: NetdServicer) -> tuple[object, ...]:
    d = netd.d
    return (
        sorted(d.devices),
        sorted(d.by_mac),
        dict(netd.holds),
        [(dev.tx_avail, dev.tx_used, dev.rx_avail, dev.rx_used) for dev in d.devices.values()],
    )


async def test_a_vmm_registers_only_on_its_own_vm_and_kvm_checks_the_token(
    netd: NetdServicer,
) -> None:
    vmm = netd.d.vmm
    assert isinstance(vmm, TokenVmm)
    before = snapshot(netd)
    with pytest.raises(PermissionDenied) as info:  # the VM id alone is public: not enough
        await register(netd, GUEST_B, vm("vm-a", b""), B)
    assert info.value.reason == NetdReason.VM_TOKEN_MISSING
    assert vmm.asked == []  # refused before kvm was asked
    with pytest.raises(PermissionDenied) as info:  # guest-b's VM token on guest-a's VM
        await register(netd, GUEST_B, vm("vm-a", TOKENS["vm-b"]), B)
    assert info.value.reason == "VM_TOKEN_WRONG"  # kvm's refusal keeps its code and reason
    assert snapshot(netd) == before

    dev = await register(netd, GUEST_A, vm("vm-a"), A)
    # the handle went to kvm as the caller sent it, token included
    assert vmm.asked[-1] == VmRef("vm-a", TOKENS["vm-a"])
    assert len(dev.token) == 32 and dev.id
    host = await register(netd, HOST, vm("vm-b", b""), B)  # the host may omit the VM token
    assert host.token not in (b"", dev.token)
    listed = await as_caller(HOST, lambda: netd.ListDevices(pb.ListDevicesRequest(), None))
    assert {d.mac for d in listed.devices} == {A, B}
    assert not any(d.device.token for d in listed.devices)  # never shown again
    with pytest.raises(PermissionDenied):
        await as_caller(GUEST_A, lambda: netd.ListDevices(pb.ListDevicesRequest(), None))


def calls(netd: NetdServicer, device: pb.DeviceHandle) -> Iterator[Callable[[], Awaitable[Any]]]:
    """Every RPC on a device (HoldDevice up to its first message)."""

    async def hold() -> Any:
        stream: AsyncIterator[Any] = netd.HoldDevice(pb.HoldDeviceRequest(device=device), None)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    yield lambda: netd.GetDeviceStats(pb.GetDeviceStatsRequest(device=device), None)
    yield lambda: netd.NotifyQueue(pb.NotifyQueueRequest(device=device, queue=pb.QUEUE_TX), None)
    yield lambda: netd.UnregisterDevice(pb.UnregisterDeviceRequest(device=device), None)
    yield hold


async def test_no_vmm_acts_on_a_device_whose_token_it_lacks(netd: NetdServicer) -> None:
    """The issue: a VMM could unregister another guest's device (or hold and hang up on it)."""

    a = await register(netd, GUEST_A, vm("vm-a"), A)
    b = await register(netd, GUEST_B, vm("vm-b"), B)
    before = snapshot(netd)
    refusals = [
        (GUEST_B, pb.DeviceHandle(id=a.id), NetdReason.DEVICE_TOKEN_MISSING),
        (GUEST_B, pb.DeviceHandle(id=a.id, token=b.token), NetdReason.DEVICE_TOKEN_WRONG),
        # a token that is sent must be the device's, even from the host
        (HOST, pb.DeviceHandle(id=a.id, token=b.token), NetdReason.DEVICE_TOKEN_WRONG),
    ]
    for caller, handle, reason in refusals:
        for call in calls(netd, handle):
            with pytest.raises(PermissionDenied) as info:
                await as_caller(caller, call)
            assert info.value.reason == reason
            assert snapshot(netd) == before
    # its holder, and the host without a token, may: a's VMM unregisters it, the host holds
    # b's and hangs up (which drops it, as a VMM's death does)
    stats, notify, unregister, hold = calls(netd, a)
    for call in (stats, notify, unregister):
        await as_caller(GUEST_A, call)
    *_, hold = calls(netd, pb.DeviceHandle(id=b.id))
    await as_caller(HOST, hold)
    assert netd.d.devices == {}


async def test_the_host_unregistering_a_device_ends_its_hold(netd: NetdServicer) -> None:
    a = await register(netd, GUEST_A, vm("vm-a"), A)
    stream = netd.HoldDevice(pb.HoldDeviceRequest(device=a), None)

    async def held() -> list[Any]:
        set_caller(GUEST_A)
        return [m async for m in stream]

    task = asyncio.get_running_loop().create_task(held(), context=contextvars.copy_context())
    deadline = asyncio.get_running_loop().time() + 10
    while a.id not in netd.holds:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await as_caller(
        HOST,
        lambda: netd.UnregisterDevice(
            pb.UnregisterDeviceRequest(device=pb.DeviceHandle(id=a.id)), None
        ),
    )
    first, *rest = await asyncio.wait_for(task, 10)  # the stream ended by itself
    assert first.device == pb.DeviceHandle(id=a.id) and rest == []
    assert netd.holds == {} and netd.d.devices == {}


HUGE = "x" * (1 << 20)


def _ring(r: pb.Ring) -> dict[str, int]:
    return {f: getattr(r, f) for f in ("ring_gpa", "buffers_gpa", "entries", "buffer_size")}


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        (dict(mac=A, rx=RX, tx=TX), InvalidArgument, None),  # no VM
        (dict(vm=handles_pb2.VmHandle(id=HUGE), mac=A, rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=handles_pb2.VmHandle(id="vm-a\n"), mac=A, rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a", b"t" * 65), mac=A, rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac=HUGE, rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac="02:00:00:00:00:0g", rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac=" 2:00:00:00:00:01", rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac="00:00:00:00:00:00", rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac="ff:ff:ff:ff:ff:ff", rx=RX, tx=TX), InvalidArgument, None),
        (dict(vm=vm("vm-a"), mac=A, tx=TX), InvalidArgument, None),
        # the issue: RX and TX rings at the same GPA
        (dict(vm=vm("vm-a"), mac=A, rx=RX, tx=RX), InvalidArgument, NetdReason.RINGS_OVERLAP),
        (
            dict(vm=vm("vm-a"), mac=A, rx=RX, tx=pb.Ring(**{**_ring(TX), "ring_gpa": 0x3000})),
            InvalidArgument,
            NetdReason.RINGS_OVERLAP,  # TX ring page inside the RX buffers
        ),
        (
            dict(vm=vm("vm-a"), mac=A, rx=RX, tx=pb.Ring(**{**_ring(TX), "buffers_gpa": 0x1800})),
            InvalidArgument,
            NetdReason.RINGS_OVERLAP,  # TX buffers over its own ring page
        ),
        (
            dict(vm=vm("vm-a"), mac=A, rx=RX, tx=pb.Ring(**{**_ring(TX), "buffer_size": 1 << 20})),
            InvalidArgument,
            None,
        ),
        (
            dict(vm=vm("vm-a"), mac=A, rx=RX, tx=pb.Ring(**{**_ring(TX), "ring_gpa": 0x1001})),
            InvalidArgument,
            None,
        ),
        (
            dict(vm=vm("vm-a"), mac=A, rx=RX, tx=pb.Ring(**{**_ring(TX), "ring_gpa": 1 << 63})),
            InvalidArgument,
            None,  # outside the guest's memory
        ),
        (dict(vm=vm("vm-x", b""), mac=A, rx=RX, tx=TX), NotFound, NetdReason.UNKNOWN_VM),
        (dict(vm=vm("vm-b"), mac=B, rx=RX, tx=TX), AlreadyExists, NetdReason.MAC_IN_USE),
    ],
)
async def test_register_checks_every_field_and_keeps_nothing_it_refused(
    netd: NetdServicer, fields: dict[str, Any], error: type[SnpemuError], reason: str | None
) -> None:
    await register(netd, HOST, vm("vm-b"), B)
    before = snapshot(netd)
    req = pb.RegisterDeviceRequest(**fields)
    with pytest.raises(error) as info:
        await as_caller(HOST, lambda: netd.RegisterDevice(req, None))
    if reason is not None:
        assert info.value.reason == reason
    assert len(info.value.message) < 300  # at most a short prefix of the input
    assert snapshot(netd) == before


@pytest.mark.parametrize(
    "device",
    [
        pb.DeviceHandle(),
        pb.DeviceHandle(id=HUGE),
        pb.DeviceHandle(id="dev\x00"),
        pb.DeviceHandle(id="0123456789abcdef", token=b"t" * (1 << 20)),
    ],
)
async def test_device_calls_refuse_a_malformed_handle_with_a_short_message(
    netd: NetdServicer, device: pb.DeviceHandle
) -> None:
    await register(netd, HOST, vm("vm-a"), A)
    before = snapshot(netd)
    for call in calls(netd, device):
        with pytest.raises(InvalidArgument) as info:
            await as_caller(HOST, call)
        assert len(info.value.message) < 300
        assert snapshot(netd) == before


async def test_notify_checks_the_queue_before_the_device(netd: NetdServicer) -> None:
    a = await register(netd, GUEST_A, vm("vm-a"), A)
    for queue in (0, 3, 99):
        req = pb.NotifyQueueRequest(device=a, queue=queue)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await as_caller(GUEST_A, lambda req=req: netd.NotifyQueue(req, None))
    with pytest.raises(NotFound) as info:
        await as_caller(
            GUEST_A,
            lambda: netd.NotifyQueue(
                pb.NotifyQueueRequest(device=pb.DeviceHandle(id="nope"), queue=pb.QUEUE_TX), None
            ),
        )
    # a VMM tells "netd restarted" from "my device was dropped" by the boot id
    assert info.value.metadata == {"daemon_boot_id": netd.d.boot_id}


async def test_devices_a_vm_may_keep_are_bounded(netd: NetdServicer) -> None:
    for i in range(DEVICES_PER_VM):
        await register(netd, GUEST_A, vm("vm-a"), f"02:00:00:00:01:{i:02x}")
    before = snapshot(netd)
    with pytest.raises(WrongState) as info:
        await register(netd, GUEST_A, vm("vm-a"), "02:00:00:00:02:00")
    assert info.value.reason == NetdReason.TOO_MANY_DEVICES
    assert snapshot(netd) == before
    await register(netd, GUEST_B, vm("vm-b"), B)  # another VM is not held back


def _kvm_refusal(err: SnpemuError) -> PeerError:
    status = to_status(err, "kvm")
    rpc_error = grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )
    return PeerError("kvm", "GetMemoryMap", rpc_error)


class RefusingKvm:
    """The kvm peer: records each request and answers with `err`."""

    def __init__(self, err: PeerError) -> None:
        self.err = err
        self.requests: list[Any] = []

    def ensure(self) -> Any:
        return type("Stub", (), {"GetMemoryMap": None})()

    async def invoke(self, rpc: object, request: Any, timeout: float = 30) -> Any:
        self.requests.append(request)
        raise self.err


@pytest.mark.parametrize(
    ("kvm_says", "netd_raises", "reason"),
    [
        (PermissionDenied("wrong token", reason="VM_TOKEN_WRONG"), PermissionDenied, None),
        (NotFound("no VM", reason="NO_SUCH_VM"), NotFound, NetdReason.UNKNOWN_VM),
        (InvalidArgument("bad id"), InvalidArgument, None),
    ],
)
async def test_kvm_refusals_keep_their_code(
    kvm_says: SnpemuError, netd_raises: type[SnpemuError], reason: str | None
) -> None:
    kvm = RefusingKvm(_kvm_refusal(kvm_says))
    with pytest.raises(netd_raises) as info:
        await KvmVmm(kvm).memory_map(VmRef("vm-a", TOKENS["vm-a"]), [])  # type: ignore[arg-type]
    assert type(info.value) is netd_raises  # not PeerError: that is INTERNAL
    assert info.value.reason == (reason or kvm_says.reason)
    assert kvm.requests[0].vm == handles_pb2.VmHandle(id="vm-a", token=TOKENS["vm-a"])
