"""A gmem VM's page-state changes through gRPC, as the VMM sees them: each leaves kvm as a
KVM_HC_MAP_GPA_RANGE exit, the VMM answers with SetMemoryAttributes and RunVcpu, and the guest
gets its answer only then. The expected exits (which entries one exit merges, the args, what
the descriptor holds after) are those of the kernel's snp_begin_psc() / snp_complete_one_psc()
and snp_begin_psc_msr() (arch/x86/kvm/svm/sev.c), cited at each case."""

from __future__ import annotations

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb
from snp.rmp.v1 import rmp_pb2
from snpemu.abi import ghcb as g
from snpemu.abi import psc
from snpemu.runtime.status import error_info

from tests.service.host_stack import GHCB_GPA, HOST, Guest, Stack, psc_ghcb
from tests.service.host_stack import psc_entry as entry

PAGE = 4096
# KERNEL: include/uapi/linux/kvm.h, include/uapi/linux/kvm_para.h,
# arch/x86/include/uapi/asm/kvm_para.h
KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE, KVM_CAP_EXIT_HYPERCALL = 3, 12, 201
ENCRYPTED, SZ_2M = 1 << 4, 1 << 0
# KERNEL: arch/x86/include/asm/sev-common.h GHCB_MSR_PSC_REQ / _RESP, GHCB_MSR_PSC_RESP_ERROR
PSC_REQ, PSC_RESP, PSC_RESP_ERROR = 0x14, 0x15, (1 << 63) | 0x15
PRIVATE, SHARED, PSMASH = 1, 2, 3
PSC_ERROR_GENERIC = 0x100 << 32  # VMGEXIT_PSC_ERROR_GENERIC
EINVAL = 22
BAD, STATE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def msr_psc(gfn: int, op: int) -> int:
    return op << 52 | gfn << 12 | PSC_REQ


async def gmem_guest(s: Stack, *, exits: bool = True) -> Guest:
    """A gmem VM made by the host with the tiny firmware and launched; `exits`: the VMM enabled
    KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE, as QEMU does."""
    cfg = pb.VmConfig(memory_bytes=64 << 20, vcpus=1, firmware_path=str(s.firmware))
    vm = (
        await s.kvm.CreateVm(
            pb.CreateVmRequest(config=cfg, memory_model=pb.MEMORY_MODEL_GMEM), metadata=HOST
        )
    ).vm
    if exits:
        await s.kvm.EnableCap(
            pb.EnableCapRequest(vm=vm, cap=KVM_CAP_EXIT_HYPERCALL, args=[1 << 12]), metadata=HOST
        )
    r = await s.kvm.LaunchVm(pb.LaunchVmRequest(vm=vm), metadata=HOST)
    return Guest(s, vm, list(r.vcpus), bytes(r.measurement))


def vcpu(guest: Guest) -> handles_pb2.VcpuHandle:
    return handles_pb2.VcpuHandle(vm=guest.vm, vcpu_id=0)


def map_gpa(r: pb.VmgexitMsrResponse | pb.VmgexitResponse) -> tuple[int, int, int]:
    """The exit's (GPA, pages, attributes), checked to be a KVM_HC_MAP_GPA_RANGE exit."""
    assert r.HasField("exit"), r
    assert (r.exit.exit_reason, r.exit.hypercall.nr) == (KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE)
    gpa, npages, attrs = r.exit.hypercall.args[:3]
    return gpa, npages, attrs


async def answer(s: Stack, guest: Guest, r: pb.VmgexitMsrResponse | pb.VmgexitResponse) -> int:
    """The VMM's answer, as QEMU's kvm_convert_memory(): the attributes set; hypercall.ret."""
    gpa, npages, attrs = map_gpa(r)
    await s.kvm.SetMemoryAttributes(
        pb.SetMemoryAttributesRequest(
            vm=guest.vm, address=gpa, size=npages * PAGE, attributes=8 if attrs & ENCRYPTED else 0
        ),
        metadata=HOST,
    )
    return 0


async def share_ghcb(s: Stack, guest: Guest) -> None:
    r = await guest.msr(msr_psc(GHCB_GPA // PAGE, SHARED))
    ret = await answer(s, guest, r)
    done = await s.kvm.RunVcpu(
        pb.RunVcpuRequest(vcpu=vcpu(guest), hypercall_ret=ret), metadata=HOST
    )
    assert done.msr.ghcb_msr == PSC_RESP
    await guest.register_ghcb()


def psc_request(guest: Guest, entries: list[int], **kw: int) -> pb.VmgexitRequest:
    x = psc_ghcb(guest.ghcb_gpa, entries, **kw)
    return pb.VmgexitRequest(identity=guest.ident, ghcb=x.encode())


@pytest.mark.rpc("snp.kvm.v1.KvmService/EnableCap", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/RunVcpu", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/VmgexitMsr", "ok", "error")
async def test_an_msr_psc_exits_to_the_vmm_and_ends_when_it_runs_the_vcpu(stack: Stack) -> None:
    s = stack
    guest = await gmem_guest(s)
    gfn = 0x2000  # 32 MiB: RAM no launch touched
    # KERNEL: snp_begin_psc_msr(): KVM_EXIT_HYPERCALL, args {gpa, 1, ENCRYPTED|DECRYPTED | 4K}
    r = await guest.msr(msr_psc(gfn, SHARED))
    assert map_gpa(r) == (gfn * PAGE, 1, 0) and not r.ghcb_msr
    # out in the VMM: the vCPU runs no guest code, so no other exit is taken
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await guest.msr(msr_psc(gfn, PRIVATE))
    assert busy.value.code() == STATE
    assert error_info(busy.value).reason == "VCPU_IN_VMM"  # type: ignore[union-attr]
    # KERNEL: snp_complete_psc_msr(): hypercall.ret 0 is GHCB_MSR_PSC_RESP
    done = await s.kvm.RunVcpu(pb.RunVcpuRequest(vcpu=vcpu(guest), hypercall_ret=0), metadata=HOST)
    assert done.WhichOneof("completed") == "msr" and done.msr.ghcb_msr == PSC_RESP
    # nothing is out any more: KVM_RUN has no exit to complete
    with pytest.raises(grpc.aio.AioRpcError) as none:
        await s.kvm.RunVcpu(pb.RunVcpuRequest(vcpu=vcpu(guest)), metadata=HOST)
    assert none.value.code() == STATE
    assert error_info(none.value).reason == "NO_PENDING_EXIT"  # type: ignore[union-attr]
    # an error from the VMM is GHCB_MSR_PSC_RESP_ERROR
    r = await guest.msr(msr_psc(gfn, PRIVATE))
    assert map_gpa(r) == (gfn * PAGE, 1, ENCRYPTED)
    done = await s.kvm.RunVcpu(
        pb.RunVcpuRequest(vcpu=vcpu(guest), hypercall_ret=EINVAL), metadata=HOST
    )
    assert done.msr.ghcb_msr == PSC_RESP_ERROR
    # KERNEL: snp_begin_psc_msr(): an operation other than PRIVATE/SHARED is answered at once
    assert (await guest.msr(msr_psc(gfn, PSMASH))).ghcb_msr == PSC_RESP_ERROR
    # KERNEL: snp_begin_psc_msr(): without KVM_CAP_EXIT_HYPERCALL, PSC_RESP_ERROR and no exit
    other = await gmem_guest(s, exits=False)
    r = await other.msr(msr_psc(gfn, SHARED))
    assert not r.HasField("exit") and r.ghcb_msr == PSC_RESP_ERROR


@pytest.mark.rpc("snp.kvm.v1.KvmService/Vmgexit", "ok")
async def test_a_ghcb_psc_goes_to_the_vmm_one_merged_range_at_a_time(stack: Stack) -> None:
    s = stack
    guest = await gmem_guest(s)
    await share_ghcb(s, guest)
    a, b = 0x2000, 0x2200  # gfns 32 MiB and 34 MiB (2M aligned)
    entries = [
        entry(a, PRIVATE),
        entry(a + 1, PRIVATE),  # adjacent, same operation: merged with the first
        entry(a + 2, SHARED),  # another operation: a range of its own
        entry(0x3000, PSMASH),  # not forwarded: completed without an exit
        entry(b, SHARED, size_2m=True),
        entry(b + 512, SHARED, size_2m=True),  # adjacent 2M: merged, 512 pages more
    ]
    # KERNEL: snp_begin_psc(): entries with adjacent GPAs and the same operation and size in
    # one exit; args[2] ENCRYPTED or DECRYPTED | the first entry's page size
    r = await s.kvm.Vmgexit(psc_request(guest, entries))
    assert map_gpa(r) == (a * PAGE, 2, ENCRYPTED)
    seen = []
    for _ in range(3):
        ret = await answer(s, guest, r)
        done = await s.kvm.RunVcpu(
            pb.RunVcpuRequest(vcpu=vcpu(guest), hypercall_ret=ret), metadata=HOST
        )
        r = done.ghcb
        if not r.HasField("exit"):
            break
        seen.append(map_gpa(r))
    assert seen == [((a + 2) * PAGE, 1, 0), (b * PAGE, 1024, SZ_2M)]
    # the guest's answer at last: success, and the descriptor as __snp_complete_one_psc()
    # leaves it (every entry's cur_page its page count, cur_entry past end_entry)
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (0, 0)
    desc = psc.Descriptor.decode(bytes(g.Ghcb.decode(r.ghcb).shared))
    assert desc.cur_entry == len(entries)
    assert [e.cur_page for e in desc.entries[: len(entries)]] == [1, 1, 1, 1, 512, 512]
    # and in guest memory: kvm wrote the GHCB back only now
    back = await guest.read(GHCB_GPA, PAGE, private=False)
    assert back.data == r.ghcb


async def test_a_failed_range_stops_the_psc_where_it_was(stack: Stack) -> None:
    s = stack
    guest = await gmem_guest(s)
    await share_ghcb(s, guest)
    a = 0x2000
    # a partly done 2M entry (cur_page 3) is finished 4K from page 3, but KVM still reports the
    # entry's 2M page size in args[2] (KERNEL: snp_begin_psc(): entry_start.pagesize)
    entries = [entry(a, SHARED, size_2m=True, cur_page=3), entry(a + 512, PRIVATE)]
    r = await s.kvm.Vmgexit(psc_request(guest, entries))
    assert map_gpa(r) == ((a + 3) * PAGE, 509, SZ_2M)
    done = await s.kvm.RunVcpu(pb.RunVcpuRequest(vcpu=vcpu(guest)), metadata=HOST)
    assert map_gpa(done.ghcb) == ((a + 512) * PAGE, 1, ENCRYPTED)
    # KERNEL: snp_complete_one_psc(): hypercall.ret != 0 is VMGEXIT_PSC_ERROR_GENERIC, the range
    # in flight left as it was
    done = await s.kvm.RunVcpu(
        pb.RunVcpuRequest(vcpu=vcpu(guest), hypercall_ret=EINVAL), metadata=HOST
    )
    r = done.ghcb
    assert not r.HasField("exit") and r.sw_exit_info_2 == PSC_ERROR_GENERIC
    desc = psc.Descriptor.decode(bytes(g.Ghcb.decode(r.ghcb).shared))
    assert desc.cur_entry == 1 and [e.cur_page for e in desc.entries[:2]] == [512, 0]


async def test_the_rmp_follows_the_attributes_of_a_running_gmem_vm(stack: Stack) -> None:
    """sev_gmem_prepare() / sev_gmem_invalidate(): a page the guest touched privately is
    assigned to its ASID, not validated; the VMM's SetMemoryAttributes(shared) makes it
    hypervisor-owned, SetMemoryAttributes(private) assigned again."""
    s = stack
    guest = await gmem_guest(s)
    gpa = 0x2000 * PAGE
    # the guest's first private touch: #NPF, the page backed and (private by default) prepared,
    # then the PVALIDATE again
    v = await guest.pvalidate(gpa)
    assert v.fault.npf
    n = await s.kvm.NestedPageFault(
        pb.NestedPageFaultRequest(identity=guest.ident, gpa=gpa, error_code=v.fault.error_code)
    )
    assert n.action == "map" and n.retry
    v = await guest.pvalidate(gpa)
    assert not v.HasField("fault"), v

    async def entry_of() -> rmp_pb2.RmpEntry:
        mm = await s.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=guest.vm), metadata=HOST)
        spa = next(r.spa + gpa - r.gpa for r in mm.regions if r.gpa <= gpa < r.gpa + r.size)
        got = await s.rmp.ListRmpEntries(
            rmp_pb2.ListRmpEntriesRequest(first_pfn=spa // PAGE, count=1), metadata=HOST
        )
        return got.entries[0] if got.entries else rmp_pb2.RmpEntry()

    e = await entry_of()
    assert e.assigned and e.asid == guest.ident.asid and e.gpa == gpa and e.validated

    async def attrs(private: bool) -> None:
        await s.kvm.SetMemoryAttributes(
            pb.SetMemoryAttributesRequest(
                vm=guest.vm, address=gpa, size=PAGE, attributes=8 if private else 0
            ),
            metadata=HOST,
        )

    await attrs(False)
    assert not (await entry_of()).assigned
    await attrs(True)
    e = await entry_of()
    assert e.assigned and e.asid == guest.ident.asid and not e.validated


@pytest.mark.fidelity
@pytest.mark.rpc("snp.kvm.v1.KvmService/EnableCap", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "error")
async def test_enable_cap_and_memory_model_refusals(stack: Stack) -> None:
    """KERNEL: arch/x86/kvm/x86.c kvm_vm_ioctl_enable_cap(): nonzero flags, another cap, or
    KVM_CAP_EXIT_HYPERCALL bits outside KVM_EXIT_HYPERCALL_VALID_MASK are -EINVAL."""
    s = stack
    vm = (await s.kvm.CreateVm(pb.CreateVmRequest(), metadata=HOST)).vm
    for req in (
        pb.EnableCapRequest(vm=vm, cap=KVM_CAP_EXIT_HYPERCALL, flags=1, args=[1 << 12]),
        pb.EnableCapRequest(vm=vm, cap=KVM_CAP_EXIT_HYPERCALL, args=[1 << 11]),
        pb.EnableCapRequest(vm=vm, cap=KVM_CAP_EXIT_HYPERCALL, args=[1, 2, 3, 4, 5]),
        pb.EnableCapRequest(vm=vm, cap=7, args=[1]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.kvm.EnableCap(req, metadata=HOST)
        assert info.value.code() == BAD, req
        assert error_info(info.value).metadata["errno"] == "EINVAL"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.kvm.CreateVm(pb.CreateVmRequest(memory_model=9), metadata=HOST)  # type: ignore[arg-type]
    assert info.value.code() == BAD
    info_vm = (await s.kvm.GetVm(pb.GetVmRequest(vm=vm), metadata=HOST)).vm
    assert info_vm.memory_model == pb.MEMORY_MODEL_V5  # unset: the v5 kind, for now


async def test_an_exit_read_from_guest_memory_is_answered_there(stack: Stack) -> None:
    """A Vmgexit that did not carry the GHCB gets none back, forwarded or not: kvm answers
    in guest memory (kvm.proto VmgexitResponse.ghcb)."""
    s = stack
    guest = await gmem_guest(s)
    await share_ghcb(s, guest)
    x = psc_ghcb(guest.ghcb_gpa, [entry(0x2000, SHARED)])
    await guest.write(GHCB_GPA, x.encode(), private=False)
    r = await s.kvm.Vmgexit(pb.VmgexitRequest(identity=guest.ident))
    assert map_gpa(r) == (0x2000 * PAGE, 1, 0)
    done = await s.kvm.RunVcpu(pb.RunVcpuRequest(vcpu=vcpu(guest)), metadata=HOST)
    assert not done.ghcb.HasField("exit") and done.ghcb.ghcb == b""
    back = g.Ghcb.decode((await guest.read(GHCB_GPA, PAGE, private=False)).data)
    assert back.get("sw_exit_info_2") == 0
    assert psc.Descriptor.decode(bytes(back.shared)).cur_entry == 1
