"""kvm's PspPort over gRPC: the typed psp stub (the CCP driver's SEV/SNP commands)."""

from __future__ import annotations

from typing import Any

from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2 as pb

from snpemu.abi.addr import Spa
from snpemu.abi.platform_status import PlatformState
from snpemu.kvm.ports import Certificates, LaunchFinish, SevPlatformStatus
from snpemu.runtime.peers import Peer


def _gctx(gctx: Spa) -> handles_pb2.GuestContextHandle:
    return handles_pb2.GuestContextHandle(gctx_paddr=gctx)


def _size(size_2m: bool) -> types_pb2.PageSize.ValueType:
    return types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K


class GrpcPsp:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @property
    def stub(self) -> Any:  # snp.psp.v1.psp_pb2_grpc.PspServiceStub on the peer's channel
        return self.peer.ensure()

    async def platform_status(self) -> SevPlatformStatus:
        r: pb.SevPlatformStatusResponse = await self.peer.invoke(
            self.stub.SevPlatformStatus, pb.SevPlatformStatusRequest()
        )
        state: PlatformState | int = r.state
        if r.state in PlatformState._value2member_map_:
            state = PlatformState(r.state)
        return SevPlatformStatus(r.api_major, r.api_minor, state)

    async def snp_init(self) -> None:
        await self.peer.invoke(self.stub.SnpInit, pb.SnpInitRequest())

    async def snp_df_flush(self) -> None:
        await self.peer.invoke(self.stub.SnpDfFlush, pb.SnpDfFlushRequest())

    async def sev_init(self, tmr: Spa, tmr_len: int) -> None:
        await self.peer.invoke(self.stub.SevInit, pb.SevInitRequest(tmr_paddr=tmr, tmr_len=tmr_len))

    async def get_certificates(self) -> Certificates:
        r: pb.GetCertificatesResponse = await self.peer.invoke(
            self.stub.GetCertificates, pb.GetCertificatesRequest()
        )
        return Certificates(
            ark_der=bytes(r.ark_der),
            ask_der=bytes(r.ask_der),
            vcek_der=bytes(r.vcek_der),
            product_name=r.product_name,
        )

    async def set_extended_config(self, certs_blob: bytes) -> None:
        await self.peer.invoke(
            self.stub.SetExtendedConfig, pb.SetExtendedConfigRequest(certs_blob=certs_blob)
        )

    async def gctx_create(self, gctx: Spa) -> None:
        await self.peer.invoke(self.stub.GctxCreate, pb.GctxCreateRequest(gctx_paddr=gctx))

    async def launch_start(self, gctx: Spa, policy: int, gosvw: bytes = bytes(16)) -> None:
        await self.peer.invoke(
            self.stub.LaunchStart,
            pb.LaunchStartRequest(gctx=_gctx(gctx), policy=policy, gosvw=gosvw),
        )

    async def activate(self, gctx: Spa, asid: int) -> None:
        await self.peer.invoke(self.stub.Activate, pb.ActivateRequest(gctx=_gctx(gctx), asid=asid))

    async def launch_update(
        self, gctx: Spa, spa: Spa, page_type: int, *, size_2m: bool = False
    ) -> None:
        await self.peer.invoke(
            self.stub.LaunchUpdate,
            pb.LaunchUpdateRequest(
                gctx=_gctx(gctx),
                address=spa,
                page_type=pb.PageType.ValueType(page_type),
                page_size=_size(size_2m),
            ),
        )

    async def launch_finish(self, gctx: Spa, finish: LaunchFinish) -> bytes:
        r: pb.LaunchFinishResponse = await self.peer.invoke(
            self.stub.LaunchFinish,
            pb.LaunchFinishRequest(
                gctx=_gctx(gctx),
                id_block=finish.id_block,
                id_auth=finish.id_auth,
                id_block_en=finish.id_block_en,
                auth_key_en=finish.auth_key_en,
                vcek_disabled=finish.vcek_disabled,
                host_data=finish.host_data,
            ),
        )
        return bytes(r.measurement)

    async def decommission(self, gctx: Spa) -> None:
        await self.peer.invoke(self.stub.Decommission, pb.DecommissionRequest(gctx=_gctx(gctx)))

    async def page_reclaim(self, spa: Spa, *, size_2m: bool = False) -> None:
        await self.peer.invoke(
            self.stub.PageReclaim, pb.PageReclaimRequest(paddr=spa, page_size=_size(size_2m))
        )

    async def guest_request(self, gctx: Spa, req: Spa, res: Spa) -> None:
        await self.peer.invoke(
            self.stub.GuestRequest,
            pb.GuestRequestRequest(gctx=_gctx(gctx), req_paddr=req, res_paddr=res),
        )

    async def close(self) -> None:
        await self.peer.close()
