"""gRPC adapter of the firmware model: one RPC per firmware command."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2 as pb

from snpemu.abi.addr import PAGE_SIZE, Spa
from snpemu.abi.platform_status import PlatformStatus, StatusFlag
from snpemu.abi.secrets import GOSVW_SIZE
from snpemu.psp.firmware import Firmware
from snpemu.psp.guest import ID_BLOCK
from snpemu.psp.launch import HOST_DATA_SIZE
from snpemu.psp.platform import FW_BLOB_MAX
from snpemu.psp.tcb import Tcb
from snpemu.psp.wire import MAX_RANGES, at_most, defined, gctx, size_2m, tcb_pb, tcb_raw, u8


class PspServicer:
    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    # --- platform ------------------------------------------------------------------------

    async def SnpInit(self, request: Any, context: Any) -> pb.SnpInitResponse:
        await self.fw.snp_init()
        return pb.SnpInitResponse()

    async def SnpInitEx(self, request: Any, context: Any) -> pb.SnpInitExResponse:
        at_most(len(request.hv_fixed_ranges), MAX_RANGES, "hv_fixed_ranges")
        await self.fw.snp_init_ex(
            init_rmp=request.init_rmp,
            hv_fixed=[(r.base, r.page_count) for r in request.hv_fixed_ranges],
            rapl_dis=request.rapl_dis,
            ciphertext_hiding=request.ciphertext_hiding,
        )
        return pb.SnpInitExResponse()

    async def SnpDfFlush(self, request: Any, context: Any) -> pb.SnpDfFlushResponse:
        await self.fw.df_flush()
        return pb.SnpDfFlushResponse()

    async def SnpShutdown(self, request: Any, context: Any) -> pb.SnpShutdownResponse:
        await self.fw.snp_shutdown()
        return pb.SnpShutdownResponse()

    async def SnpShutdownEx(self, request: Any, context: Any) -> pb.SnpShutdownExResponse:
        await self.fw.snp_shutdown_ex(
            iommu=request.iommu_snp_shutdown, x86=request.x86_snp_shutdown
        )
        return pb.SnpShutdownExResponse()

    async def SnpPlatformStatus(self, request: Any, context: Any) -> pb.SnpPlatformStatusResponse:
        raw = await self.fw.platform_status(Spa(request.status_paddr))
        st = PlatformStatus.unpack(raw)
        return pb.SnpPlatformStatusResponse(
            api_major=st.api_major,
            api_minor=st.api_minor,
            state=pb.PlatformState.ValueType(st.state + 1),
            is_rmp_initialized=st.is_rmp_initialized,
            build_id=st.build_id,
            mask_chip_id=StatusFlag.MASK_CHIP_ID in st.flags,
            mask_chip_key=StatusFlag.MASK_CHIP_KEY in st.flags,
            vlek_en=StatusFlag.VLEK_EN in st.flags,
            feature_info=StatusFlag.FEATURE_INFO in st.flags,
            rapl_dis=StatusFlag.RAPL_DIS in st.flags,
            ciphertext_hiding_cap=StatusFlag.CIPHERTEXT_HIDING_CAP in st.flags,
            ciphertext_hiding_en=StatusFlag.CIPHERTEXT_HIDING_EN in st.flags,
            guest_count=st.guest_count,
            current_tcb=tcb_pb(Tcb.from_raw(st.current_tcb)),
            reported_tcb=tcb_pb(Tcb.from_raw(st.reported_tcb)),
            raw=raw,
        )

    async def SnpConfig(self, request: Any, context: Any) -> pb.SnpConfigResponse:
        await self.fw.config(
            reported_tcb=tcb_raw(request.reported_tcb, "reported_tcb"),
            mask_chip_id=request.mask_chip_id,
            mask_chip_key=request.mask_chip_key,
        )
        return pb.SnpConfigResponse()

    async def SnpCommit(self, request: Any, context: Any) -> pb.SnpCommitResponse:
        await self.fw.commit()
        return pb.SnpCommitResponse()

    async def SnpFeatureInfo(self, request: Any, context: Any) -> pb.SnpFeatureInfoResponse:
        eax, ebx, ecx, edx = await self.fw.feature_info(request.ecx_in)
        return pb.SnpFeatureInfoResponse(eax=eax, ebx=ebx, ecx=ecx, edx=edx)

    async def SetExtendedConfig(self, request: Any, context: Any) -> pb.SetExtendedConfigResponse:
        # the firmware answers INVALID_LEN up to a page past its limit; beyond that the blob is
        # not a command buffer's worth and is refused before anything reads it
        at_most(len(request.certs_blob), 2 * FW_BLOB_MAX, "certs_blob")
        await self.fw.set_ext_config(request.certs_blob)
        return pb.SetExtendedConfigResponse()

    async def GetExtendedConfig(self, request: Any, context: Any) -> pb.GetExtendedConfigResponse:
        return pb.GetExtendedConfigResponse(
            certs_blob=self.fw.certs_blob, reported_tcb=tcb_pb(self.fw.reported_tcb)
        )

    async def SevInit(self, request: Any, context: Any) -> pb.SevInitResponse:
        await self.fw.sev_init(Spa(request.tmr_paddr), request.tmr_len)
        return pb.SevInitResponse()

    async def SevShutdown(self, request: Any, context: Any) -> pb.SevShutdownResponse:
        await self.fw.sev_shutdown()
        return pb.SevShutdownResponse()

    async def SevPlatformStatus(self, request: Any, context: Any) -> pb.SevPlatformStatusResponse:
        major, minor, state, flags, build, guests = self.fw.legacy_status()
        return pb.SevPlatformStatusResponse(
            api_major=major,
            api_minor=minor,
            state=pb.PlatformState.ValueType(state + 1),
            flags=flags,
            build=build,
            guest_count=guests,
        )

    # --- guests -------------------------------------------------------------------------------

    async def GctxCreate(self, request: Any, context: Any) -> pb.GctxCreateResponse:
        await self.fw.gctx_create(Spa(request.gctx_paddr))
        return pb.GctxCreateResponse(
            gctx=handles_pb2.GuestContextHandle(gctx_paddr=request.gctx_paddr)
        )

    async def Activate(self, request: Any, context: Any) -> pb.ActivateResponse:
        await self.fw.activate(gctx(request.gctx), request.asid)
        return pb.ActivateResponse()

    async def LaunchStart(self, request: Any, context: Any) -> pb.LaunchStartResponse:
        at_most(len(request.gosvw), GOSVW_SIZE, "gosvw")
        await self.fw.launch_start(
            gctx(request.gctx),
            policy=request.policy,
            gosvw=request.gosvw,
            ma_en=request.ma_en,
            imi_en=request.imi_en,
        )
        return pb.LaunchStartResponse()

    async def LaunchUpdate(self, request: Any, context: Any) -> pb.LaunchUpdateResponse:
        # PAGE_TYPE is bits 3:1 of the command's flags: a value it cannot hold is the wire's,
        # one it can (7 included) the firmware's to judge
        if request.page_type >= 8:
            defined(pb.PageType, request.page_type, "page_type")
        perms = (
            u8(request.vmpl1_perms, "vmpl1_perms"),
            u8(request.vmpl2_perms, "vmpl2_perms"),
            u8(request.vmpl3_perms, "vmpl3_perms"),
        )
        digest = await self.fw.launch_update(
            gctx(request.gctx),
            address=Spa(request.address),
            page_type=request.page_type,
            size_2m=size_2m(request.page_size),
            imi=request.imi_page,
            vmpl_perms=perms,
        )
        return pb.LaunchUpdateResponse(launch_digest=digest)

    async def LaunchFinish(self, request: Any, context: Any) -> pb.LaunchFinishResponse:
        at_most(len(request.id_block), ID_BLOCK.size, "id_block")
        at_most(len(request.id_auth), PAGE_SIZE, "id_auth")
        at_most(len(request.host_data), HOST_DATA_SIZE, "host_data")
        measurement = await self.fw.launch_finish(
            gctx(request.gctx),
            id_block=request.id_block,
            id_auth=request.id_auth,
            id_block_en=request.id_block_en,
            auth_key_en=request.auth_key_en,
            vcek_disabled=request.vcek_disabled,
            host_data=request.host_data,
        )
        return pb.LaunchFinishResponse(measurement=measurement)

    async def GuestStatus(self, request: Any, context: Any) -> pb.GuestStatusResponse:
        ctx = await self.fw.guest_status(gctx(request.gctx))
        return pb.GuestStatusResponse(
            policy=ctx.policy,
            asid=ctx.asid,
            state=pb.GuestState.ValueType(int(ctx.state)),
            vcek_dis=int(ctx.vcek_disabled),
        )

    async def Decommission(self, request: Any, context: Any) -> pb.DecommissionResponse:
        await self.fw.decommission(gctx(request.gctx))
        return pb.DecommissionResponse()

    async def PageReclaim(self, request: Any, context: Any) -> pb.PageReclaimResponse:
        await self.fw.page_reclaim(Spa(request.paddr), size_2m(request.page_size))
        return pb.PageReclaimResponse()

    async def PageUnsmash(self, request: Any, context: Any) -> pb.PageUnsmashResponse:
        defined(types_pb2.PageSize, request.page_size, "page_size")
        await self.fw.page_unsmash(Spa(request.paddr))
        return pb.PageUnsmashResponse()

    async def DbgDecrypt(self, request: Any, context: Any) -> pb.DbgDecryptResponse:
        await self.fw.dbg_decrypt(gctx(request.gctx), Spa(request.src_addr), Spa(request.dst_addr))
        return pb.DbgDecryptResponse()

    async def DbgEncrypt(self, request: Any, context: Any) -> pb.DbgEncryptResponse:
        await self.fw.dbg_encrypt(gctx(request.gctx), Spa(request.src_addr), Spa(request.dst_addr))
        return pb.DbgEncryptResponse()

    async def GuestRequest(self, request: Any, context: Any) -> pb.GuestRequestResponse:
        await self.fw.guest_request(
            gctx(request.gctx), Spa(request.req_paddr), Spa(request.res_paddr)
        )
        return pb.GuestRequestResponse()

    async def GetCertificates(self, request: Any, context: Any) -> pb.GetCertificatesResponse:
        ident = self.fw.id
        tcb = (
            Tcb.from_raw(tcb_raw(request.tcb, "tcb"))
            if request.HasField("tcb")
            else self.fw.reported_tcb
        )
        der = Encoding.DER
        return pb.GetCertificatesResponse(
            ark_der=ident.ark_cert.public_bytes(der),
            ask_der=ident.ask_cert.public_bytes(der),
            vcek_der=ident.vcek_cert(tcb).public_bytes(der),
            crl_der=ident.crl().public_bytes(der),
            product_name=ident.product.stepping_name,
            chip_id=ident.chip_id,
        )
