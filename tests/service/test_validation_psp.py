"""Every psp request field is checked before the firmware acts: an address beyond memory is the
firmware's INVALID_ADDRESS, a status page in the TMR is refused, a TcbVersion SPL is a byte, an
enum value the proto does not define and a buffer longer than the command's are refused with a
PspReason, and nothing changes.

The reported cases (issue 19) first, through gRPC (rmp and psp serving): SnpPlatformStatus beyond
memory once answered UNKNOWN, SnpPlatformStatus took a page of the TMR, SnpConfig with an SPL of
999 set 0. Then hypothesis over the servicer on an in-process firmware and rmp, comparing both
before and after each refusal.

Status numbers: KERNEL include/uapi/linux/psp-sev.h enum sev_ret_code (INVALID_ADDRESS 0x09,
INVALID_PAGE_STATE 0x1A).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2 as pb
from snp.rmp.v1 import rmp_pb2
from snpemu.abi.addr import PAGE_SIZE, PMD_SIZE
from snpemu.errors import InvalidArgument, SnpemuError
from snpemu.psp.firmware import Firmware
from snpemu.psp.local_rmp import LocalRmp
from snpemu.psp.rmp_client import rmp_error
from snpemu.psp.servicer import PspServicer
from snpemu.psp.status import PspReason, SevStatus
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.reasons import RmpReason
from snpemu.runtime.status import error_info

from tests.service.host_pair import HOST, Pair, rmp_and_psp
from tests.service.test_rpc_netd import refused
from tests.service.test_validation_rmp import snapshot as rmp_snapshot
from tests.unit.psp.launch_helpers import Host as FwHost
from tests.unit.psp.launch_helpers import identity

U64_MAX = (1 << 64) - 1
MEMORY = 256 << 20  # rmp_and_psp's default
BAD = grpc.StatusCode.INVALID_ARGUMENT


async def firmware_refused(call: Any, code: grpc.StatusCode, status: SevStatus) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    detail = error_info(info.value)
    assert detail is not None
    assert (detail.reason, dict(detail.metadata)) == (
        status.name,
        {"fw_status": f"0x{status:04x}"},
    )


async def entry(pair: Pair, spa: int) -> rmp_pb2.RmpEntry:
    r = await pair.rmp.ReadRmpEntry(rmp_pb2.ReadRmpEntryRequest(pfn=spa >> 12), metadata=HOST)
    return r.entry


# --- the reported cases, through gRPC --------------------------------------------------------


async def test_platform_status_beyond_memory_is_invalid_address(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        for initialised in (False, True):
            if initialised:
                await pair.psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
            for spa in (MEMORY, U64_MAX & ~0xFFF):
                await firmware_refused(
                    pair.psp.SnpPlatformStatus(
                        pb.SnpPlatformStatusRequest(status_paddr=spa), metadata=HOST
                    ),
                    BAD,
                    SevStatus.INVALID_ADDRESS,
                )


async def test_platform_status_refuses_a_page_of_the_tmr(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        await pair.psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        # the TMR as the kernel makes it: 2 MiB of firmware pages, handed to SEV INIT.
        # KERNEL: drivers/crypto/ccp/sev-dev.c __sev_platform_init_handle_tmr()
        tmr = (await pair.alloc(512, rmp_pb2.PLACEMENT_ALIGNED_2M))[0]
        r = await pair.rmp.RmpUpdate(
            rmp_pb2.RmpUpdateRequest(
                spa=tmr,
                state=rmp_pb2.RmpState(
                    assigned=True, immutable=True, page_size=types_pb2.PAGE_SIZE_2M
                ),
            ),
            metadata=HOST,
        )
        assert r.result == rmp_pb2.RMP_RESULT_SUCCESS
        await pair.psp.SevInit(pb.SevInitRequest(tmr_paddr=tmr, tmr_len=PMD_SIZE), metadata=HOST)
        for page in (tmr, tmr + 0x1F_F000):
            await firmware_refused(
                pair.psp.SnpPlatformStatus(
                    pb.SnpPlatformStatusRequest(status_paddr=page), metadata=HOST
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                SevStatus.INVALID_PAGE_STATE,
            )
            assert (await entry(pair, page)).state == types_pb2.PAGE_STATE_FIRMWARE
        data = await pair.rmp.HostRead(rmp_pb2.HostReadRequest(spa=tmr, length=0x20), metadata=HOST)
        assert data.data == bytes(0x20)  # no status written over the TMR
        # a firmware page of the host's own still takes the status
        page = await pair.firmware_page()
        await pair.psp.SnpPlatformStatus(
            pb.SnpPlatformStatusRequest(status_paddr=page), metadata=HOST
        )


async def test_snp_config_spls_are_bytes(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        current = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        now = current.reported_tcb
        # SPEC: SNP ABI, TCB_VERSION: BOOT_LOADER 7:0, TEE 15:8, SNP 55:48, MICROCODE 63:56
        for bad in (
            types_pb2.TcbVersion(snp=999),
            types_pb2.TcbVersion(raw=now.raw, snp=999),
            types_pb2.TcbVersion(boot_loader=256, tee=now.tee, snp=now.snp),
            types_pb2.TcbVersion(microcode=1 << 31),
            types_pb2.TcbVersion(fmc=1),
        ):
            await refused(
                psp.SnpConfig(pb.SnpConfigRequest(reported_tcb=bad), metadata=HOST),
                BAD,
                PspReason.OUT_OF_RANGE,
            )
        await refused(  # raw and fields saying two different things
            psp.SnpConfig(
                pb.SnpConfigRequest(
                    reported_tcb=types_pb2.TcbVersion(raw=now.raw, snp=now.snp - 1)
                ),
                metadata=HOST,
            ),
            BAD,
            PspReason.TCB_MISMATCH,
        )
        after = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        assert after.reported_tcb.raw == now.raw  # none of them set anything
        # the fields alone name a TCB too: one SNP SPL lower is taken as such, not as 0
        lower = types_pb2.TcbVersion(
            boot_loader=now.boot_loader, tee=now.tee, snp=now.snp - 1, microcode=now.microcode
        )
        await psp.SnpConfig(pb.SnpConfigRequest(reported_tcb=lower), metadata=HOST)
        after = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        assert after.reported_tcb.raw == now.raw - (1 << 48)
        await refused(
            psp.GetCertificates(
                pb.GetCertificatesRequest(tcb=types_pb2.TcbVersion(tee=300)), metadata=HOST
            ),
            BAD,
            PspReason.OUT_OF_RANGE,
        )


async def test_commands_with_addresses_beyond_memory_are_invalid_address(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        beyond = MEMORY
        await firmware_refused(
            psp.SnpInitEx(
                pb.SnpInitExRequest(
                    init_rmp=True, hv_fixed_ranges=[pb.MemoryRange(base=beyond, page_count=1)]
                ),
                metadata=HOST,
            ),
            BAD,
            SevStatus.INVALID_ADDRESS,
        )
        await firmware_refused(
            psp.SnpInitEx(
                pb.SnpInitExRequest(
                    init_rmp=True,
                    hv_fixed_ranges=[pb.MemoryRange(base=beyond - PAGE_SIZE, page_count=2)],
                ),
                metadata=HOST,
            ),
            BAD,
            SevStatus.INVALID_ADDRESS,
        )
        (a,) = await pair.alloc()
        await firmware_refused(  # the same page in two ranges
            psp.SnpInitEx(
                pb.SnpInitExRequest(
                    init_rmp=True,
                    hv_fixed_ranges=[
                        pb.MemoryRange(base=a, page_count=1),
                        pb.MemoryRange(base=a, page_count=1),
                    ],
                ),
                metadata=HOST,
            ),
            BAD,
            SevStatus.INVALID_PARAM,
        )
        assert (await entry(pair, a)).state == types_pb2.PAGE_STATE_HYPERVISOR
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        gctx = await pair.start_guest(asid=3, policy=0x30000 | 1 << 19)  # debug allowed
        ctx = handles_pb2.GuestContextHandle(gctx_paddr=beyond)
        k4 = types_pb2.PAGE_SIZE_4K
        for call in (
            psp.GctxCreate(pb.GctxCreateRequest(gctx_paddr=beyond), metadata=HOST),
            psp.LaunchUpdate(
                pb.LaunchUpdateRequest(
                    gctx=gctx, address=beyond, page_type=pb.PAGE_TYPE_NORMAL, page_size=k4
                ),
                metadata=HOST,
            ),
            psp.PageReclaim(pb.PageReclaimRequest(paddr=beyond, page_size=k4), metadata=HOST),
            psp.PageUnsmash(pb.PageUnsmashRequest(paddr=beyond), metadata=HOST),
            psp.DbgDecrypt(
                pb.DbgDecryptRequest(gctx=gctx, src_addr=beyond, dst_addr=a), metadata=HOST
            ),
            psp.DbgEncrypt(
                pb.DbgEncryptRequest(gctx=gctx, src_addr=a, dst_addr=beyond), metadata=HOST
            ),
            psp.SevInit(pb.SevInitRequest(tmr_paddr=beyond, tmr_len=PMD_SIZE), metadata=HOST),
        ):
            await firmware_refused(call, BAD, SevStatus.INVALID_ADDRESS)
        # an unknown context is the firmware's INVALID_GUEST, whatever its address
        await firmware_refused(
            psp.GuestStatus(pb.GuestStatusRequest(gctx=ctx), metadata=HOST),
            BAD,
            SevStatus.INVALID_GUEST,
        )
        status = await psp.SnpPlatformStatus(
            pb.SnpPlatformStatusRequest(status_paddr=await pair.firmware_page()), metadata=HOST
        )
        assert status.guest_count == 1  # the one started above, nothing more


async def test_launch_fields_the_command_buffer_cannot_hold_are_refused(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        gctx = await pair.start_guest(asid=3)
        (spa,) = await pair.alloc()
        await pair.pre_guest(spa, 0, 3, b"page")
        k4 = types_pb2.PAGE_SIZE_4K
        normal = pb.PAGE_TYPE_NORMAL
        cases = [
            (pb.LaunchUpdateRequest(gctx=gctx, address=spa, page_type=99, page_size=k4),
             PspReason.UNKNOWN_ENUM_VALUE),
            (pb.LaunchUpdateRequest(gctx=gctx, address=spa, page_type=normal, page_size=9),
             PspReason.UNKNOWN_ENUM_VALUE),
            (pb.LaunchUpdateRequest(gctx=gctx, address=spa, page_type=normal, page_size=k4,
                                    vmpl2_perms=256),
             PspReason.OUT_OF_RANGE),
        ]  # fmt: skip
        for request, reason in cases:
            await refused(psp.LaunchUpdate(request, metadata=HOST), BAD, reason)
        for request, field in (
            (pb.LaunchFinishRequest(gctx=gctx, id_block=bytes(97)), "id_block"),
            (pb.LaunchFinishRequest(gctx=gctx, id_auth=bytes(4097)), "id_auth"),
            (pb.LaunchFinishRequest(gctx=gctx, host_data=bytes(33)), "host_data"),
        ):
            message = await refused(
                psp.LaunchFinish(request, metadata=HOST), BAD, PspReason.TOO_LONG
            )
            assert field in message
        await refused(
            psp.LaunchStart(pb.LaunchStartRequest(gctx=gctx, gosvw=bytes(1 << 20)), metadata=HOST),
            BAD,
            PspReason.TOO_LONG,
        )
        g = await psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST)
        assert g.state == pb.GUEST_STATE_LAUNCH  # still launching: nothing finished it
        assert (await entry(pair, spa)).state == types_pb2.PAGE_STATE_PRE_GUEST


def test_a_refusal_from_rmp_keeps_its_code() -> None:
    """A peer's error that the caller caused keeps its code (issue 19): rmp's page-state and
    beyond-memory refusals become the firmware's statuses; others keep their class."""
    e = rmp_error(BAD, "x", RmpReason.BEYOND_MEMORY, {})
    assert isinstance(e, InvalidArgument) and e.reason == SevStatus.INVALID_ADDRESS.name
    e = rmp_error(BAD, "x", RmpReason.UNKNOWN_ENUM_VALUE, {})
    assert isinstance(e, InvalidArgument) and e.reason == RmpReason.UNKNOWN_ENUM_VALUE
    e = rmp_error(grpc.StatusCode.FAILED_PRECONDITION, "x", RmpReason.NO_KEY, {})
    assert e.reason == RmpReason.NO_KEY and type(e).__name__ == "WrongState"
    e = rmp_error(grpc.StatusCode.INTERNAL, "x", "", {})
    assert type(e) is SnpemuError and e.reason == "INTERNAL"


# --- hypothesis over the servicer: a clear refusal, and firmware and rmp unchanged ------------

FW_MEMORY = 64 << 20


class Fw:
    """An in-process firmware over a 64 MiB rmp, SNP initialised, one debuggable guest
    launching at ASID 5 with one page launched, and a TMR."""

    def __init__(self, tmp: Path) -> None:
        machine = RmpMachine(FW_MEMORY)
        self.fw = Firmware(identity(tmp), LocalRmp(machine))
        self.host = FwHost(machine, self.fw)
        self.servicer = PspServicer(self.fw)
        asyncio.run(self.host.start(policy=0x30000 | 1 << 19))
        self.page = self.host.shared_page()

    def snapshot(self) -> tuple[Any, ...]:
        f = self.fw
        guests = {
            g: (c.state, c.asid, c.policy, list(c.launched), c.digest.value)
            for g, c in f.guests.items()
        }
        return (
            f.snp_initialized,
            f.legacy_initialized,
            f.tmr,
            f.reported_tcb,
            f.committed_tcb,
            f.mask_chip_id,
            f.mask_chip_key,
            f.certs_blob,
            guests,
            dict(f.asids),
            set(f.unflushed),
            rmp_snapshot(self.host.rmp),
        )

    def refuses(self, rpc: str, request: Any) -> str:
        before = self.snapshot()
        with pytest.raises(InvalidArgument) as info:
            asyncio.run(getattr(self.servicer, rpc)(request, None))
        assert self.snapshot() == before, rpc
        return info.value.reason


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Fw:
    return Fw(tmp_path_factory.mktemp("fw"))


def _address_cases(f: Fw) -> list[tuple[str, Callable[[int], Any]]]:
    gctx = handles_pb2.GuestContextHandle(gctx_paddr=f.host.gctx)
    k4 = types_pb2.PAGE_SIZE_4K
    return [
        ("SnpPlatformStatus", lambda v: pb.SnpPlatformStatusRequest(status_paddr=v)),
        ("GctxCreate", lambda v: pb.GctxCreateRequest(gctx_paddr=v)),
        (
            "LaunchUpdate",
            lambda v: pb.LaunchUpdateRequest(
                gctx=gctx, address=v, page_type=pb.PAGE_TYPE_NORMAL, page_size=k4
            ),
        ),
        ("PageReclaim", lambda v: pb.PageReclaimRequest(paddr=v, page_size=k4)),
        ("PageUnsmash", lambda v: pb.PageUnsmashRequest(paddr=v & ~(PMD_SIZE - 1))),
        (
            "DbgDecrypt",
            lambda v: pb.DbgDecryptRequest(gctx=gctx, src_addr=v, dst_addr=f.page),
        ),
        (
            "DbgEncrypt",
            lambda v: pb.DbgEncryptRequest(gctx=gctx, src_addr=f.page, dst_addr=v),
        ),
        ("SevInit", lambda v: pb.SevInitRequest(tmr_paddr=v & ~(PMD_SIZE - 1), tmr_len=PMD_SIZE)),
    ]


@settings(deadline=None)
@given(data=st.data())
def test_addresses_beyond_memory_are_invalid_address_and_change_nothing(fw: Fw, data: Any) -> None:
    cases = _address_cases(fw)
    rpc, build = cases[data.draw(st.integers(0, len(cases) - 1), label="case")]
    address = data.draw(st.integers(FW_MEMORY, U64_MAX), label="address")
    reason = fw.refuses(rpc, build(address))
    # unaligned addresses are INVALID_ADDRESS as well (SNP ABI: page-aligned addresses)
    assert reason == SevStatus.INVALID_ADDRESS.name


def _field_cases(f: Fw) -> list[tuple[str, st.SearchStrategy[Any], Callable[[Any], Any]]]:
    gctx = handles_pb2.GuestContextHandle(gctx_paddr=f.host.gctx)
    k4 = types_pb2.PAGE_SIZE_4K
    spl = st.integers(256, (1 << 32) - 1)
    undefined_size = st.integers(-(1 << 31), (1 << 31) - 1).filter(
        lambda v: v not in types_pb2.PageSize.values()
    )

    def update(**fields: Any) -> pb.LaunchUpdateRequest:
        base = {"gctx": gctx, "address": f.page, "page_type": pb.PAGE_TYPE_NORMAL, "page_size": k4}
        return pb.LaunchUpdateRequest(**{**base, **fields})

    return [
        (
            "SnpConfig",
            spl,
            lambda v: pb.SnpConfigRequest(reported_tcb=types_pb2.TcbVersion(snp=v)),
        ),
        (
            "SnpConfig",
            spl,
            lambda v: pb.SnpConfigRequest(reported_tcb=types_pb2.TcbVersion(boot_loader=v)),
        ),
        (
            "GetCertificates",
            spl,
            lambda v: pb.GetCertificatesRequest(tcb=types_pb2.TcbVersion(microcode=v)),
        ),
        ("LaunchUpdate", spl, lambda v: update(vmpl1_perms=v)),
        ("LaunchUpdate", spl, lambda v: update(vmpl3_perms=v)),
        ("LaunchUpdate", st.integers(8, (1 << 31) - 1), lambda v: update(page_type=v)),
        ("LaunchUpdate", undefined_size, lambda v: update(page_size=v)),
        ("PageReclaim", undefined_size, lambda v: pb.PageReclaimRequest(paddr=0, page_size=v)),
        ("PageUnsmash", undefined_size, lambda v: pb.PageUnsmashRequest(paddr=0, page_size=v)),
        (
            "LaunchFinish",
            st.binary(min_size=97, max_size=512),
            lambda v: pb.LaunchFinishRequest(gctx=gctx, id_block=v, id_block_en=True),
        ),
        (
            "LaunchFinish",
            st.binary(min_size=33, max_size=512),
            lambda v: pb.LaunchFinishRequest(gctx=gctx, host_data=v),
        ),
        (
            "LaunchStart",
            st.binary(min_size=17, max_size=512),
            lambda v: pb.LaunchStartRequest(gctx=gctx, gosvw=v),
        ),
    ]


@settings(deadline=None)
@given(data=st.data())
def test_fields_the_command_cannot_hold_are_refused_and_change_nothing(fw: Fw, data: Any) -> None:
    cases = _field_cases(fw)
    rpc, values, build = cases[data.draw(st.integers(0, len(cases) - 1), label="case")]
    reason = fw.refuses(rpc, build(data.draw(values, label="value")))
    assert reason in set(PspReason), reason
