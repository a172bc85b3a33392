"""The psp service over real gRPC, reaching a real rmp service over gRPC (both in-process)."""

from __future__ import annotations

import asyncio
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.abi import guest_message as gm
from snpemu.psp import report as rpt
from snpemu.runtime.status import error_info

from tests.service.host_pair import HOST, Pair, rmp_and_psp


async def test_failing_command_carries_the_firmware_status(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        page = await pair.firmware_page()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pair.psp.GctxCreate(psp_pb2.GctxCreateRequest(gctx_paddr=page), metadata=HOST)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("INVALID_PLATFORM_STATE (0x01)")
        detail = error_info(info.value)
        assert detail is not None
        assert (detail.reason, detail.domain, dict(detail.metadata)) == (
            "INVALID_PLATFORM_STATE",
            "psp.snpemu",
            {"fw_status": "0x0001"},
        )
        # host-only: no credential, no command
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pair.psp.SnpInit(psp_pb2.SnpInitRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reg = pair.psp_rt.registry
        assert (
            reg.get_sample_value(
                "snp_psp_commands_total",
                {"command": "SNP_GCTX_CREATE", "status": "INVALID_PLATFORM_STATE"},
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "snp_psp_commands_total", {"command": "SNP_INIT", "status": "SUCCESS"}
            )
            == 0
        )
        # a failure that never happened is already a series at zero, so that the first one
        # is a step a rate() sees
        assert (
            reg.get_sample_value(
                "snp_psp_commands_total",
                {"command": "SNP_DF_FLUSH", "status": "WBINVD_REQUIRED"},
            )
            == 0
        )
        assert reg.get_sample_value("snp_psp_platform_state") == 0


async def test_platform_status_page_is_written_and_left_in_reclaim(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        await pair.psp.SnpInit(psp_pb2.SnpInitRequest(), metadata=HOST)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # must be a firmware page
            (spa,) = await pair.alloc()
            await pair.psp.SnpPlatformStatus(
                psp_pb2.SnpPlatformStatusRequest(status_paddr=spa), metadata=HOST
            )
        assert error_info(info.value).reason == "INVALID_PAGE_STATE"  # type: ignore[union-attr]
        page = await pair.firmware_page()
        s = await pair.psp.SnpPlatformStatus(
            psp_pb2.SnpPlatformStatusRequest(status_paddr=page), metadata=HOST
        )
        assert (s.api_major, s.api_minor, s.state, s.is_rmp_initialized) == (
            1,
            55,
            psp_pb2.PLATFORM_STATE_INIT,
            True,
        )
        assert len(s.raw) == 0x20 and s.current_tcb.raw == s.reported_tcb.raw
        written = await pair.rmp.HostRead(
            rmp_pb2.HostReadRequest(spa=page, length=0x20), metadata=HOST
        )
        assert written.data == s.raw
        e = (
            await pair.rmp.ReadRmpEntry(rmp_pb2.ReadRmpEntryRequest(pfn=page >> 12), metadata=HOST)
        ).entry
        assert e.state == types_pb2.PAGE_STATE_RECLAIM


async def launch_and_report(pair: Pair, user_data: bytes) -> tuple[bytes, bytes]:
    """Launch a small guest, then fetch a report as guest driver + KVM would."""
    await pair.psp.SnpInit(psp_pb2.SnpInitRequest(), metadata=HOST)
    asid = 3
    gctx = await pair.start_guest(asid)
    code, secrets_spa = await pair.alloc(2)
    await pair.launch_update(gctx, code, 0x1000, asid, os.urandom(4096))
    await pair.launch_update(gctx, secrets_spa, 0x2000, asid, None, psp_pb2.PAGE_TYPE_SECRETS)
    fin = await pair.psp.LaunchFinish(
        psp_pb2.LaunchFinishRequest(gctx=gctx, host_data=bytes(range(32))), metadata=HOST
    )
    # the guest (identity from kvm) reads VMPCK0 from its secrets page by private access
    ident = handles_pb2.VcpuIdentity(
        vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id="vm")), asid=asid, token=bytes(16)
    )
    await pair.rmp.RegisterVcpuIdentity(
        rmp_pb2.RegisterVcpuIdentityRequest(identity=ident), metadata=HOST
    )
    await pair.rmp.UpdateNestedPageTable(
        rmp_pb2.UpdateNestedPageTableRequest(
            asid=asid, map=[rmp_pb2.NptMapping(gpa=0x2000, first_pfn=secrets_spa >> 12, npages=1)]
        ),
        metadata=HOST,
    )
    secrets = await pair.rmp.GuestRead(
        rmp_pb2.GuestReadRequest(identity=ident, gpa=0x2000, length=4096, private=True)
    )
    assert not secrets.HasField("fault")
    vmpck0 = secrets.data[0x20:0x40]
    # request page: shared; response page: a firmware page (KVM's bounce page)
    (req,) = await pair.alloc()
    res = await pair.firmware_page()
    msg = gm.seal(
        vmpck0,
        gm.Header(seqno=1, msg_type=gm.MsgType.REPORT_REQ, msg_version=1, msg_sz=96, vmpck=0),
        user_data + bytes(32),
    )
    await pair.rmp.HostWrite(
        rmp_pb2.HostWriteRequest(
            spa=req, data=msg, origin=rmp_pb2.ACCESS_ORIGIN_KERNEL, writer="kvm"
        ),
        metadata=HOST,
    )
    await pair.psp.GuestRequest(
        psp_pb2.GuestRequestRequest(gctx=gctx, req_paddr=req, res_paddr=res), metadata=HOST
    )
    page = (
        await pair.rmp.HostRead(rmp_pb2.HostReadRequest(spa=res, length=4096), metadata=HOST)
    ).data
    hdr = gm.parse_header(page)
    payload = gm.open_payload(vmpck0, hdr, page)
    assert hdr.seqno == 2 and struct.unpack_from("<II", payload, 0) == (0, 0x4A0)
    return payload[0x20 : 0x20 + 0x4A0], fin.measurement


async def test_report_through_the_services_verifies_with_the_served_vcek(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        user = os.urandom(64)
        report, measurement = await launch_and_report(pair, user)
        assert report[0x50:0x90] == user and report[0x90:0xC0] == measurement
        certs = await pair.psp.GetCertificates(psp_pb2.GetCertificatesRequest(), metadata=HOST)
        vcek = x509.load_der_x509_certificate(certs.vcek_der).public_key()
        assert rpt.verify(report, vcek)  # type: ignore[arg-type]
        # Milan at its default stepping 1: productName Milan-B1 (go-sev-guest kds/kds.go
        # steppingDecoder), and the report's CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (report
        # version 3, offsets 0x188..0x18A) say family 0x19, model 0x01, stepping 1
        assert certs.chip_id == report[0x1A0:0x1E0] and certs.product_name == "Milan-B1"
        assert tuple(report[0x188:0x18B]) == (0x19, 0x01, 1)
        reg = pair.psp_rt.registry
        assert reg.get_sample_value("snp_guests", {"state": "running"}) == 1
        assert (
            reg.get_sample_value(
                "snp_psp_commands_total", {"command": "SNP_GUEST_REQUEST", "status": "SUCCESS"}
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "snp_psp_command_duration_seconds_count", {"command": "SNP_LAUNCH_UPDATE"}
            )
            == 2
        )


async def test_kds_endpoint_and_a_persistent_identity(tmp_path: Path) -> None:
    async def chip_and_chain() -> tuple[bytes, bytes]:
        """A psp on tmp_path's data directory: its KDS answers, and its chip ID and ARK."""
        async with rmp_and_psp(tmp_path) as pair:
            kds = pair.psp_rt.impl.kds.port  # type: ignore[union-attr]
            certs = await pair.psp.GetCertificates(psp_pb2.GetCertificatesRequest(), metadata=HOST)
            status = await pair.psp.GetExtendedConfig(
                psp_pb2.GetExtendedConfigRequest(), metadata=HOST
            )
            t = status.reported_tcb
            base = f"http://127.0.0.1:{kds}/vcek/v1/Milan"
            spls = f"blSPL={t.boot_loader}&teeSPL={t.tee}&snpSPL={t.snp}&ucodeSPL={t.microcode}"
            url = f"{base}/{certs.chip_id.hex()}?{spls}"

            def fetch(u: str) -> tuple[int, bytes]:
                try:
                    with urllib.request.urlopen(u, timeout=5) as r:
                        return r.status, r.read()
                except urllib.error.HTTPError as e:
                    return e.code, b""

            status_code, vcek = await asyncio.to_thread(fetch, url)
            assert status_code == 200 and vcek == certs.vcek_der
            code, chain = await asyncio.to_thread(fetch, f"{base}/cert_chain")
            pems = x509.load_pem_x509_certificates(chain)
            assert code == 200 and [c.subject.rfc4514_string().split(",")[0] for c in pems] == [
                "CN=SEV-Milan",
                "CN=ARK-Milan",
            ]
            code, crl = await asyncio.to_thread(fetch, f"{base}/crl")
            assert code == 200 and crl == certs.crl_der
            assert (
                await asyncio.to_thread(
                    fetch, f"{base}/{'00' * 64}?blSPL=1&teeSPL=0&snpSPL=1&ucodeSPL=1"
                )
            )[0] == 404
            # an SPL beyond a byte is malformed (400); one not given counts as 0 (AMD 57230
            # chapter 4: "unspecified SPL values are assumed to be zero")
            assert (await asyncio.to_thread(fetch, f"{base}/{certs.chip_id.hex()}?blSPL=256"))[
                0
            ] == 400
            assert (await asyncio.to_thread(fetch, f"{base}/{certs.chip_id.hex()}"))[0] == 200
            assert (
                await asyncio.to_thread(fetch, f"http://127.0.0.1:{kds}/vcek/v1/Genoa/cert_chain")
            )[0] == 404
            return certs.chip_id, certs.ark_der

    first = await chip_and_chain()
    second = await chip_and_chain()  # a new psp on the same data directory: the same chip and chain
    assert first == second


@pytest.mark.rpc("snp.psp.v1.PspService/GuestRequest", "ok", "error")
async def test_guest_request_needs_a_firmware_response_page(tmp_path: Path) -> None:
    async with rmp_and_psp(tmp_path) as pair:
        report, _ = await launch_and_report(pair, bytes(64))
        gctx = handles_pb2.GuestContextHandle(
            gctx_paddr=next(iter(pair.psp_rt.impl.fw.guests))  # type: ignore[union-attr]
        )
        req, res = await pair.alloc(2)  # the response page is a hypervisor page: refused
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pair.psp.GuestRequest(
                psp_pb2.GuestRequestRequest(gctx=gctx, req_paddr=req, res_paddr=res),
                metadata=HOST,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(info.value).reason == "INVALID_PAGE_STATE"  # type: ignore[union-attr]
        assert len(report) == 0x4A0
