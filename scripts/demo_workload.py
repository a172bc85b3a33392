"""Keep a running virtual host busy for a while, so dashboards and `snpemu top` have something
to show: the guests ask for reports, convert memory back and forth and send each other packets.

    python scripts/demo_workload.py --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import grpc
from snp.common.v1 import types_pb2
from snp.guest.v1 import guest_pb2, guest_pb2_grpc
from snpemu.hostconfig import HostConfig
from snpemu.runtime.channels import owner_channel
from snpemu.runtime.credentials import read_owner_credential


async def guest_loop(stub: guest_pb2_grpc.GuestServiceStub, i: int, peer: str, until: float) -> int:
    done = 0
    with_device = True
    try:
        await stub.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(), timeout=30)
    except grpc.aio.AioRpcError:
        with_device = False
    gpa = 0x400000 + i * 0x200000
    while time.monotonic() < until:
        await stub.GetReport(guest_pb2.GetReportRequest(report_data=b"demo"), timeout=30)
        for conversion in (guest_pb2.CONVERSION_TO_SHARED, guest_pb2.CONVERSION_TO_PRIVATE):
            await stub.ConvertMemory(
                guest_pb2.ConvertMemoryRequest(
                    gpa=gpa,
                    size=0x100000,
                    conversion=conversion,
                    page_size=types_pb2.PAGE_SIZE_4K,
                ),
                timeout=60,
            )
        if with_device:
            for _ in range(5):
                await stub.SendPacket(
                    guest_pb2.SendPacketRequest(destination_mac=peer, payload=b"demo"), timeout=30
                )
            await stub.ReceivePackets(guest_pb2.ReceivePacketsRequest(), timeout=30)
        done += 1
    return done


async def main(seconds: float) -> None:
    config = HostConfig.load()
    until = time.monotonic() + seconds
    guests = config.guests[:2]
    state = Path(os.environ.get("SNPEMU_STATE_DIR", ".snpemu"))
    channels = [
        owner_channel(f"127.0.0.1:{g.grpc_port}", read_owner_credential(state, g.name))
        for g in guests
    ]
    try:
        rounds = await asyncio.gather(
            *(
                guest_loop(
                    guest_pb2_grpc.GuestServiceStub(ch),
                    i,
                    f"02:00:00:00:00:{(1 - i) + 1:02x}",
                    until,
                )
                for i, ch in enumerate(channels)
            )
        )
        print(f"rounds per guest: {rounds}")
    finally:
        for ch in channels:
            await ch.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    asyncio.run(main(parser.parse_args().seconds))
