"""Each psp command through gRPC, on its success path and refusing a wrong request.

The status numbers are the kernel's: KERNEL: include/uapi/linux/psp-sev.h enum sev_ret_code
(SEV_RET_INVALID_PLATFORM_STATE 0x01, INVALID_GUEST_STATE 0x02, INVALID_LEN 0x04,
POLICY_FAILURE 0x07, INVALID_ADDRESS 0x09, INVALID_GUEST 0x10, INVALID_PARAM 0x16,
INVALID_PAGE_STATE 0x1A, INVALID_PAGE_OWNER 0x1C, RMP_INIT_REQUIRED 0x20).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2 as pb
from snp.rmp.v1 import rmp_pb2
from snpemu.runtime.status import error_info

from tests.service.host_pair import HOST, Pair, rmp_and_psp

# SPEC: SEV-SNP Firmware ABI, guest policy: bit 17 must be one, bit 16 SMT allowed, bit 19 DEBUG
POLICY = 0x30000
POLICY_DEBUG = 1 << 19
SEV_FW_BLOB_MAX_SIZE = 0x4000  # KERNEL: include/linux/psp-sev.h


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str, fw: int) -> str:
    """The call fails with `code` and the firmware status `reason` (number `fw`)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    detail = error_info(info.value)
    assert detail is not None
    assert (detail.reason, detail.domain, dict(detail.metadata)) == (
        reason,
        "psp.snpemu",
        {"fw_status": f"0x{fw:04x}"},
    )
    assert info.value.details().startswith(f"{reason} (0x{fw:02x})")
    return str(info.value.details())


async def unauthenticated(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(info.value).reason == "HOST_CREDENTIAL_MISSING"  # type: ignore[union-attr]


async def entry(pair: Pair, spa: int) -> rmp_pb2.RmpEntry:
    r = await pair.rmp.ReadRmpEntry(rmp_pb2.ReadRmpEntryRequest(pfn=spa >> 12), metadata=HOST)
    return r.entry


async def host_read(pair: Pair, spa: int, length: int = 4096) -> bytes:
    r = await pair.rmp.HostRead(rmp_pb2.HostReadRequest(spa=spa, length=length), metadata=HOST)
    return bytes(r.data)


async def firmware_page_with(pair: Pair, data: bytes) -> int:
    """A hypervisor page written by the host, then made a firmware page (RMPUPDATE)."""
    (spa,) = await pair.alloc()
    w = await pair.rmp.HostWrite(
        rmp_pb2.HostWriteRequest(spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_KERNEL),
        metadata=HOST,
    )
    assert w.outcome == rmp_pb2.VIOLATION_OUTCOME_NONE
    r = await pair.rmp.RmpUpdate(
        rmp_pb2.RmpUpdateRequest(
            spa=spa,
            state=rmp_pb2.RmpState(assigned=True, immutable=True, page_size=types_pb2.PAGE_SIZE_4K),
        ),
        metadata=HOST,
    )
    assert r.result == rmp_pb2.RMP_RESULT_SUCCESS
    return spa


@pytest.mark.rpc("snp.psp.v1.PspService/SnpShutdown", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpShutdownEx", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpInit", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpInitEx", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SevInit", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SevShutdown", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SevPlatformStatus", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpCommit", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpDfFlush", "error")
async def test_platform_init_and_shutdown_in_order(tmp_path: Path) -> None:
    """SNP_INIT, legacy SEV INIT and the shutdowns, each refused out of order."""

    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        fps = grpc.StatusCode.FAILED_PRECONDITION
        await refused(
            psp.SnpShutdown(pb.SnpShutdownRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        await refused(
            psp.SnpShutdownEx(pb.SnpShutdownExRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        await refused(
            psp.SevShutdown(pb.SevShutdownRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        # legacy SEV first (no TMR rules without SNP), which SNP_INIT then refuses
        legacy = await psp.SevPlatformStatus(pb.SevPlatformStatusRequest(), metadata=HOST)
        assert legacy.state == pb.PLATFORM_STATE_UNINIT
        await unauthenticated(psp.SevPlatformStatus(pb.SevPlatformStatusRequest()))
        await psp.SevInit(pb.SevInitRequest(), metadata=HOST)
        legacy = await psp.SevPlatformStatus(pb.SevPlatformStatusRequest(), metadata=HOST)
        assert legacy.state == pb.PLATFORM_STATE_INIT
        await refused(
            psp.SevInit(pb.SevInitRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        message = await refused(
            psp.SnpInit(pb.SnpInitRequest(), metadata=HOST), fps, "INVALID_PLATFORM_STATE", 1
        )
        assert "legacy SEV" in message
        await psp.SevShutdown(pb.SevShutdownRequest(), metadata=HOST)
        legacy = await psp.SevPlatformStatus(pb.SevPlatformStatusRequest(), metadata=HOST)
        assert legacy.state == pb.PLATFORM_STATE_UNINIT

        # SNP_INIT_EX without INIT_RMP on a first initialisation
        await refused(
            psp.SnpInitEx(pb.SnpInitExRequest(init_rmp=False), metadata=HOST),
            fps,
            "RMP_INIT_REQUIRED",
            0x20,
        )
        # an HV-fixed range: its page leaves hypervisor state
        (fixed,) = await pair.alloc()
        await psp.SnpInitEx(
            pb.SnpInitExRequest(
                init_rmp=True, hv_fixed_ranges=[pb.MemoryRange(base=fixed, page_count=1)]
            ),
            metadata=HOST,
        )
        assert (await entry(pair, fixed)).state == types_pb2.PAGE_STATE_HYPERVISOR_FIXED
        message = await refused(
            psp.SnpInit(pb.SnpInitRequest(), metadata=HOST), fps, "INVALID_PLATFORM_STATE", 1
        )
        assert "already initialised" in message
        # with SNP on, legacy SEV needs a 2 MiB TMR of firmware pages
        await refused(
            psp.SevInit(pb.SevInitRequest(tmr_paddr=fixed, tmr_len=4096), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ADDRESS",
            0x09,
        )
        await psp.SnpShutdownEx(
            pb.SnpShutdownExRequest(iommu_snp_shutdown=True, x86_snp_shutdown=True),
            metadata=HOST,
        )
        # shut down: a command that needs SNP is refused again, and SNP_INIT works again
        await refused(
            psp.SnpCommit(pb.SnpCommitRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        await psp.SnpShutdown(pb.SnpShutdownRequest(), metadata=HOST)
        await refused(
            psp.SnpDfFlush(pb.SnpDfFlushRequest(), metadata=HOST),
            fps,
            "INVALID_PLATFORM_STATE",
            0x01,
        )


@pytest.mark.rpc("snp.psp.v1.PspService/SnpConfig", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpCommit", "ok")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpFeatureInfo", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpDfFlush", "ok")
@pytest.mark.rpc("snp.psp.v1.PspService/SetExtendedConfig", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/GetExtendedConfig", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/GetCertificates", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/SnpPlatformStatus", "ok", "error")
async def test_platform_configuration(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        await refused(
            psp.SnpConfig(pb.SnpConfigRequest(mask_chip_id=True), metadata=HOST),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_PLATFORM_STATE",
            0x01,
        )
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        before = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        await unauthenticated(psp.GetExtendedConfig(pb.GetExtendedConfigRequest()))
        current = before.reported_tcb
        # KERNEL: arch/x86/include/asm/sev.h union tcb_version: bytes 0 boot_loader, 1 tee,
        # 2-5 reserved, 6 snp, 7 microcode. A reported TCB above the current one is refused.
        higher = types_pb2.TcbVersion(raw=current.raw + (1 << 48))
        await refused(
            psp.SnpConfig(pb.SnpConfigRequest(reported_tcb=higher), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAM",
            0x16,
        )
        # a lower one (microcode byte 7 one lower) is taken, with the chip-ID mask
        assert current.microcode > 0
        lower = types_pb2.TcbVersion(raw=current.raw - (1 << 56))
        await psp.SnpConfig(
            pb.SnpConfigRequest(reported_tcb=lower, mask_chip_id=True), metadata=HOST
        )
        after = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        assert after.reported_tcb.raw == lower.raw
        assert after.reported_tcb.microcode == current.microcode - 1
        page = await pair.firmware_page()
        status = await psp.SnpPlatformStatus(
            pb.SnpPlatformStatusRequest(status_paddr=page), metadata=HOST
        )
        assert status.mask_chip_id and not status.mask_chip_key
        assert status.reported_tcb.raw == lower.raw
        assert status.current_tcb.raw == current.raw
        await refused(
            psp.SnpPlatformStatus(
                pb.SnpPlatformStatusRequest(status_paddr=page + 8), metadata=HOST
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ADDRESS",
            0x09,
        )
        await psp.SnpCommit(pb.SnpCommitRequest(), metadata=HOST)

        # the certificate blob: stored as given, at most SEV_FW_BLOB_MAX_SIZE
        blob = os.urandom(3000)
        await psp.SetExtendedConfig(pb.SetExtendedConfigRequest(certs_blob=blob), metadata=HOST)
        got = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        assert got.certs_blob == blob
        await refused(
            psp.SetExtendedConfig(
                pb.SetExtendedConfigRequest(certs_blob=bytes(SEV_FW_BLOB_MAX_SIZE + 1)),
                metadata=HOST,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_LEN",
            0x04,
        )
        got = await psp.GetExtendedConfig(pb.GetExtendedConfigRequest(), metadata=HOST)
        assert got.certs_blob == blob  # the refused blob changed nothing

        # SNP_FEATURE_INFO: only ECX_IN 0 is a defined leaf
        await psp.SnpFeatureInfo(pb.SnpFeatureInfoRequest(ecx_in=0), metadata=HOST)
        await refused(
            psp.SnpFeatureInfo(pb.SnpFeatureInfoRequest(ecx_in=1), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAM",
            0x16,
        )
        # DF_FLUSH after a WBINVD on every core
        await pair.rmp.Wbinvd(rmp_pb2.WbinvdRequest(), metadata=HOST)
        await psp.SnpDfFlush(pb.SnpDfFlushRequest(), metadata=HOST)

        certs = await psp.GetCertificates(pb.GetCertificatesRequest(), metadata=HOST)
        from cryptography import x509

        vcek = x509.load_der_x509_certificate(certs.vcek_der)
        ask = x509.load_der_x509_certificate(certs.ask_der)
        assert vcek.issuer == ask.subject
        await unauthenticated(psp.GetCertificates(pb.GetCertificatesRequest()))


@pytest.mark.rpc("snp.psp.v1.PspService/GctxCreate", "ok")
@pytest.mark.rpc("snp.psp.v1.PspService/Activate", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/LaunchStart", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/LaunchUpdate", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/LaunchFinish", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/GuestStatus", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/Decommission", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/PageReclaim", "ok", "error")
async def test_guest_context_lifecycle(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        ctx_page = await pair.firmware_page()
        gctx = (await psp.GctxCreate(pb.GctxCreateRequest(gctx_paddr=ctx_page), metadata=HOST)).gctx
        assert (await entry(pair, ctx_page)).state == types_pb2.PAGE_STATE_CONTEXT
        st = await psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST)
        assert st.state == pb.GUEST_STATE_INIT
        nowhere = handles_pb2.GuestContextHandle(gctx_paddr=ctx_page + 0x1000)
        await refused(
            psp.GuestStatus(pb.GuestStatusRequest(gctx=nowhere), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GUEST",
            0x10,
        )
        # LAUNCH_FINISH before LAUNCH_START
        await refused(
            psp.LaunchFinish(pb.LaunchFinishRequest(gctx=gctx), metadata=HOST),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_GUEST_STATE",
            0x02,
        )
        await refused(
            psp.LaunchStart(
                pb.LaunchStartRequest(gctx=gctx, policy=POLICY, ma_en=True), metadata=HOST
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAM",
            0x16,
        )
        await psp.LaunchStart(pb.LaunchStartRequest(gctx=gctx, policy=POLICY), metadata=HOST)
        st = await psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST)
        assert (st.state, st.policy) == (pb.GUEST_STATE_LAUNCH, POLICY)
        await refused(
            psp.Activate(pb.ActivateRequest(gctx=nowhere, asid=5), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GUEST",
            0x10,
        )
        await psp.Activate(pb.ActivateRequest(gctx=gctx, asid=5), metadata=HOST)
        assert (await psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST)).asid == 5

        # LAUNCH_UPDATE of a page that is not pre-guest
        (plain,) = await pair.alloc()
        await refused(
            psp.LaunchUpdate(
                pb.LaunchUpdateRequest(
                    gctx=gctx,
                    address=plain,
                    page_type=pb.PAGE_TYPE_NORMAL,
                    page_size=types_pb2.PAGE_SIZE_4K,
                ),
                metadata=HOST,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_PAGE_STATE",
            0x1A,
        )
        (page,) = await pair.alloc()
        await pair.launch_update(gctx, page, 0x1000, 5, os.urandom(4096))
        e = await entry(pair, page)
        assert (e.state, e.asid, e.gpa) == (types_pb2.PAGE_STATE_PRE_GUEST, 5, 0x1000)
        # a page of a guest still launching cannot be reclaimed
        await refused(
            psp.PageReclaim(
                pb.PageReclaimRequest(paddr=page, page_size=types_pb2.PAGE_SIZE_4K),
                metadata=HOST,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_PAGE_STATE",
            0x1A,
        )
        await psp.LaunchFinish(pb.LaunchFinishRequest(gctx=gctx), metadata=HOST)
        assert (await entry(pair, page)).state == types_pb2.PAGE_STATE_GUEST_VALID
        st = await psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST)
        assert st.state == pb.GUEST_STATE_RUNNING

        await refused(
            psp.Decommission(pb.DecommissionRequest(gctx=nowhere), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GUEST",
            0x10,
        )
        await psp.Decommission(pb.DecommissionRequest(gctx=gctx), metadata=HOST)
        await refused(
            psp.GuestStatus(pb.GuestStatusRequest(gctx=gctx), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GUEST",
            0x10,
        )
        # the context page is a firmware page again, which SNP_PAGE_RECLAIM takes
        assert (await entry(pair, ctx_page)).state == types_pb2.PAGE_STATE_FIRMWARE
        await psp.PageReclaim(
            pb.PageReclaimRequest(paddr=ctx_page, page_size=types_pb2.PAGE_SIZE_4K),
            metadata=HOST,
        )
        assert (await entry(pair, ctx_page)).state == types_pb2.PAGE_STATE_RECLAIM


@pytest.mark.rpc("snp.psp.v1.PspService/GctxCreate", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/DbgDecrypt", "ok", "error")
@pytest.mark.rpc("snp.psp.v1.PspService/DbgEncrypt", "ok", "error")
async def test_debug_decrypt_and_encrypt_need_the_debug_policy(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        psp = pair.psp
        await psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        (hv_page,) = await pair.alloc()
        await refused(  # the context page must be a firmware page
            psp.GctxCreate(pb.GctxCreateRequest(gctx_paddr=hv_page), metadata=HOST),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_PAGE_STATE",
            0x1A,
        )
        launched = os.urandom(4096)
        debug = await pair.start_guest(6, POLICY | POLICY_DEBUG)
        (page,) = await pair.alloc()
        await pair.launch_update(debug, page, 0x1000, 6, launched)
        assert await host_read(pair, page) != launched  # encrypted with the guest's key

        # DBG_DECRYPT of the launched page gives what LAUNCH_UPDATE encrypted
        out = await pair.firmware_page()
        await psp.DbgDecrypt(
            pb.DbgDecryptRequest(gctx=debug, src_addr=page, dst_addr=out), metadata=HOST
        )
        assert await host_read(pair, out) == launched
        # DBG_ENCRYPT of new plaintext into the guest page, then back
        plain = os.urandom(4096)
        src = await firmware_page_with(pair, plain)
        await psp.DbgEncrypt(
            pb.DbgEncryptRequest(gctx=debug, src_addr=src, dst_addr=page), metadata=HOST
        )
        cipher = await host_read(pair, page)
        assert cipher not in (plain, launched)
        out2 = await pair.firmware_page()
        await psp.DbgDecrypt(
            pb.DbgDecryptRequest(gctx=debug, src_addr=page, dst_addr=out2), metadata=HOST
        )
        assert await host_read(pair, out2) == plain

        # a guest whose policy does not allow debugging
        plain_guest = await pair.start_guest(7, POLICY)
        (other,) = await pair.alloc()
        await pair.launch_update(plain_guest, other, 0x1000, 7, launched)
        await refused(
            psp.DbgDecrypt(
                pb.DbgDecryptRequest(gctx=plain_guest, src_addr=other, dst_addr=out),
                metadata=HOST,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "POLICY_FAILURE",
            0x07,
        )
        # the debug guest may not write into the other guest's page
        await refused(
            psp.DbgEncrypt(
                pb.DbgEncryptRequest(gctx=debug, src_addr=src, dst_addr=other), metadata=HOST
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_PAGE_OWNER",
            0x1C,
        )
        assert await host_read(pair, other) != plain


@pytest.mark.rpc("snp.psp.v1.PspService/PageUnsmash", "ok", "error")
async def test_page_unsmash_merges_a_smashed_2m_page(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        await pair.psp.SnpInit(pb.SnpInitRequest(), metadata=HOST)
        r = await pair.rmp.AllocatePages(
            rmp_pb2.AllocatePagesRequest(count=512, placement=rmp_pb2.PLACEMENT_ALIGNED_2M),
            metadata=HOST,
        )
        base = r.pfns[0] << 12
        assert base % (2 << 20) == 0
        u = await pair.rmp.RmpUpdate(
            rmp_pb2.RmpUpdateRequest(
                spa=base,
                state=rmp_pb2.RmpState(
                    gpa=0x200000, assigned=True, asid=9, page_size=types_pb2.PAGE_SIZE_2M
                ),
            ),
            metadata=HOST,
        )
        assert u.result == rmp_pb2.RMP_RESULT_SUCCESS
        s = await pair.rmp.Psmash(rmp_pb2.PsmashRequest(spa=base), metadata=HOST)
        assert s.result == rmp_pb2.RMP_RESULT_SUCCESS
        e = await entry(pair, base + 0x5000)
        assert (e.page_size, e.gpa) == (types_pb2.PAGE_SIZE_4K, 0x205000)
        await refused(
            pair.psp.PageUnsmash(pb.PageUnsmashRequest(paddr=base + 0x1000), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ADDRESS",
            0x09,
        )
        await pair.psp.PageUnsmash(pb.PageUnsmashRequest(paddr=base), metadata=HOST)
        e = await entry(pair, base)
        assert (e.page_size, e.gpa, e.asid) == (types_pb2.PAGE_SIZE_2M, 0x200000, 9)
