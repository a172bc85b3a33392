"""kvm over real gRPC with real rmp and psp services (all in-process, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu import kvm as kvm_service
from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi import msr_protocol as msr
from snpemu.abi import psc
from snpemu.kvm.reasons import KvmReason
from snpemu.psp import report as rpt
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime
from snpemu.runtime.status import error_info

from tests.conftest import FakeClock, eventually, sev_snp_measure, tool
from tests.service.host_stack import CRED, HOST, Guest, Stack, host_stack, psc_buffer, psc_ghcb
from tests.service.host_stack import psc_entry as entry


def report_req(data: bytes = bytes(64)) -> bytes:
    return data + bytes(32)


async def test_bring_up_and_launch_measurement_matches_sev_snp_measure(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()  # host_stack's: kvm's image directory
    kernel, initrd = tmp_path / "images" / "vmlinuz", tmp_path / "images" / "initrd"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 500)

    async with host_stack(tmp_path) as s:
        status = await s.psp.SevPlatformStatus(psp_pb2.SevPlatformStatusRequest(), metadata=HOST)
        assert status.state == psp_pb2.PLATFORM_STATE_INIT  # legacy SEV INIT after SNP
        plain = await s.launch(vcpus=2, vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_MILAN)
        hashed = await s.launch(
            vcpus=1,
            vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_GENOA,
            kernel_path=str(kernel),
            initrd_path=str(initrd),
            cmdline="console=ttyS0",
        )
        sent = await s.launch(  # the same images as bytes: the same measurement
            vcpus=1,
            vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_GENOA,
            firmware_path="",
            firmware=s.firmware.read_bytes(),
            kernel=kernel.read_bytes(),
            initrd=initrd.read_bytes(),
            cmdline="console=ttyS0",
        )
        assert sent.measurement == hashed.measurement
        plain, hashed, fw = plain.measurement, hashed.measurement, s.firmware

    assert plain.hex() == sev_snp_measure(ovmf=str(fw))
    assert hashed.hex() == sev_snp_measure(
        *("--kernel", str(kernel), "--initrd", str(initrd), "--append", "console=ttyS0"),
        ovmf=str(fw),
        vcpus=1,
        vcpu_type="EPYC-Genoa",
    )


@pytest.mark.parametrize(
    ("setting", "name", "eax"),
    # go-sev-guest kds/kds.go steppingDecoder and its tests: Milan-B0 is CPUID(1).EAX
    # 0x00a00f10, Milan-B1 0x00a00f11 (sev-snp-measure vcpu_types.py EPYC-Milan)
    [("0", "Milan-B0", 0x00A00F10), (None, "Milan-B1", 0x00A00F11)],
)
async def test_host_stepping_names_the_vcek_and_is_the_guests_cpuid(
    tmp_path: Path, setting: str | None, name: str, eax: int
) -> None:
    """SNPEMU_CPU_STEPPING: the VCEK's productName, the report's CPUID_STEP, kvm's CPUID(1)
    and the VMSA's RDX (so the launch measurement sev-snp-measure predicts for that signature)
    all follow it."""

    env = {} if setting is None else {"SNPEMU_CPU_STEPPING": setting}
    async with host_stack(tmp_path, psp_env=env) as s:
        certs = await s.psp.GetCertificates(psp_pb2.GetCertificatesRequest(), metadata=HOST)
        assert certs.product_name == name
        vcek = x509.load_der_x509_certificate(certs.vcek_der)
        ext = vcek.extensions.get_extension_for_oid(
            x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")  # KDS productName, IA5String
        )
        assert ext.value.value == b"\x16" + bytes([len(name)]) + name.encode()  # type: ignore[attr-defined]
        guest = await s.launch(vcpus=1, vcpu_type=kvm_pb2.VCPU_TYPE_EPYC_MILAN)
        leaf1_eax = (await guest.msr(0x1 << 32 | 0 << 30 | msr.CPUID_REQ)).ghcb_msr
        assert leaf1_eax == eax << 32 | msr.CPUID_RESP
        await guest.register_ghcb()
        _, _, payload = await guest.guest_request(report_req())
        assert payload is not None
        # report version 3: CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP at 0x188..0x18A
        report = payload[0x20 : 0x20 + 0x4A0]
        assert tuple(report[0x188:0x18B]) == (0x19, 0x01, eax & 0xF)
        measurement, fw = guest.measurement, s.firmware
    predicted = subprocess.run(
        [
            *(tool("sev-snp-measure"), "--mode", "snp", "--ovmf", str(fw), "--vcpus", "1"),
            *("--vcpu-sig", hex(eax)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    assert measurement.hex() == predicted


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "error")
async def test_create_vm_validates_its_config(stack: Stack) -> None:
    """Bad configs, and images kvm must not read (the issue's cases: a FIFO as kernel_path
    froze kvm, /etc/hostname as firmware and a missing or directory kernel answered UNKNOWN),
    each answered promptly with its code and reason, and no VM made."""
    d = stack.firmware.parent  # kvm's image directory
    os.mkfifo(d / "fifo")
    shutil.copy("/etc/hostname", d / "hostname")
    (d / "kernels").mkdir()
    (d / "escape").symlink_to("/etc/hostname")
    invalid, not_found, denied = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    bad: list[tuple[dict[str, Any], grpc.StatusCode, str | None]] = [
        ({"memory_bytes": 1 << 20, "vcpus": 1}, invalid, None),
        ({"memory_bytes": 64 << 20, "vcpus": 0}, invalid, None),
        ({"memory_bytes": 64 << 20, "vcpus": 1, "policy": 0x10000}, invalid, None),  # bit 17
        ({"memory_bytes": 64 << 20, "vcpus": 1, "host_data": b"short"}, invalid, None),
        ({"firmware_path": "nonexistent"}, not_found, KvmReason.IMAGE_NOT_FOUND),
        ({"firmware_path": "/nonexistent"}, denied, KvmReason.IMAGE_OUTSIDE_DIR),
        ({"firmware_path": "/etc/hostname"}, denied, KvmReason.IMAGE_OUTSIDE_DIR),
        ({"firmware_path": "hostname"}, invalid, KvmReason.FIRMWARE_INVALID),
        ({"kernel_path": str(d / "fifo")}, invalid, KvmReason.IMAGE_NOT_REGULAR),
        ({"kernel_path": "kernels"}, invalid, KvmReason.IMAGE_NOT_REGULAR),
        ({"kernel_path": "kernels/vmlinuz"}, not_found, KvmReason.IMAGE_NOT_FOUND),
        ({"kernel_path": "escape"}, denied, KvmReason.IMAGE_OUTSIDE_DIR),
        ({"kernel_path": "/dev/zero"}, denied, KvmReason.IMAGE_OUTSIDE_DIR),
        ({"firmware": b"x" * 4096, "firmware_path": ""}, invalid, KvmReason.FIRMWARE_INVALID),
        ({"firmware": stack.firmware.read_bytes()}, invalid, KvmReason.IMAGE_PATH_AND_BYTES),
    ]
    try:
        for cfg, code, reason in bad:
            cfg = {"memory_bytes": 64 << 20, "vcpus": 1, **cfg}
            cfg.setdefault("firmware_path", str(stack.firmware))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stack.kvm.CreateVm(
                    kvm_pb2.CreateVmRequest(config=kvm_pb2.VmConfig(**cfg)),
                    metadata=HOST,
                    timeout=30,  # a FIFO opened for reading would block: a deadline, not a hang
                )
            assert info.value.code() == code, cfg
            if reason is not None:
                assert error_info(info.value).reason == reason, cfg  # type: ignore[union-attr]
    finally:  # a reader stuck opening the FIFO is released by a writer end
        with contextlib.suppress(OSError):
            os.close(os.open(d / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    assert not (await stack.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms


@pytest.mark.rpc("snp.kvm.v1.KvmService/VmgexitMsr", "error")
async def test_msr_protocol(stack: Stack, launched_vm: Guest) -> None:
    assert (await launched_vm.msr(msr.SEV_INFO_REQ)).ghcb_msr == 0x0002000133000001
    leaf1_eax = (await launched_vm.msr(0x1 << 32 | 0 << 30 | msr.CPUID_REQ)).ghcb_msr
    assert leaf1_eax == 0x00A00F11 << 32 | msr.CPUID_RESP
    assert (
        await launched_vm.msr(msr.PREF_GPA_REQ)
    ).ghcb_msr == 0xFFFFFFFFFFFFF << 12 | msr.PREF_GPA_RESP
    assert (await launched_vm.msr(msr.HV_FT_REQ)).ghcb_msr == 3 << 12 | msr.HV_FT_RESP
    # any GFN is recorded and echoed, outside guest memory too (test_kvm_nae.py)
    assert (await launched_vm.msr(0x7FFF0000 | msr.REG_GPA_REQ)).ghcb_msr == 0x7FFF0000 | 0x13
    await launched_vm.register_ghcb(0x100000)
    # unknown requests leave the MSR as it was
    assert (await launched_vm.msr(0xABC)).ghcb_msr == 0xABC
    # PSC: one page private, then shared
    gfn = 0x200
    r = await launched_vm.msr(1 << 52 | gfn << 12 | msr.PSC_REQ)
    assert r.ghcb_msr == msr.PSC_RESP
    assert (await launched_vm.pvalidate(gfn << 12)).result == rmp_pb2.RMP_RESULT_SUCCESS
    r = await launched_vm.msr(2 << 52 | gfn << 12 | msr.PSC_REQ)
    assert r.ghcb_msr == msr.PSC_RESP
    r = await launched_vm.msr(2 << 52 | 0x80000 << 12 | msr.PSC_REQ)  # outside memory
    assert r.ghcb_msr == msr.PSC_GENERIC_ERROR
    # termination: set 0, code 2 (GHCB_SNP_UNSUPPORTED)
    r = await launched_vm.msr(0x20100)
    assert r.terminated
    vm = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=launched_vm.vm), metadata=HOST)).vm
    assert (vm.state, vm.term_reason_set, vm.term_reason_code) == (
        kvm_pb2.VM_STATE_TERMINATED,
        0,
        2,
    )
    assert vm.sev_status == 0b111  # SEV | SEV-ES | SNP; SEV_FEATURES = SNP_ACTIVE only
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await launched_vm.msr(msr.SEV_INFO_REQ)
    assert error_info(info.value).reason == "VM_TERMINATED"  # type: ignore[union-attr]


async def test_ghcb_protocol_errors_and_simple_events(stack: Stack) -> None:
    guest = await stack.launch(vcpus=2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=guest.ident))
    assert error_info(info.value).reason == "GHCB_NOT_REGISTERED"  # type: ignore[union-attr]
    await guest.register_ghcb()

    def ghcb(code: int, info1: int = 0, info2: int = 0, **regs: int) -> g.Ghcb:
        x = g.Ghcb()
        x.set("sw_exit_code", code)
        x.set("sw_exit_info_1", info1)
        x.set("sw_exit_info_2", info2)
        for k, v in regs.items():
            x.set(k, v)
        return x

    bad_usage = ghcb(g.EXIT_HV_FEATURES)
    bad_usage.usage = 1
    r, back = await guest.vmgexit(bad_usage)
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (
        g.RESP_MALFORMED_INPUT,
        g.ERR_INVALID_USAGE,
    )
    # KVM clears the bitmap, then sets SW_EXIT_INFO_1/2, RAX, RBX, RCX, RDX (test_kvm_nae)
    assert back.valid == sum(1 << o // 8 for o in (0x398, 0x3A0, 0x1F8, 0x308, 0x310, 0x318))
    missing = g.Ghcb()
    missing.set("sw_exit_code", g.EXIT_HV_FEATURES)
    r, _ = await guest.vmgexit(missing)
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_MISSING_INPUT)
    r, _ = await guest.vmgexit(ghcb(0x8000_0FFF))
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_INVALID_EVENT)
    r, back = await guest.vmgexit(ghcb(g.EXIT_HV_FEATURES))
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (0, 3)
    assert back.get("sw_exit_info_2") == 3
    r, back = await guest.vmgexit(ghcb(g.EXIT_CPUID, rax=0x8000001F, rcx=0))
    assert back.get("rbx") & 0x3F == 51
    r, _ = await guest.vmgexit(ghcb(g.EXIT_CPUID, rax=1))  # RCX not valid
    assert r.sw_exit_info_2 == g.ERR_MISSING_INPUT
    # AP jump table: set, get, bad sub-function
    await guest.vmgexit(ghcb(g.EXIT_AP_JUMP_TABLE, 0, 0x9000))
    r, _ = await guest.vmgexit(ghcb(g.EXIT_AP_JUMP_TABLE, 1))
    assert r.sw_exit_info_2 == 0x9000
    r, _ = await guest.vmgexit(ghcb(g.EXIT_AP_JUMP_TABLE, 7))
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_INVALID_INPUT)
    # AP creation: CREATE needs matching SEV_FEATURES and a VMSA GPA that is not 2M aligned
    r, _ = await guest.vmgexit(ghcb(g.EXIT_AP_CREATION, 1 << 32 | 1, 0x301000, rax=1))
    assert r.sw_exit_info_1 == 0
    assert (
        await guest.msr(msr.AP_RESET_HOLD_REQ)
    ).ghcb_msr >> 12 == 0  # the BSP enters the reset hold: result 0
    for info1, gpa, rax in (
        (1 << 32 | 1, 0x400000, 1),
        (1 << 32 | 1, 0x301000, 5),
        (9 << 32 | 1, 0x301000, 1),
        (1 << 32 | 7, 0x301000, 1),
    ):
        r, _ = await guest.vmgexit(ghcb(g.EXIT_AP_CREATION, info1, gpa, rax=rax))
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_INVALID_INPUT), hex(info1)
    r, _ = await guest.vmgexit(ghcb(g.EXIT_AP_CREATION, 1 << 32 | 2))  # DESTROY
    assert r.sw_exit_info_1 == 0
    r, _ = await guest.vmgexit(ghcb(g.EXIT_TERM_REQUEST, 1 | 4 << 4))
    assert r.terminated
    vm = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)).vm
    assert (vm.term_reason_set, vm.term_reason_code) == (1, 4)


async def psc_exit(guest, entries: list[int], **kw: int) -> tuple[int, psc.Descriptor]:  # type: ignore[no-untyped-def]
    r, back = await guest.vmgexit(psc_ghcb(guest.ghcb_gpa, entries, **kw))
    assert r.sw_exit_info_1 == 0  # PSC always answers NO_ACTION
    return r.sw_exit_info_2, psc.Descriptor.decode(bytes(back.shared))


async def test_page_state_change(stack: Stack) -> None:
    guest = await stack.launch(memory=128 << 20)
    await guest.register_ghcb()
    base = 0x1000  # gfn 0x1000 = 16 MiB
    result, desc = await psc_exit(guest, [entry(base + i, psc.Op.PRIVATE) for i in range(253)])
    assert (
        result == 0 and desc.cur_entry == 253 and all(e.cur_page == 1 for e in desc.entries[:253])
    )
    assert (await guest.pvalidate((base + 252) << 12)).result == rmp_pb2.RMP_RESULT_SUCCESS
    result, _ = await psc_exit(guest, [entry(base + i, psc.Op.SHARED) for i in range(253)])
    assert result == 0
    # a 2M entry backed by a 2M-aligned run: one 2M RMPUPDATE
    result, desc = await psc_exit(
        guest, [entry(0x2000, psc.Op.PRIVATE, True), entry(0x2200, psc.Op.PSMASH, True)]
    )
    assert result == 0 and desc.entries[0].cur_page == 512 and desc.entries[1].cur_page == 512
    assert (await guest.pvalidate(0x2000 << 12)).fault.error_code & (1 << 35)  # 4K on 2M: SIZEM
    # errors
    result, _ = await psc_exit(guest, [entry(base, 1)], end=253)
    assert result == psc.PSC_ERROR_INVALID_HDR
    result, desc = await psc_exit(
        guest, [entry(base, 1), entry(0x2001, 1, True), entry(base + 1, 1)]
    )
    assert result == psc.PSC_ERROR_INVALID_ENTRY and desc.cur_entry == 1
    assert desc.entries[0].cur_page == 1  # the entry before the bad one was done
    result, _ = await psc_exit(guest, [entry(base, 1, cur_page=2)])  # cur_page > npages
    assert result == psc.PSC_ERROR_INVALID_ENTRY
    result, _ = await psc_exit(guest, [entry(0x80000, 1)])  # outside memory
    assert result == psc.PSC_ERROR_GENERIC
    # a page the host holds mapped cannot become private: progress stops there
    spa = await stack.rmp.MapHostPage(
        rmp_pb2.MapHostPageRequest(
            guest=rmp_pb2.GuestPageAddress(
                asid=(
                    await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)
                ).vm.asid,
                gpa=(base + 2) << 12,
            ),
            holder="netd",
        ),
        metadata=HOST,
    )
    result, desc = await psc_exit(guest, [entry(base + i, 1) for i in range(4)])
    assert result == psc.PSC_ERROR_GENERIC and desc.cur_entry == 2 and desc.entries[2].cur_page == 0
    await stack.rmp.UnmapHostPage(rmp_pb2.UnmapHostPageRequest(map_id=spa.map_id), metadata=HOST)
    # the guest resumes from cur_entry
    x = psc_buffer([entry(base + i, 1) for i in range(4)], cur=2)
    xg = g.Ghcb()
    for k, v in (
        ("sw_exit_code", g.EXIT_PSC),
        ("sw_exit_info_1", 0),
        ("sw_exit_info_2", 0),
        ("sw_scratch", guest.ghcb_gpa + g.SHARED_BUFFER),
    ):
        xg.set(k, v)
    xg.shared = x
    r, back = await guest.vmgexit(xg)
    assert r.sw_exit_info_2 == 0 and psc.Descriptor.decode(bytes(back.shared)).cur_entry == 4
    # scratch outside the shared buffer
    bad = g.Ghcb()
    for k, v in (
        ("sw_exit_code", g.EXIT_PSC),
        ("sw_exit_info_1", 0),
        ("sw_exit_info_2", 0),
        ("sw_scratch", 0x5000),
    ):
        bad.set(k, v)
    r, _ = await guest.vmgexit(bad)
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_INVALID_SCRATCH_AREA)
    reg = stack.runtimes["kvm"].registry
    assert (
        reg.get_sample_value("snp_psc_pages_total", {"operation": "private", "page_size": "2m"})
        == 1
    )
    assert (
        reg.get_sample_value(
            "snp_psc_requests_total", {"protocol": "ghcb", "result": "invalid_entry"}
        )
        == 2
    )


# KERNEL: arch/x86/include/asm/sev-common.h
# VMGEXIT_PSC_ERROR_INVALID_ENTRY, VMGEXIT_PSC_ERROR_INVALID_HDR
PSC_INVALID_ENTRY, PSC_INVALID_HDR = (1 << 32) | 2, (1 << 32) | 1


def raw_entry(cur_page: int, gfn: int, op: int, size_2m: bool = False, reserved: int = 0) -> int:
    """KERNEL: arch/x86/include/asm/sev-common.h struct psc_entry: cur_page 12, gfn 40,
    operation 4, pagesize 1, reserved 7 bits, from bit 0 up."""
    return cur_page | gfn << 12 | op << 52 | int(size_2m) << 56 | reserved << 57


def raw_descriptor(cur: int, end: int, entries: list[int], reserved: int = 0) -> bytes:
    """KERNEL: struct psc_hdr {u16 cur_entry; u16 end_entry; u32 reserved}, then the entries."""
    buf = bytearray(g.SHARED_BUFFER_SIZE)
    struct.pack_into(f"<HHI{len(entries)}Q", buf, 0, cur, end, reserved, *entries)
    return bytes(buf)


async def psc_raw(guest, shared: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    x = g.Ghcb()
    x.set("sw_exit_code", g.EXIT_PSC)
    x.set("sw_exit_info_1", 0)
    x.set("sw_exit_info_2", 0)
    x.set("sw_scratch", guest.ghcb_gpa + g.SHARED_BUFFER)
    x.shared = bytearray(shared)
    r, back = await guest.vmgexit(x)
    assert r.sw_exit_info_1 == 0  # KERNEL: snp_complete_psc(): always svm_vmgexit_no_action()
    return r.sw_exit_info_2, bytes(back.shared)


def entries_of(shared: bytes, n: int) -> list[int]:
    return list(struct.unpack_from(f"<{n}Q", shared, 8))


@contextlib.asynccontextmanager
async def psc_guest(tmp_path: Path) -> AsyncIterator[tuple[Any, Callable[[int], Awaitable[bool]]]]:
    """A launched guest with its GHCB registered, and whether a GFN's page is assigned."""
    async with host_stack(tmp_path) as s:
        guest = await s.launch(memory=128 << 20)
        await guest.register_ghcb()
        vm = s.runtimes["kvm"].impl.kvm.vms[guest.vm.id]  # type: ignore[union-attr]

        async def assigned(gfn: int) -> bool:
            spa = vm.memslots.translate(gfn << 12)
            if spa is None:
                return False  # never used, so never backed: no frame to be assigned
            pfn = spa >> 12
            r = await s.rmp.ReadRmpEntry(rmp_pb2.ReadRmpEntryRequest(pfn=pfn), metadata=HOST)
            return bool(r.entry.assigned)

        yield guest, assigned


PSC_BASE = 0x1000  # gfn 0x1000 = 16 MiB, above what the firmware uses


async def test_psc_an_unknown_operation_is_completed_and_skipped(tmp_path: Path) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() `default:` -> __snp_complete_one_psc():
    an entry whose operation is not PRIVATE/SHARED (PSMASH, UNSMASH, 0, 5..15) gets
    cur_page = npages without a page state change, and the request answers 0."""

    async with psc_guest(tmp_path) as (guest, assigned):
        base = PSC_BASE
        # 4K entries at cur_page 0: the array-planned path
        ents = [
            raw_entry(0, base, 1),
            raw_entry(0, base + 1, 0),
            raw_entry(0, base + 2, 5),
            raw_entry(0, base + 3, 15),
            raw_entry(0, base + 4, 3),
            raw_entry(0, base + 5, 1),
            raw_entry(0, base + 5, 2),
        ]
        result, back = await psc_raw(guest, raw_descriptor(0, 6, ents))
        assert result == 0
        assert struct.unpack_from("<HH", back) == (7, 6)
        assert entries_of(back, 7) == [e | 1 for e in ents]  # cur_page 1, the rest as written
        assert (await guest.pvalidate(base << 12)).result == rmp_pb2.RMP_RESULT_SUCCESS
        assert [await assigned(base + i) for i in range(1, 6)] == [False] * 5
        # the entry-by-entry loop (2M entries in the descriptor)
        ents = [
            raw_entry(0, 0x2000, 9, True),  # unknown 2M: completed, nothing changed
            raw_entry(100, 0x2200, 4, True),  # UNSMASH partly done: completed to 512
            raw_entry(0, base + 8, 7),
            raw_entry(0, base + 9, 1),
        ]
        result, back = await psc_raw(guest, raw_descriptor(0, 3, ents))
        assert result == 0
        assert struct.unpack_from("<HH", back) == (4, 3)
        assert entries_of(back, 4) == [
            ents[0] | 512,
            ents[1] - 100 + 512,
            *(e | 1 for e in ents[2:]),
        ]
        assert [await assigned(gfn) for gfn in (0x2000, 0x2200, base + 8, base + 9)] == [
            False,
            False,
            False,
            True,
        ]


async def test_psc_reserved_bits_are_never_read(tmp_path: Path) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() reads cur_page, gfn, operation and
    pagesize of struct psc_entry (arch/x86/include/asm/sev-common.h) and never the reserved
    bits 63:57, nor psc_hdr.reserved; they go back as the guest wrote them."""

    async with psc_guest(tmp_path) as (guest, assigned):
        base = PSC_BASE
        for ents in (
            # planned (4K only) and looped (a 2M entry)
            [raw_entry(0, base, 1, reserved=0x7F), raw_entry(0, base + 1, 2, reserved=1)],
            [
                raw_entry(0, 0x2400, 1, True, reserved=0x55),
                raw_entry(0, base + 2, 1, reserved=0x40),
            ],
        ):
            sent = raw_descriptor(0, 1, ents, reserved=0xDEADBEEF)
            result, back = await psc_raw(guest, sent)
            assert result == 0
            assert struct.unpack_from("<HHI", back) == (2, 1, 0xDEADBEEF)
            assert entries_of(back, 2) == [e | (512 if e >> 56 & 1 else 1) for e in ents]
        assert [await assigned(gfn) for gfn in (base, base + 1, 0x2400, base + 2)] == [
            True,
            False,
            True,
            True,
        ]


async def test_psc_invalid_entry_is_cur_page_beyond_npages_or_an_unaligned_2m_gfn(
    tmp_path: Path,
) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): `entry_start.cur_page > npages ||
    !IS_ALIGNED(gfn, npages)` is VMGEXIT_PSC_ERROR_INVALID_ENTRY whatever the operation, with
    hdr->cur_entry at that entry; the entries before it were processed (an unknown operation and
    reserved bits are not errors), those after it are left as written. cur_page == npages is a
    completed entry, skipped."""

    async with psc_guest(tmp_path) as (guest, assigned):
        base = PSC_BASE
        for bad in (
            raw_entry(2, base + 1, 1),
            raw_entry(513, 0x2800, 1, True),
            raw_entry(0, 0x2801, 1, True),
            raw_entry(0, 0x2801, 7, True),
        ):
            ents = [raw_entry(0, base, 0xB, reserved=0x40), bad, raw_entry(0, base + 2, 1)]
            result, back = await psc_raw(guest, raw_descriptor(0, 2, ents))
            assert result == PSC_INVALID_ENTRY, hex(bad)
            assert struct.unpack_from("<HH", back) == (1, 2)
            assert entries_of(back, 3) == [ents[0] | 1, bad, ents[2]]
            assert not await assigned(base + 2)
        # cur_page == npages: already done, skipped
        ents = [raw_entry(512, 0x2600, 1, True), raw_entry(1, base + 3, 1)]
        result, back = await psc_raw(guest, raw_descriptor(0, 1, ents))
        assert result == 0 and entries_of(back, 2) == ents
        assert not await assigned(0x2600) and not await assigned(base + 3)


async def test_psc_cur_entry_beyond_end_entry_answers_0_and_leaves_the_buffer(
    tmp_path: Path,
) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): with idx_start > idx_end the scan loop
    does not run, `idx > idx_end` calls snp_complete_psc(svm, 0): nothing is written back (the
    header byte for byte as the guest wrote it). end_entry >= VMGEXIT_PSC_MAX_COUNT (253) is
    checked first and stays INVALID_HDR."""

    async with psc_guest(tmp_path) as (guest, assigned):
        base = PSC_BASE
        ents = [
            raw_entry(0, base, 1),
            raw_entry(5, base + 1, 1),
            raw_entry(0, 0x2A01, 1, True),
        ]
        for cur, end in ((3, 2), (252, 0), (2, 1)):
            sent = raw_descriptor(cur, end, ents, reserved=0x12345678)
            result, back = await psc_raw(guest, sent)
            assert result == 0 and back == sent, (cur, end)
        assert not await assigned(base)
        result, _ = await psc_raw(guest, raw_descriptor(300, 253, ents))
        assert result == PSC_INVALID_HDR


@pytest.mark.rpc("snp.kvm.v1.KvmService/Vmgexit", "error")
async def test_ghcb_carried_with_the_exit(stack: Stack) -> None:
    """VmgexitRequest.ghcb: the same answers as through memory, the page in memory as kvm wrote
    it, and a PSC whose RMPUPDATE fails mid-batch (kvm's speculative GHCB write does not run)
    still answers the truth and counts only the pages changed."""

    guest = await stack.launch(memory=128 << 20)
    await guest.register_ghcb()
    guest.inline_ghcb = True  # Guest.vmgexit checks the returned page == guest memory
    base = 0x1000
    result, desc = await psc_exit(guest, [entry(base + i, psc.Op.PRIVATE) for i in range(253)])
    assert result == 0 and desc.cur_entry == 253
    reg = stack.runtimes["kvm"].registry

    def pages(operation: str) -> float:
        v = reg.get_sample_value("snp_psc_pages_total", {"operation": operation, "page_size": "4k"})
        return v or 0.0

    before = pages("shared")
    result, _ = await psc_exit(guest, [entry(base + i, psc.Op.SHARED) for i in range(4)])
    assert result == 0 and pages("shared") == before + 4
    # shared -> private of a page the host holds mapped fails
    asid = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)).vm.asid
    held = await stack.rmp.MapHostPage(
        rmp_pb2.MapHostPageRequest(
            guest=rmp_pb2.GuestPageAddress(asid=asid, gpa=(base + 2) << 12),
            holder="netd",
        ),
        metadata=HOST,
    )
    before = pages("private")
    result, desc = await psc_exit(guest, [entry(base + i, psc.Op.PRIVATE) for i in range(4)])
    assert result == psc.PSC_ERROR_GENERIC and desc.cur_entry == 2
    assert pages("private") == before + 2  # the two before the held page, counted once
    assert desc.entries[2].cur_page == 0 and desc.entries[1].cur_page == 1
    generic = reg.get_sample_value(
        "snp_psc_requests_total", {"protocol": "ghcb", "result": "generic"}
    )
    assert generic == 1
    await stack.rmp.UnmapHostPage(rmp_pb2.UnmapHostPageRequest(map_id=held.map_id), metadata=HOST)
    # a guest request: the response is in memory before the GHCB write says success
    r, _, payload = await guest.guest_request(report_req(b"I" * 64))
    assert r.sw_exit_info_2 == 0 and payload is not None
    assert payload[0x20 + 0x50 : 0x20 + 0x90] == b"I" * 64
    # a GHCB that is not a whole page is refused, and nothing is counted or written
    exits = reg.get_sample_value("snp_vmgexit_total", {"exit_code": "psc"})
    memory = (await guest.read(guest.ghcb_gpa, 4096, private=False)).data
    for bad in (b"x", bytes(4097)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.kvm.Vmgexit(kvm_pb2.VmgexitRequest(identity=guest.ident, ghcb=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reg.get_sample_value("snp_vmgexit_total", {"exit_code": "psc"}) == exits
    assert (await guest.read(guest.ghcb_gpa, 4096, private=False)).data == memory


async def test_guest_requests_reports_throttle_and_certificates(tmp_path: Path) -> None:
    clock = FakeClock()  # kvm's throttle clock: no real time passes during the test

    async with host_stack(tmp_path, kvm_clock=clock) as s:
        guest = await s.launch(host_data=bytes(range(32)))
        await guest.register_ghcb()
        r, _, payload = await guest.guest_request(report_req(b"N" * 64))
        assert r.sw_exit_info_2 == 0 and payload is not None
        report = payload[0x20 : 0x20 + 0x4A0]
        assert report[0x90:0xC0] == guest.measurement and report[0xC0:0xE0] == bytes(range(32))
        certs = await s.psp.GetCertificates(psp_pb2.GetCertificatesRequest(), metadata=HOST)
        assert rpt.verify(report, x509.load_der_x509_certificate(certs.vcek_der).public_key())  # type: ignore[arg-type]
        # extended request: too small a buffer answers INVALID_LEN with the page count in RBX
        r, back, _ = await guest.guest_request(report_req(), ext_pages=0, seqno=guest.seqno)
        assert r.sw_exit_info_2 == 1 << 32 and back.get("rbx") >= 1
        need = back.get("rbx")
        r, _, payload = await guest.guest_request(report_req(), ext_pages=need)
        assert r.sw_exit_info_2 == 0 and payload is not None
        table = (await guest.read(0x140000, need * 4096, private=False)).data
        guids = [table[i : i + 16].hex() for i in range(0, 72, 24)]
        assert guids == [
            "63da758de6644564adc5f4b93be8accd",
            "4ab7b379bbac4fe4a02f05aef327c782",
            "c0b406a4a803495297433fb6014cd0ae",
        ]
        off, length = struct.unpack_from("<II", table, 16)
        assert table[off : off + length] == certs.vcek_der and table[72:96] == bytes(24)
        # throttle: 1 per 10 s: the next request is BUSY without reaching the firmware
        await s.kvm.SetGuestRequestThrottle(
            kvm_pb2.SetGuestRequestThrottleRequest(
                vm=guest.vm, throttle=kvm_pb2.GuestRequestThrottle(interval_ms=10000, burst=1)
            ),
            metadata=HOST,
        )
        r, _, _ = await guest.guest_request(report_req())
        assert r.sw_exit_info_2 == 0
        before = s.runtimes["psp"].registry.get_sample_value(
            "snp_psp_commands_total", {"command": "SNP_GUEST_REQUEST", "status": "SUCCESS"}
        )
        r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno)
        assert r.sw_exit_info_2 == 2 << 32  # VMM BUSY
        after = s.runtimes["psp"].registry.get_sample_value(
            "snp_psp_commands_total", {"command": "SNP_GUEST_REQUEST", "status": "SUCCESS"}
        )
        assert after == before
        assert s.runtimes["kvm"].registry.get_sample_value("snp_guest_request_throttled_total") == 1
        clock.advance(9.75)  # still the same interval
        r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno)
        assert r.sw_exit_info_2 == 2 << 32
        clock.advance(0.25)  # a whole interval since the last one: one request again
        r, _, _ = await guest.guest_request(report_req())
        assert r.sw_exit_info_2 == 0
        await s.kvm.SetGuestRequestThrottle(
            kvm_pb2.SetGuestRequestThrottleRequest(
                vm=guest.vm, throttle=kvm_pb2.GuestRequestThrottle()
            ),
            metadata=HOST,
        )
        # a wrong sequence number: the firmware's error lands in exitinfo2 (vmm 0, fw code)
        r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno + 2)
        assert r.sw_exit_info_2 == 0x16
        # same page for request and response
        x = g.Ghcb()
        for k, v in (
            ("sw_exit_code", g.EXIT_GUEST_REQUEST),
            ("sw_exit_info_1", 0x120000),
            ("sw_exit_info_2", 0x120000),
        ):
            x.set(k, v)
        r, _ = await guest.vmgexit(x)
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (2, g.ERR_MISSING_INPUT)


# KERNEL: arch/x86/include/asm/svm.h GHCB_HV_RESP_MALFORMED_INPUT (sw_exit_info_1 of
# svm_vmgexit_bad_input()); arch/x86/include/asm/sev-common.h GHCB_ERR_MISSING_INPUT,
# GHCB_ERR_INVALID_INPUT
GHCB_HV_RESP_MALFORMED_INPUT, GHCB_ERR_MISSING_INPUT, GHCB_ERR_INVALID_INPUT = 2, 4, 5
# KERNEL: arch/x86/include/asm/sev.h enum msg_type
SNP_MSG_KEY_REQ, SNP_MSG_KEY_RSP, SNP_MSG_REPORT_REQ = 3, 4, 5
# KERNEL: include/uapi/linux/psp-sev.h sev_ret_code
SEV_RET_INVALID_PARAM = 0x16
# KERNEL: include/uapi/linux/sev-guest.h (exitinfo2 bits 63:32)
SNP_GUEST_VMM_ERR_INVALID_LEN, SNP_GUEST_VMM_ERR_BUSY = 1, 2
REQ_GPA, RES_GPA = 0x120000, 0x121000


async def ext_guest_request(  # type: ignore[no-untyped-def]
    guest, payload: bytes, msg_type: int, seqno: int, **regs: int
) -> tuple[kvm_pb2.VmgexitResponse, bytes]:
    """An SNP Extended Guest Request with only the registers in `regs` marked valid; returns
    the exit's answer and the guest's response page."""
    if not guest.vmpck0:
        guest.vmpck0 = (await guest.secrets())[0x20:0x40]
    hdr = gm.Header(seqno=seqno, msg_type=msg_type, msg_version=1, msg_sz=len(payload), vmpck=0)
    await guest.write(REQ_GPA, gm.seal(guest.vmpck0, hdr, payload), private=False)
    x = g.Ghcb()
    x.set("sw_exit_code", g.EXIT_EXT_GUEST_REQUEST)
    x.set("sw_exit_info_1", REQ_GPA)
    x.set("sw_exit_info_2", RES_GPA)
    for reg, value in regs.items():
        x.set(reg, value)
    r, _ = await guest.vmgexit(x)
    return r, bytes((await guest.read(RES_GPA, 4096, private=False)).data)


def firmware_requests(s) -> float:  # type: ignore[no-untyped-def]
    return sum(
        s.runtimes["psp"].registry.get_sample_value(
            "snp_psp_commands_total", {"command": "SNP_GUEST_REQUEST", "status": status}
        )
        or 0.0
        for status in ("SUCCESS", "INVALID_PARAM")
    )


async def test_ext_guest_request_of_another_message_type_is_a_plain_request(ghcb_vm: Guest) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_handle_ext_guest_req(): MSG_TYPE is read first, and
    only an SNP_MSG_REPORT_REQ looks at RAX/RBX; any other message goes to
    snp_handle_guest_req() as it is, RAX/RBX neither required nor read."""

    key_req = bytes(0x28)  # MSG_KEY_REQ: root key select 0 (VCEK), no fields, VMPL 0
    for regs in ({}, {"rax": 0x123, "rbx": 0}):  # not valid / valid but not usable
        r, page = await ext_guest_request(ghcb_vm, key_req, SNP_MSG_KEY_REQ, ghcb_vm.seqno, **regs)
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (0, 0), regs
        rh = gm.parse_header(page)
        assert (rh.seqno, rh.msg_type) == (ghcb_vm.seqno + 1, SNP_MSG_KEY_RSP)
        reply = gm.open_payload(ghcb_vm.vmpck0, rh, page)
        assert struct.unpack_from("<I", reply)[0] == 0 and len(reply[32:64]) == 32
        ghcb_vm.seqno += 2


async def test_ext_report_request_without_rax_or_rbx_is_invalid_input(
    stack: Stack, ghcb_vm: Guest
) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_handle_ext_guest_req(): for SNP_MSG_REPORT_REQ,
    `!kvm_ghcb_rax_is_valid(svm) || !kvm_ghcb_rbx_is_valid(svm)` (and RAX not page-aligned)
    goes to request_invalid: svm_vmgexit_bad_input(svm, GHCB_ERR_INVALID_INPUT), before the
    firmware is asked; the guest's message is still unused afterwards."""

    before = firmware_requests(stack)
    for regs in ({"rbx": 1}, {"rax": 0x140000}, {}, {"rax": 0x140008, "rbx": 1}):
        r, _ = await ext_guest_request(
            ghcb_vm, report_req(), SNP_MSG_REPORT_REQ, ghcb_vm.seqno, **regs
        )
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (
            GHCB_HV_RESP_MALFORMED_INPUT,
            GHCB_ERR_INVALID_INPUT,
        ), regs
    # certificate pages running past guest memory: refused before any page is written
    r, back, _ = await ghcb_vm.guest_request(report_req(), ext_pages=0, seqno=ghcb_vm.seqno)
    need = back.get("rbx")
    assert need >= 2  # VCEK, ASK and ARK take more than one page
    certs_gpa = (64 << 20) - (need - 1) * 4096  # the last page is outside the memslot
    await ghcb_vm.write(certs_gpa, b"\x5a" * 4096, private=False)
    r, _ = await ext_guest_request(
        ghcb_vm, report_req(), SNP_MSG_REPORT_REQ, ghcb_vm.seqno, rax=certs_gpa, rbx=need
    )
    assert (r.sw_exit_info_1, r.sw_exit_info_2) == (
        GHCB_HV_RESP_MALFORMED_INPUT,
        GHCB_ERR_INVALID_INPUT,
    )
    assert (await ghcb_vm.read(certs_gpa, 4096, private=False)).data == b"\x5a" * 4096
    assert firmware_requests(stack) == before
    # the same sequence number still works: nothing reached the firmware
    r, _, payload = await ghcb_vm.guest_request(report_req(), ext_pages=4)
    assert r.sw_exit_info_2 == 0 and payload is not None


async def test_ext_request_checks_come_before_the_throttle(tmp_path: Path) -> None:
    """The throttle patch ("kvm: sev: Add SNP guest request throttling") checks __ratelimit()
    in snp_handle_guest_req() after mutex_lock(); KERNEL: arch/x86/kvm/svm/sev.c
    snp_handle_ext_guest_req() runs its RAX/RBX checks before calling it. So a throttled
    extended report request without RAX still answers GHCB_ERR_INVALID_INPUT, and one whose
    certificate buffer is too small still answers INVALID_LEN, not BUSY."""

    # kvm's clock stands still: the interval never ends during the test
    async with host_stack(tmp_path, kvm_clock=FakeClock()) as s:
        guest = await s.launch()
        await guest.register_ghcb()
        await s.kvm.SetGuestRequestThrottle(
            kvm_pb2.SetGuestRequestThrottleRequest(
                vm=guest.vm, throttle=kvm_pb2.GuestRequestThrottle(interval_ms=10000, burst=1)
            ),
            metadata=HOST,
        )
        r, _, _ = await guest.guest_request(report_req())
        assert r.sw_exit_info_2 == 0  # the one request of this interval
        r, _ = await ext_guest_request(guest, report_req(), SNP_MSG_REPORT_REQ, guest.seqno, rbx=4)
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (
            GHCB_HV_RESP_MALFORMED_INPUT,
            GHCB_ERR_INVALID_INPUT,
        )
        r, back, _ = await guest.guest_request(report_req(), ext_pages=0, seqno=guest.seqno)
        assert r.sw_exit_info_2 == SNP_GUEST_VMM_ERR_INVALID_LEN << 32 and back.get("rbx") >= 1
        r, _, _ = await guest.guest_request(report_req(), ext_pages=4, seqno=guest.seqno)
        assert r.sw_exit_info_2 == SNP_GUEST_VMM_ERR_BUSY << 32


async def test_the_default_throttle_runs_on_kvms_clock(tmp_path: Path) -> None:
    """SNPEMU_KVM_THROTTLE_MS/BURST: every new VM's throttle, on kvm's clock: a burst of 2,
    then one request per 5 s of that clock, however fast the requests come."""
    clock = FakeClock()

    async with host_stack(
        tmp_path,
        kvm_clock=clock,
        SNPEMU_KVM_THROTTLE_MS="5000",
        SNPEMU_KVM_THROTTLE_BURST="2",
    ) as s:
        guest = await s.launch()
        await guest.register_ghcb()
        busy = SNP_GUEST_VMM_ERR_BUSY << 32
        for expect in (0, 0, busy, busy):
            r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno)
            assert r.sw_exit_info_2 == expect
            if not expect:
                guest.seqno += 2
        clock.advance(4.5)
        r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno)
        assert r.sw_exit_info_2 == busy
        clock.advance(0.5)
        r, _, _ = await guest.guest_request(report_req())
        assert r.sw_exit_info_2 == 0
        r, _, _ = await guest.guest_request(report_req(), seqno=guest.seqno)
        assert r.sw_exit_info_2 == busy


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/Vmgexit", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/VmgexitMsr", "ok")
async def test_a_firmware_error_still_copies_the_response_page(
    stack: Stack, ghcb_vm: Guest
) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_handle_guest_req(): when SNP_GUEST_REQUEST fails
    with a firmware error, kvm_write_guest() of the response bounce page still runs, then
    svm_vmgexit_no_action(svm, SNP_GUEST_ERR(0, fw_err)): the guest sees the bounce page's
    bytes and exitinfo2 = fw_err."""

    bounce = stack.runtimes["kvm"].impl.kvm.vms[ghcb_vm.vm.id].bounce_res  # type: ignore[union-attr]
    r, _, _ = await ghcb_vm.guest_request(report_req(b"A" * 64))
    assert r.sw_exit_info_2 == 0
    for ext_pages in (None, 4):  # a plain and an extended request
        scribble = bytes([0xA5]) * 4096
        await ghcb_vm.write(RES_GPA, scribble, private=False)
        # a sequence number the firmware rejects (SEV_RET_INVALID_PARAM)
        r, _, _ = await ghcb_vm.guest_request(
            report_req(), seqno=ghcb_vm.seqno + 2, ext_pages=ext_pages
        )
        assert (r.sw_exit_info_1, r.sw_exit_info_2) == (0, SEV_RET_INVALID_PARAM)
        firmware = (
            await stack.rmp.HostRead(
                rmp_pb2.HostReadRequest(spa=bounce, length=4096), metadata=HOST
            )
        ).data
        got = (await ghcb_vm.read(RES_GPA, 4096, private=False)).data
        assert firmware != scribble and got == firmware, ext_pages


@pytest.mark.rpc("snp.kvm.v1.KvmService/NestedPageFault", "ok")
async def test_npf_psmash_and_conversion(stack: Stack) -> None:
    guest = await stack.launch(memory=64 << 20)
    await guest.register_ghcb()
    await psc_exit(guest, [entry(0x2000, psc.Op.PRIVATE, True)])
    p = await guest.pvalidate(0x2003 << 12)
    r = await stack.kvm.NestedPageFault(
        kvm_pb2.NestedPageFaultRequest(
            identity=guest.ident, gpa=0x2003 << 12, error_code=p.fault.error_code
        )
    )
    assert (r.action, r.retry) == ("psmash", True)
    assert (await guest.pvalidate(0x2003 << 12)).result == rmp_pb2.RMP_RESULT_SUCCESS
    # a private access to a shared page: kvm makes it private; the retry takes #VC
    rd = await guest.read(0x3000 << 12, 8, private=True)
    assert rd.fault.npf
    r = await stack.kvm.NestedPageFault(
        kvm_pb2.NestedPageFaultRequest(
            identity=guest.ident, gpa=0x3000 << 12, error_code=rd.fault.error_code
        )
    )
    assert r.action == "convert_private"
    rd = await guest.read(0x3000 << 12, 8, private=True)
    assert rd.fault.vc and rd.fault.cause == "page not validated"


async def test_convert_kill_terminates_through_the_kick_stream(tmp_path: Path) -> None:
    async with host_stack(tmp_path, policy="convert-kill") as s:
        guest = await s.launch()
        secrets = await guest.secrets()
        assert len(secrets) == 4096
        vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)).vm
        # the host (a daemon) writes the guest's secrets page
        entries = (
            await s.rmp.ListRmpEntries(
                rmp_pb2.ListRmpEntriesRequest(first_pfn=0, count=4096, non_default_only=True),
                metadata=HOST,
            )
        ).entries
        target = next(e for e in entries if e.asid == vm.asid and e.gpa == 0x803000)
        w = await s.rmp.HostWrite(
            rmp_pb2.HostWriteRequest(
                spa=target.pfn << 12,
                data=b"x",
                origin=rmp_pb2.ACCESS_ORIGIN_USER,
                writer="daemon",
            ),
            metadata=HOST,
        )
        assert w.outcome == rmp_pb2.VIOLATION_OUTCOME_CONVERTED
        for _ in range(50):
            vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)).vm
            if vm.state == kvm_pb2.VM_STATE_TERMINATED:
                break
            await asyncio.sleep(0.05)
        assert vm.state == kvm_pb2.VM_STATE_TERMINATED and vm.term_reason_set == 0xF


async def test_teardown_returns_every_page(stack: Stack) -> None:
    before = await stack.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    guest = await stack.launch(memory=64 << 20, vcpus=2)
    await guest.register_ghcb()
    await psc_exit(guest, [entry(0x2000, psc.Op.PRIVATE, True), entry(0x1000, psc.Op.PRIVATE)])
    await guest.guest_request(report_req())
    r = await stack.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=guest.vm), metadata=HOST)
    assert r.leaked_pages == 0
    after = await stack.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    assert after.free_pages == before.free_pages
    left = []
    for first in range(0, after.max_pfn + 1, 4096):
        entries = (
            await stack.rmp.ListRmpEntries(
                rmp_pb2.ListRmpEntriesRequest(first_pfn=first, count=4096, non_default_only=True),
                metadata=HOST,
            )
        ).entries
        left += [e for e in entries if e.asid]
    assert left == []
    assert not (await stack.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
    # the ASID is reusable after the DF_FLUSH teardown issued
    again = await stack.launch()
    assert again.measurement


# KERNEL: include/uapi/linux/psp-sev.h SEV_RET_WBINVD_REQUIRED = 0x000E
SEV_RET_WBINVD_REQUIRED = 0x000E


async def test_vm_destroy_and_kvm_load_run_wbinvd_before_df_flush(
    stack: Stack, launched_vm: Guest
) -> None:
    """wbinvd_on_all_cpus() comes right before every SNP_DF_FLUSH: at VM destroy (KERNEL:
    arch/x86/kvm/svm/sev.c sev_flush_asids()) and at load (drivers/crypto/ccp/sev-dev.c
    __sev_snp_init_locked()), because DECOMMISSION clears the WBINVD indicator and the firmware
    refuses a DF_FLUSH without it."""

    r = await stack.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=launched_vm.vm), metadata=HOST)
    assert r.leaked_pages == 0
    # kvm dies right after a DECOMMISSION: the ASID awaits WBINVD and DF_FLUSH
    other = await stack.launch()
    impl: Any = stack.runtimes["kvm"].impl
    gctx = impl.kvm.vms[other.vm.id].gctx
    await stack.psp.Decommission(
        psp_pb2.DecommissionRequest(gctx=handles_pb2.GuestContextHandle(gctx_paddr=gctx)),
        metadata=HOST,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.psp.SnpDfFlush(psp_pb2.SnpDfFlushRequest(), metadata=HOST)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_info(info.value)
    assert detail is not None and detail.reason == "WBINVD_REQUIRED"
    assert int(detail.metadata["fw_status"], 16) == SEV_RET_WBINVD_REQUIRED
    # the next kvm to load flushes it: WBINVD, SNP_INIT, WBINVD, SNP_DF_FLUSH
    env = {
        "SNPEMU_GRPC_PORT": "0",
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_HOST_CREDENTIAL": CRED,
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
        "SNPEMU_RMP_ADDR": stack.runtimes["rmp"].address,
        "SNPEMU_PSP_ADDR": stack.runtimes["psp"].address,
    }
    again = ServiceRuntime(
        kvm_service.SPEC, ServiceConfig.from_env("kvm", env), kvm_service.SPEC.options({})
    )
    try:
        await again.start()
        loaded: Any = again.impl
        assert loaded.kvm.snp_enabled
    finally:
        await again.stop()
    await stack.psp.SnpDfFlush(psp_pb2.SnpDfFlushRequest(), metadata=HOST)  # nothing left


@pytest.mark.rpc("snp.kvm.v1.KvmService/HoldVm", "ok", "error")
async def test_a_vm_whose_last_hold_closes_is_destroyed(stack: Stack) -> None:
    """HoldVm is the VM fd: closing the last one without DestroyVm (the VMM died) destroys the
    VM and frees its memory; a VM destroyed first is left alone when its hold closes."""

    before = await stack.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call = stack.kvm.HoldVm(
            kvm_pb2.HoldVmRequest(vm=handles_pb2.VmHandle(id="vm-nope")), metadata=HOST
        )
        await call.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    guest = await stack.launch(memory=64 << 20, vcpus=2)
    holds = [stack.kvm.HoldVm(kvm_pb2.HoldVmRequest(vm=guest.vm), metadata=HOST) for _ in "ab"]
    for h in holds:
        assert (await h.read()).vm.id == guest.vm.id
    servicer: Any = stack.runtimes["kvm"].impl.servicer  # type: ignore[union-attr]
    assert servicer.holds[guest.vm.id] == 2
    holds[0].cancel()  # one fd closed, another still open: the VM stays
    # kvm has taken the close in (one open hold left) and started no release
    await eventually(lambda: servicer.holds.get(guest.vm.id) == 1, "kvm saw the close")
    assert not servicer.releases
    vm = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=guest.vm), metadata=HOST)).vm
    assert vm.asid and vm.state == kvm_pb2.VM_STATE_RUNNING
    # and the VM still works: its guest's exits are answered
    r = await guest.msr(msr.SEV_INFO_REQ)
    # KERNEL: sev-common.h GHCB_MSR_SEV_INFO(2, 1, 51): versions 2..1, C-bit 51
    assert r.ghcb_msr == 0x0002_0001_3300_0001
    holds[1].cancel()
    for _ in range(100):
        if not (await stack.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms:
            break
        await asyncio.sleep(0.05)
    assert not (await stack.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
    after = await stack.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    assert after.free_pages == before.free_pages
    # destroyed first, then the hold closes: nothing more happens
    other = await stack.launch(memory=64 << 20)
    hold = stack.kvm.HoldVm(kvm_pb2.HoldVmRequest(vm=other.vm), metadata=HOST)
    await hold.read()
    await stack.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=other.vm), metadata=HOST)
    hold.cancel()
    # kvm has taken the close in; a VM already destroyed is not released again
    await eventually(lambda: other.vm.id not in servicer.holds, "kvm saw the close")
    assert not servicer.releases
    third = await stack.launch(memory=64 << 20)
    assert [
        v.vm.id for v in (await stack.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
    ] == [third.vm.id]


@pytest.mark.rpc("snp.kvm.v1.KvmService/StreamTraceEvents", "ok")
async def test_trace_events_stream(stack: Stack, launched_vm: Guest) -> None:
    call = stack.kvm.StreamTraceEvents(
        kvm_pb2.StreamTraceEventsRequest(vm=launched_vm.vm), metadata=HOST
    )
    seen: list[kvm_pb2.StreamTraceEventsResponse] = []

    async def follow() -> None:
        async for ev in call:
            seen.append(ev)

    trace: Any = stack.runtimes["kvm"].impl.kvm.trace  # type: ignore[union-attr]
    task = asyncio.ensure_future(follow())
    await eventually(lambda: len(trace.queues) == 1, "kvm took the subscription")
    await launched_vm.msr(msr.SEV_INFO_REQ)
    await launched_vm.register_ghcb()
    # two exits, an enter and an exit event each
    await eventually(lambda: len(seen) >= 4, "four trace events arrived")
    call.cancel()
    await asyncio.gather(task, return_exceptions=True)
    names = [e.name for e in seen]
    assert names[:2] == ["kvm_vmgexit_msr_protocol_enter", "kvm_vmgexit_msr_protocol_exit"]
    assert seen[0].ghcb_msr == msr.SEV_INFO_REQ and seen[1].ghcb_msr == 0x0002000133000001
