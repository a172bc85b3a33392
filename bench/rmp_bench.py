"""rmp benchmark: RMPUPDATE and PVALIDATE page rates, in-process and over gRPC, and RSS.

    .venv/bin/python bench/rmp_bench.py            # or: make bench

Each gRPC figure is printed next to the raw transport limit measured in the same run: the
same request and response messages sent to a server whose handler does nothing. Figures are
medians over repeats; the machine is shared and noisy, so compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import uvloop
from snp.common.v1 import handles_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snp.rmp.v1 import rmp_pb2_grpc
from snpemu.abi import rmp_batch
from snpemu.abi.addr import PAGES_PER_2M
from snpemu.launcher.supervisor import grpc_health
from snpemu.rmp.table import RmpTable

from services import free_port

BATCH = 253  # a full GHCB PSC descriptor (VMGEXIT_PSC_MAX_COUNT)
REPEATS = 5
CONCURRENCY = 4
SECONDS = 2.0
POOL = 1 << 18  # pages cycled through (1 GiB)
ASID = 3


def median_rate(fn: Callable[[], float]) -> tuple[float, float, float]:
    rates = sorted(fn() for _ in range(REPEATS))
    return rates[0], statistics.median(rates), rates[-1]


# --- in-process -------------------------------------------------------------------------------


def inprocess_rmpupdate(batch: int) -> float:
    t = RmpTable(POOL)
    pfns = np.arange(POOL, dtype=np.int64)
    gpas = pfns.astype(np.uint64) << np.uint64(12)
    false = np.zeros(POOL, dtype=bool)
    asids = np.full(POOL, ASID, dtype=np.int64)
    done = 0
    start = time.perf_counter()
    for assigned in (np.ones(POOL, dtype=bool), false):
        g = np.where(assigned, gpas, np.uint64(0))
        s = np.where(assigned, asids, 0)
        for i in range(0, POOL, batch):
            j = slice(i, i + batch)
            t.rmpupdate_batch(pfns[j], g[j], assigned[j], false[j], false[j], s[j])
            done += len(pfns[j])
    return done / (time.perf_counter() - start)


def inprocess_pvalidate(batch: int) -> float:
    t = RmpTable(POOL)
    pfns = np.arange(POOL, dtype=np.int64)
    gpas = pfns.astype(np.uint64) << np.uint64(12)
    t.rmpupdate_batch(
        pfns,
        gpas,
        np.ones(POOL, bool),
        np.zeros(POOL, bool),
        np.zeros(POOL, bool),
        np.full(POOL, ASID, dtype=np.int64),
    )
    done = 0
    start = time.perf_counter()
    for validate in (True, False):
        for i in range(0, POOL, batch):
            codes, fault = t.pvalidate_batch(
                pfns[i : i + batch], gpas[i : i + batch], asid=ASID, vmpl=0, validate=validate
            )
            assert fault is None and not codes.any()
            done += len(codes)
    return done / (time.perf_counter() - start)


# --- over gRPC -------------------------------------------------------------------------------


async def serve_empty(port: int) -> None:
    """A server with rmp's batch messages and handlers that do nothing."""

    class Empty(rmp_pb2_grpc.RmpServiceServicer):
        async def RmpUpdateBatch(self, request: Any, context: Any) -> pb.RmpUpdateBatchResponse:
            return pb.RmpUpdateBatchResponse(codes=bytes(len(request.entries) // 24))

        async def PvalidateBatch(self, request: Any, context: Any) -> pb.PvalidateBatchResponse:
            return pb.PvalidateBatchResponse(codes=bytes(len(request.gpas)))

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rmp_pb2_grpc.add_RmpServiceServicer_to_server(Empty(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def start(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{argv} did not start")


def update_batches() -> list[bytes]:
    out = []
    for assigned in (1, 0):
        for i in range(0, POOL, BATCH):
            spas = [p << 12 for p in range(i, min(i + BATCH, POOL))]
            out.append(
                rmp_batch.pack(
                    spas,
                    gpa=spas if assigned else 0,
                    assigned=bool(assigned),
                    asid=ASID if assigned else 0,
                )
            )
    return out


async def drive(
    address: str, calls: list[Callable[[Any], Awaitable[Any]]], pages: list[int]
) -> float:
    """Pages per second with CONCURRENCY calls in flight, for SECONDS."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rmp_pb2_grpc.RmpServiceStub(channel)
        done = 0
        nxt = 0
        stop = time.perf_counter() + SECONDS

        async def worker() -> None:
            nonlocal done, nxt
            while time.perf_counter() < stop:
                i = nxt % len(calls)
                nxt += 1
                await calls[i](stub)
                done += pages[i]

        start_t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - start_t)


def grpc_figures() -> dict[str, tuple[float, float, float]]:
    rmp_port, empty_port, metrics_port = free_port(), free_port(), free_port()
    rmp = start(
        [sys.executable, "-m", "snpemu.rmp"],
        {
            "SNPEMU_GRPC_PORT": str(rmp_port),
            "SNPEMU_METRICS_PORT": str(metrics_port),
            "SNPEMU_RMP_MEMORY": "2G",
            "SNPEMU_HOST_CREDENTIAL": "",
        },
        rmp_port,
    )
    empty = start([sys.executable, __file__, "--serve-empty", str(empty_port)], {}, empty_port)
    try:
        while grpc_health(f"127.0.0.1:{rmp_port}", "snp.rmp.v1.RmpService") != "SERVING":
            time.sleep(0.1)
        batches = update_batches()
        reqs = [pb.RmpUpdateBatchRequest(entries=b) for b in batches]
        n = [len(b) // 24 for b in batches]
        upd = [lambda s, r=r: s.RmpUpdateBatch(r) for r in reqs]

        # PVALIDATE: the guest's identity and nested page table, and private pages to validate
        with grpc.insecure_channel(f"127.0.0.1:{rmp_port}") as ch:
            s = rmp_pb2_grpc.RmpServiceStub(ch)
            ident = handles_pb2.VcpuIdentity(
                vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id="b")),
                asid=ASID,
                token=bytes(32),
            )
            s.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=ident))
            s.UpdateNestedPageTable(
                pb.UpdateNestedPageTableRequest(
                    asid=ASID, map=[pb.NptMapping(gpa=0, first_pfn=0, npages=POOL)]
                )
            )
            for r in reqs[: len(reqs) // 2]:  # the "assign" half
                s.RmpUpdateBatch(r)
        pv = []
        pv_n = []
        for validate in (True, False):
            for i in range(0, POOL, BATCH):
                gpas = [p << 12 for p in range(i, min(i + BATCH, POOL))]
                pv.append(pb.PvalidateBatchRequest(identity=ident, gpas=gpas, validate=validate))
                pv_n.append(len(gpas))
        pvc = [lambda s, r=r: s.PvalidateBatch(r) for r in pv]

        def measure(address: str, calls: list[Any], pages: list[int]) -> tuple[float, float, float]:
            return median_rate(lambda: uvloop.run(drive(address, calls, pages)))

        out = {}
        out["grpc_rmpupdate"] = measure(f"127.0.0.1:{rmp_port}", upd, n)
        out["empty_rmpupdate"] = measure(f"127.0.0.1:{empty_port}", upd, n)
        out["grpc_pvalidate"] = measure(f"127.0.0.1:{rmp_port}", pvc, pv_n)
        out["empty_pvalidate"] = measure(f"127.0.0.1:{empty_port}", pvc, pv_n)
        return out
    finally:
        for p in (rmp, empty):
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no VmRSS")


def rss_and_start(memory: str) -> tuple[float, float]:
    """rmp with this much host memory: MiB resident once SERVING, seconds from exec to it."""
    port, mport = free_port(), free_port()
    t = time.perf_counter()
    proc = start(
        [sys.executable, "-m", "snpemu.rmp"],
        {
            "SNPEMU_GRPC_PORT": str(port),
            "SNPEMU_METRICS_PORT": str(mport),
            "SNPEMU_RMP_MEMORY": memory,
        },
        port,
    )
    try:
        while grpc_health(f"127.0.0.1:{port}", "snp.rmp.v1.RmpService") != "SERVING":
            time.sleep(0.02)
        return rss_mib(proc.pid), time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def fmt(r: tuple[float, float, float]) -> str:
    return f"median {r[1] / 1e6:6.2f} M pages/s (min {r[0] / 1e6:.2f}, max {r[2] / 1e6:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-empty", type=int)
    args = parser.parse_args()
    if args.serve_empty:
        uvloop.run(serve_empty(args.serve_empty))
        return 0
    assert POOL % PAGES_PER_2M == 0
    print(
        f"rmp benchmark: {os.cpu_count()} CPUs, batches of {BATCH} 4K pages unless noted, "
        f"{REPEATS} repeats, {CONCURRENCY} calls in flight for {SECONDS:g} s over gRPC"
    )
    ip_big = median_rate(lambda: inprocess_rmpupdate(65536))
    ip_253 = median_rate(lambda: inprocess_rmpupdate(BATCH))
    pv_big = median_rate(lambda: inprocess_pvalidate(65536))
    pv_253 = median_rate(lambda: inprocess_pvalidate(BATCH))
    target = 10e6
    print(
        f"in-process RMPUPDATE, batches of 65536: {fmt(ip_big)}   target >= {target / 1e6:.0f} M/s"
    )
    print(f"in-process RMPUPDATE, batches of 253:   {fmt(ip_253)}")
    print(
        f"in-process PVALIDATE, batches of 65536: {fmt(pv_big)}   target >= {target / 1e6:.0f} M/s"
    )
    print(f"in-process PVALIDATE, batches of 253:   {fmt(pv_253)}")
    g = grpc_figures()
    for name in ("rmpupdate", "pvalidate"):
        real, empty = g[f"grpc_{name}"], g[f"empty_{name}"]
        ratio = real[1] / empty[1]
        print(f"gRPC {name.upper():9}: {fmt(real)}")
        print(f"  transport limit (empty handler, same messages): {fmt(empty)}")
        print(f"  ratio {ratio:.2f} of the transport limit   target >= 0.50")
    for memory in ("8G", "32G", "64G"):
        runs = [rss_and_start(memory) for _ in range(3)]
        rss = statistics.median(r[0] for r in runs)
        secs = statistics.median(r[1] for r in runs)
        target = "   target <= 400 MiB" if memory == "64G" else ""
        print(
            f"rmp with {memory.replace('G', ' GiB'):>6}: RSS {rss:4.0f} MiB, exec to SERVING "
            f"{secs:.2f} s (medians of 3){target}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
