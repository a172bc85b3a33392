"""rmp and psp as real gRPC servers in one process (port 0), psp reaching rmp over gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2, psp_pb2_grpc
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc
from snpemu import psp, rmp
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime

CRED = "pair-credential-0123456789"
HOST = (("x-snpemu-host-credential", CRED),)


@dataclass
class Pair:
    rmp: rmp_pb2_grpc.RmpServiceStub
    psp: psp_pb2_grpc.PspServiceStub
    rmp_rt: ServiceRuntime
    psp_rt: ServiceRuntime

    async def alloc(self, count: int = 1, placement: int = rmp_pb2.PLACEMENT_ANY) -> list[int]:
        r = await self.rmp.AllocatePages(
            rmp_pb2.AllocatePagesRequest(count=count, placement=placement), metadata=HOST
        )
        return [p << 12 for p in r.pfns]

    async def firmware_page(self) -> int:
        (spa,) = await self.alloc(1, rmp_pb2.PLACEMENT_SNP_SAFE)
        r = await self.rmp.RmpUpdate(
            rmp_pb2.RmpUpdateRequest(
                spa=spa,
                state=rmp_pb2.RmpState(
                    assigned=True, immutable=True, page_size=types_pb2.PAGE_SIZE_4K
                ),
            ),
            metadata=HOST,
        )
        assert r.result == rmp_pb2.RMP_RESULT_SUCCESS
        return spa

    async def pre_guest(self, spa: int, gpa: int, asid: int, data: bytes | None) -> None:
        """What the VMM and KVM do to a page before SNP_LAUNCH_UPDATE."""
        if data:
            w = await self.rmp.HostWrite(
                rmp_pb2.HostWriteRequest(
                    spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_USER, writer="vmm"
                ),
                metadata=HOST,
            )
            assert w.outcome == rmp_pb2.VIOLATION_OUTCOME_NONE
        r = await self.rmp.RmpUpdate(
            rmp_pb2.RmpUpdateRequest(
                spa=spa,
                state=rmp_pb2.RmpState(
                    gpa=gpa,
                    assigned=True,
                    immutable=True,
                    asid=asid,
                    page_size=types_pb2.PAGE_SIZE_4K,
                ),
            ),
            metadata=HOST,
        )
        assert r.result == rmp_pb2.RMP_RESULT_SUCCESS

    async def launch_update(
        self,
        gctx: handles_pb2.GuestContextHandle,
        spa: int,
        gpa: int,
        asid: int,
        data: bytes | None,
        page_type: int = psp_pb2.PAGE_TYPE_NORMAL,
    ) -> None:
        """The page made pre-guest, then SNP_LAUNCH_UPDATE'd (4 KiB)."""
        await self.pre_guest(spa, gpa, asid, data)
        await self.psp.LaunchUpdate(
            psp_pb2.LaunchUpdateRequest(
                gctx=gctx, address=spa, page_type=page_type, page_size=types_pb2.PAGE_SIZE_4K
            ),
            metadata=HOST,
        )

    async def start_guest(self, asid: int, policy: int = 0x30000) -> handles_pb2.GuestContextHandle:
        gctx = (
            await self.psp.GctxCreate(
                psp_pb2.GctxCreateRequest(gctx_paddr=await self.firmware_page()), metadata=HOST
            )
        ).gctx
        await self.psp.LaunchStart(
            psp_pb2.LaunchStartRequest(gctx=gctx, policy=policy), metadata=HOST
        )
        await self.psp.Activate(psp_pb2.ActivateRequest(gctx=gctx, asid=asid), metadata=HOST)
        return gctx


@contextlib.asynccontextmanager
async def rmp_and_psp(data_dir: Path, memory: str = "256M") -> AsyncIterator[Pair]:
    common = {
        "SNPEMU_GRPC_PORT": "0",
        "SNPEMU_METRICS_PORT": "0",
        "SNPEMU_HOST_CREDENTIAL": CRED,
        "SNPEMU_SHUTDOWN_GRACE_S": "0",
    }
    rmp_rt = ServiceRuntime(
        rmp.SPEC,
        ServiceConfig.from_env("rmp", common),
        rmp.SPEC.options({"SNPEMU_RMP_MEMORY": memory}),
    )
    await rmp_rt.start()
    psp_env = {**common, "SNPEMU_RMP_ADDR": rmp_rt.address, "SNPEMU_DATA_DIR": str(data_dir)}
    psp_rt = ServiceRuntime(
        psp.SPEC, ServiceConfig.from_env("psp", psp_env), psp.SPEC.options({"SNPEMU_KDS_PORT": "0"})
    )
    await psp_rt.start()
    try:
        async with (
            grpc.aio.insecure_channel(rmp_rt.address) as rc,
            grpc.aio.insecure_channel(psp_rt.address) as pc,
        ):
            yield Pair(
                rmp_pb2_grpc.RmpServiceStub(rc), psp_pb2_grpc.PspServiceStub(pc), rmp_rt, psp_rt
            )
    finally:
        await psp_rt.stop()
        await rmp_rt.stop()
