"""psp benchmark: attestation report latency and rate through the services, next to the crypto
floor measured in the same run (one ECDSA P-384 signature plus two AES-256-GCM operations).

    .venv/bin/python bench/psp_bench.py     # or: make bench

Real hardware takes about 8 ms per report (docs/design.md#performance); target p50 < 2 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2, psp_pb2_grpc
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc
from snpemu.abi import guest_message as gm

from services import free_port, pct, start

N = 400
CRED = "bench-credential-0123456789"
MD = (("x-snpemu-host-credential", CRED),)


def crypto_floor() -> list[float]:
    key = ec.generate_private_key(ec.SECP384R1())
    gcm = AESGCM(os.urandom(32))
    body, payload = os.urandom(0x2A0), os.urandom(96)
    times = []
    for i in range(N):
        t = time.perf_counter()
        ct = gcm.encrypt(i.to_bytes(12, "little"), payload, b"aad")
        gcm.decrypt(i.to_bytes(12, "little"), ct, b"aad")
        key.sign(body, ec.ECDSA(hashes.SHA384()))
        times.append(time.perf_counter() - t)
    return times


async def drive(
    rmp_addr: str, psp_addr: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    async with grpc.aio.insecure_channel(rmp_addr) as rc, grpc.aio.insecure_channel(psp_addr) as pc:
        rmp, psp = rmp_pb2_grpc.RmpServiceStub(rc), psp_pb2_grpc.PspServiceStub(pc)

        async def alloc(n: int, placement: int = rmp_pb2.PLACEMENT_ANY) -> list[int]:
            r = await rmp.AllocatePages(
                rmp_pb2.AllocatePagesRequest(count=n, placement=placement), metadata=MD
            )
            return [p << 12 for p in r.pfns]

        async def update(spa: int, **state: object) -> None:
            await rmp.RmpUpdate(
                rmp_pb2.RmpUpdateRequest(
                    spa=spa, state=rmp_pb2.RmpState(page_size=types_pb2.PAGE_SIZE_4K, **state)
                ),
                metadata=MD,
            )  # type: ignore[arg-type]

        await psp.SnpInit(psp_pb2.SnpInitRequest(), metadata=MD)
        (gctx_spa,) = await alloc(1, rmp_pb2.PLACEMENT_SNP_SAFE)
        await update(gctx_spa, assigned=True, immutable=True)
        gctx = (
            await psp.GctxCreate(psp_pb2.GctxCreateRequest(gctx_paddr=gctx_spa), metadata=MD)
        ).gctx
        await psp.LaunchStart(psp_pb2.LaunchStartRequest(gctx=gctx, policy=0x30000), metadata=MD)
        await psp.Activate(psp_pb2.ActivateRequest(gctx=gctx, asid=1), metadata=MD)
        (secrets,) = await alloc(1)
        await update(secrets, gpa=0x2000, assigned=True, immutable=True, asid=1)
        await psp.LaunchUpdate(
            psp_pb2.LaunchUpdateRequest(
                gctx=gctx,
                address=secrets,
                page_type=psp_pb2.PAGE_TYPE_SECRETS,
                page_size=types_pb2.PAGE_SIZE_4K,
            ),
            metadata=MD,
        )
        await psp.LaunchFinish(psp_pb2.LaunchFinishRequest(gctx=gctx), metadata=MD)
        ident = handles_pb2.VcpuIdentity(
            vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id="b")), asid=1, token=bytes(16)
        )
        await rmp.RegisterVcpuIdentity(
            rmp_pb2.RegisterVcpuIdentityRequest(identity=ident), metadata=MD
        )
        await rmp.UpdateNestedPageTable(
            rmp_pb2.UpdateNestedPageTableRequest(
                asid=1, map=[rmp_pb2.NptMapping(gpa=0x2000, first_pfn=secrets >> 12, npages=1)]
            ),
            metadata=MD,
        )
        vmpck = (
            await rmp.GuestRead(
                rmp_pb2.GuestReadRequest(identity=ident, gpa=0x2000, length=4096, private=True)
            )
        ).data[0x20:0x40]
        (req,) = await alloc(1)
        (res,) = await alloc(1, rmp_pb2.PLACEMENT_SNP_SAFE)
        await update(res, assigned=True, immutable=True)
        # The round trips on a report's path, measured now: client -> psp (a command that
        # touches no memory) and psp -> rmp (one access on a firmware session).
        hop_psp, hop_rmp = [], []
        session = rmp.FirmwareSession(metadata=MD)
        for _ in range(200):
            t = time.perf_counter()
            await psp.GuestStatus(psp_pb2.GuestStatusRequest(gctx=gctx), metadata=MD)
            hop_psp.append(time.perf_counter() - t)
            t = time.perf_counter()
            await session.write(
                rmp_pb2.FirmwareSessionRequest(
                    read=rmp_pb2.FirmwareReadRequest(spa=req, length=4096)
                )
            )
            await session.read()
            hop_rmp.append(time.perf_counter() - t)
        await session.done_writing()
        whole, fw_only = [], []
        for i in range(N):
            seq = 2 * i + 1
            msg = gm.seal(
                vmpck,
                gm.Header(
                    seqno=seq, msg_type=gm.MsgType.REPORT_REQ, msg_version=1, msg_sz=96, vmpck=0
                ),
                bytes(96),
            )
            t0 = time.perf_counter()
            await rmp.HostWrite(
                rmp_pb2.HostWriteRequest(
                    spa=req, data=msg, origin=rmp_pb2.ACCESS_ORIGIN_KERNEL, writer="kvm"
                ),
                metadata=MD,
            )
            t1 = time.perf_counter()
            await psp.GuestRequest(
                psp_pb2.GuestRequestRequest(gctx=gctx, req_paddr=req, res_paddr=res), metadata=MD
            )
            t2 = time.perf_counter()
            page = (
                await rmp.HostRead(rmp_pb2.HostReadRequest(spa=res, length=4096), metadata=MD)
            ).data
            t3 = time.perf_counter()
            assert gm.parse_header(page).seqno == seq + 1
            whole.append(t3 - t0)
            fw_only.append(t2 - t1)
        return whole, fw_only, hop_psp, hop_rmp


def ms(values: list[float], q: float) -> float:
    return pct(values, q) * 1000


def main() -> int:
    floor = crypto_floor()
    rmp_port, psp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        common = {"SNPEMU_HOST_CREDENTIAL": CRED, "SNPEMU_BIND": "127.0.0.1"}
        rmp = start(
            "snpemu.rmp",
            {
                **common,
                "SNPEMU_GRPC_PORT": str(rmp_port),
                "SNPEMU_METRICS_PORT": "0",
                "SNPEMU_RMP_MEMORY": "1G",
            },
            rmp_port,
            "snp.rmp.v1.RmpService",
        )
        psp = start(
            "snpemu.psp",
            {
                **common,
                "SNPEMU_GRPC_PORT": str(psp_port),
                "SNPEMU_METRICS_PORT": "0",
                "SNPEMU_KDS_PORT": "0",
                "SNPEMU_DATA_DIR": str(Path(data) / "psp"),
                "SNPEMU_RMP_ADDR": f"127.0.0.1:{rmp_port}",
            },
            psp_port,
            "snp.psp.v1.PspService",
        )
        try:
            whole, fw_only, hop_psp, hop_rmp = asyncio.run(
                drive(f"127.0.0.1:{rmp_port}", f"127.0.0.1:{psp_port}")
            )
        finally:
            for p in (psp, rmp):
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    print(f"psp benchmark: {N} sequential attestation reports, {os.cpu_count()} CPUs")
    print(f"crypto floor (1 ECDSA P-384 sign + 2 AES-GCM), in-process: p50 {ms(floor, 0.5):.3f} ms")
    print(
        f"SNP_GUEST_REQUEST RPC (psp, with its rmp reads/writes): p50 {ms(fw_only, 0.5):.3f} ms, "
        f"p99 {ms(fw_only, 0.99):.3f} ms   target p50 < 2 ms (hardware ~8 ms)"
    )
    print(
        f"KVM path (write request, GuestRequest, read response): p50 {ms(whole, 0.5):.3f} ms, "
        f"p99 {ms(whole, 0.99):.3f} ms, {1 / statistics.mean(whole):.0f} reports/s"
    )
    limit = ms(floor, 0.5) + ms(hop_psp, 0.5) + 2 * ms(hop_rmp, 0.5)
    print(
        f"same-run limit: crypto floor + client->psp round trip {ms(hop_psp, 0.5):.3f} ms "
        f"+ 2 x psp->rmp session round trip {ms(hop_rmp, 0.5):.3f} ms = {limit:.3f} ms"
    )
    print(f"ratio GuestRequest p50 / limit: {ms(fw_only, 0.5) / limit:.2f}   target <= 1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
