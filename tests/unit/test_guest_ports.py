"""The guest kernel against in-process fakes of its ports, and the gRPC side of the ports:
the vCPU identity on the wire, Peer.invoke's and StreamPool's error translation."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.abi.addr import Gpa
from snpemu.errors import SnpemuError, Unavailable, WrongState
from snpemu.guest.errors import GuestFault, Terminated
from snpemu.guest.exits import BootState
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.ports import (
    Batch,
    Fault,
    GhcbReply,
    Instruction,
    MsrReply,
    NpfReply,
    Read,
    VmHandle,
    VmStatus,
)
from snpemu.guest.rmp_client import GuestSessions
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.wire import identity_from_pb, identity_to_pb
from snpemu.runtime.peers import Peer, PeerError
from snpemu.runtime.status import to_status

VCPU = VcpuIdentity("vm-1", 0, 7, b"t" * 32)


def rpc_error(code: grpc.StatusCode, err: SnpemuError | None = None) -> grpc.aio.AioRpcError:
    if err is None:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    st = to_status(err, "kvm")
    return grpc.aio.AioRpcError(
        st.code, grpc.aio.Metadata(), grpc.aio.Metadata(*st.trailing_metadata), st.details
    )


def test_the_identity_goes_on_the_wire_as_kvm_issued_it() -> None:
    msg = identity_to_pb(VCPU)
    assert (msg.vcpu.vm.id, msg.vcpu.vcpu_id, msg.asid, msg.vmpl, msg.token) == (
        "vm-1",
        0,
        7,
        0,
        b"t" * 32,
    )
    assert identity_from_pb(msg) == VCPU


async def test_invoke_translates_a_peers_errors() -> None:
    peer = Peer("kvm", "unused", "cred", None)

    def failing(error: grpc.aio.AioRpcError) -> Any:
        async def rpc(request: Any, *, metadata: Any, timeout: float) -> Any:
            assert metadata == peer.md
            raise error

        return rpc

    req = kvm_pb2.VmgexitMsrRequest()
    with pytest.raises(Unavailable):
        (await peer.invoke(failing(rpc_error(grpc.StatusCode.UNAVAILABLE)), req))
    err = rpc_error(
        grpc.StatusCode.FAILED_PRECONDITION, WrongState("stopped", reason="VM_TERMINATED")
    )
    with pytest.raises(PeerError) as info:
        (await peer.invoke(failing(err), req))
    assert info.value.reason == ExitReason.VM_TERMINATED
    assert info.value.message.startswith("kvm ") and info.value.message.endswith(": stopped")


class Stream:
    def __init__(self, replies: list[Any]) -> None:
        self.replies, self.sent, self.cancelled = replies, [], False

    async def write(self, msg: Any) -> None:
        self.sent.append(msg)

    async def read(self) -> Any:
        return self.replies.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


async def test_guest_sessions_reuse_a_stream_and_raise_what_came_back() -> None:
    ok = rmp_pb2.GuestSessionResponse(read=rmp_pb2.GuestReadResponse(data=b"x"))
    bad = rmp_pb2.GuestSessionResponse(error=rmp_pb2.SessionError(message="no", reason="NOPE"))
    stream = Stream([ok, bad, grpc.aio.EOF])
    peer = Peer("rmp", "unused", None, None)
    opened: list[Any] = []
    peer.ensure = lambda: SimpleNamespace(  # type: ignore[method-assign]
        GuestSession=lambda metadata: opened.append(metadata) or stream
    )
    pool = GuestSessions(peer, size=1)
    msgs = [rmp_pb2.GuestSessionRequest(read=rmp_pb2.GuestReadRequest(gpa=i)) for i in range(3)]

    assert (await pool.exchange(msgs[0])).read.data == b"x"
    with pytest.raises(SnpemuError) as info:
        await pool.exchange(msgs[1])
    assert info.value.reason == "NOPE"
    with pytest.raises(Unavailable):
        await pool.exchange(msgs[2])
    assert stream.cancelled and pool.opened == 0
    assert stream.sent == msgs and opened == [()]


class Host:
    """kvm and rmp as the kernel's ports: the exits, the VMM, and guest-mode rmp."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.npfs: list[tuple[VcpuIdentity, Gpa]] = []
        self.terminated_by_host = False

    async def vmgexit_msr(self, vcpu: VcpuIdentity, value: int) -> MsrReply:
        if self.terminated_by_host:
            raise PeerError(
                "kvm",
                "VmgexitMsr",
                rpc_error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    WrongState("killed", reason="VM_TERMINATED"),
                ),
            )
        return MsrReply(value)

    async def vmgexit(self, vcpu: VcpuIdentity, ghcb: bytes) -> GhcbReply:
        return GhcbReply(0, 0, False, ghcb)

    async def nested_page_fault(self, vcpu: VcpuIdentity, gpa: Gpa, error_code: int) -> NpfReply:
        self.npfs.append((vcpu, gpa))
        return NpfReply("convert", True)

    async def get_vm(self, vm: VmHandle) -> VmStatus:
        return VmStatus(1, 2)

    async def read(self, vcpu: VcpuIdentity, gpa: Gpa, length: int, *, private: bool) -> Read:
        if self.faults:
            return Read(b"", self.faults.pop(0))
        return Read(b"d" * length, None)

    async def write(
        self, vcpu: VcpuIdentity, gpa: Gpa, data: bytes, *, private: bool
    ) -> Fault | None:
        return self.faults.pop(0) if self.faults else None

    async def pvalidate_batch(
        self, vcpu: VcpuIdentity, gpas: Sequence[Gpa], *, validate: bool
    ) -> Batch:
        return Batch(bytes(len(gpas)), None)

    async def pvalidate(
        self, vcpu: VcpuIdentity, gpa: Gpa, *, size_2m: bool, validate: bool
    ) -> Instruction:
        return Instruction(0, None)


def kernel(host: Host, terminate_on_vc: bool = False) -> GuestKernel:
    opts = SimpleNamespace(
        firmware="none",
        memory_bytes=64 << 20,
        eager=True,
        terminate_on_vc=terminate_on_vc,
        memory_model=2,  # v5 (kvm.proto MemoryModel)
    )
    k = GuestKernel("t", opts, exits=host, vmm=host, rmp=host, default_firmware="none")  # type: ignore[arg-type]
    k.vm, k.vcpus, k.state = VmHandle("vm-1"), [VCPU], BootState.RUNNING
    return k


async def test_an_npf_goes_to_kvm_and_the_access_is_retried() -> None:
    host = Host()
    host.faults = [Fault(False, True, 1 << 31, Gpa(0x5000), "rmp")]
    k = kernel(host)
    assert (await k.read(0x5000, 4, shared=True)) == b"dddd"
    assert host.npfs == [(VCPU, 0x5000)] and k.event_counts["npf"] == 1


async def test_a_vc_is_a_guest_fault_or_the_guest_terminates() -> None:
    host = Host()
    host.faults = [Fault(True, False, 0, Gpa(0x6000), "not validated")]
    with pytest.raises(GuestFault):
        (await kernel(host).write(0x6000, b"x", shared=False))
    host.faults = [Fault(True, False, 0, Gpa(0x6000), "not validated")]
    k = kernel(host, terminate_on_vc=True)
    with pytest.raises(Terminated):
        (await k.write(0x6000, b"x", shared=False))
    assert k.state == BootState.TERMINATED


async def test_a_vm_the_host_terminated_answers_as_terminated() -> None:
    host = Host()
    host.terminated_by_host = True
    k = kernel(host)
    with pytest.raises(Terminated):
        (await k.msr_exit(0x2))
    assert k.state == BootState.TERMINATED and k.term_reason == (1, 2)
