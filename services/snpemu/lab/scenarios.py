"""The lab's scenarios: one misbehaving guest (guest-0) while the others exchange traffic.

Each scenario arms its trap through the guest agent's misbehaviour RPCs and has guest-1 (an
innocent) send the packet or make the request that springs it. docs/design.md#the-lab is the
question; the lab's table is the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from snp.common.v1 import types_pb2
from snp.guest.v1 import guest_pb2

from snpemu.abi.addr import PAGE_MASK
from snpemu.guest.netdev import Layout
from snpemu.lab.traffic import mac

M, T = 0, 1  # the misbehaving guest, and the innocent that sends to it
BIG = bytes(range(256)) * 5 + bytes(120)  # 1400 bytes: a copy of several chunks


async def _send_to_m(host: Any, payload: bytes = b"for the misbehaving guest") -> str:
    try:
        r = await host.guest(T).SendPacket(
            guest_pb2.SendPacketRequest(destination_mac=mac(M), payload=payload), timeout=30
        )
        return f"guest-1's packet to guest-0: {r.result}"
    except grpc.aio.AioRpcError as e:
        return f"guest-1's packet to guest-0 failed: {e.code().name} {e.details()}"


async def _m_reads(host: Any) -> str:
    """The misbehaving guest looks at what arrived (a #VC shows here)."""
    try:
        r = await host.guest(M).ReceivePackets(guest_pb2.ReceivePacketsRequest(), timeout=30)
        return f"guest-0 received {len(r.packets)} packet(s)"
    except grpc.aio.AioRpcError as e:
        return f"guest-0 could not receive: {e.code().name}"


async def _while_armed(host: Any, trap: Any, delay_s: float, payload: bytes) -> list[str]:
    """Start guest-0's misbehaviour, give it delay_s to get going, send it a packet, and report
    how both ended."""
    task = asyncio.ensure_future(trap)
    await asyncio.sleep(delay_s)
    sent = await _send_to_m(host, payload)
    try:
        outcome = (await task).outcome
    except grpc.aio.AioRpcError as e:
        outcome = f"the misbehaviour ended: {e.code().name} {e.details()}"
    return [outcome, sent, await _m_reads(host)]


async def buggy_dma(host: Any) -> list[str]:
    m = host.guest(M)
    r = await m.SkipDmaConversion(guest_pb2.SkipDmaConversionRequest(mac=mac(M)), timeout=60)
    return [r.outcome, await _send_to_m(host), await _m_reads(host)]


async def flip_mid_copy(host: Any) -> list[str]:
    m = host.guest(M)
    await m.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(mac=mac(M)), timeout=60)
    flip = m.FlipBufferDuringCopy(
        guest_pb2.FlipBufferDuringCopyRequest(timeout_ms=10_000), timeout=30
    )
    return await _while_armed(host, flip, 0.3, BIG)  # 0.3 s: the flipper watches its buffer


async def kernel_write(host: Any) -> list[str]:
    try:
        r = await host.guest(M).FlipResponsePage(guest_pb2.FlipResponsePageRequest(), timeout=60)
        return [r.outcome]
    except grpc.aio.AioRpcError as e:
        return [f"FlipResponsePage failed: {e.code().name} {e.details()}"]


async def vmsa_write(host: Any) -> list[str]:
    m = host.guest(M)
    await m.AttachNetDevice(guest_pb2.AttachNetDeviceRequest(mac=mac(M)), timeout=60)
    r = await m.ExposeVmsaPage(guest_pb2.ExposeVmsaPageRequest(), timeout=60)
    return [r.outcome, await _send_to_m(host), await _m_reads(host)]


async def rmpadjust_race(host: Any) -> list[str]:
    m = host.guest(M)
    await m.SkipDmaConversion(guest_pb2.SkipDmaConversionRequest(mac=mac(M)), timeout=60)
    page = Layout(16).rx_buffer(0) & PAGE_MASK
    race = m.RaceRmpAdjust(guest_pb2.RaceRmpAdjustRequest(gpa=page, iterations=300), timeout=120)
    return await _while_armed(host, race, 0.05, b"for the misbehaving guest")


async def psc_storm(host: Any) -> list[str]:
    m = host.guest(M)
    flips = 0
    gpa, size = 0x200_0000, 2 << 20  # 32 MiB: a 2 MiB range flipped back and forth
    for i in range(12):
        to_private = i % 2 == 1
        await m.ConvertMemory(
            guest_pb2.ConvertMemoryRequest(
                gpa=gpa,
                size=size,
                conversion=guest_pb2.CONVERSION_TO_PRIVATE
                if to_private
                else guest_pb2.CONVERSION_TO_SHARED,
                page_size=types_pb2.PAGE_SIZE_4K,
            ),
            timeout=120,
        )
        flips += 512
    return [f"guest-0 changed the state of {flips} 4K pages with GHCB PSC"]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Any], Awaitable[list[str]]]
    # the host's writer: "user" (netd), "kernel" (kvm), or "" (no violation expected)
    writer: str
    netd_env: dict[str, str] = field(default_factory=dict)
    rmp_env: dict[str, str] = field(default_factory=dict)


SCENARIOS = [
    Scenario("buggy-dma", "a buggy guest forgot to convert its RX buffers", buggy_dma, "user"),
    Scenario(
        "flip-mid-copy",
        "a malicious guest flips its RX buffer to private mid-copy",
        flip_mid_copy,
        "user",
        # a slow copy (256-byte chunks, 100 ms apart) so the flip lands inside it, even on a
        # loaded machine
        netd_env={"SNPEMU_NETD_COPY_CHUNK": "256", "SNPEMU_NETD_COPY_DELAY_MS": "100"},
    ),
    Scenario(
        "kernel-write",
        "kvm writes a guest-request response page the guest flipped to private",
        kernel_write,
        "kernel",
    ),
    Scenario(
        "vmsa-write",
        "netd writes a page the guest made a VMSA while its vCPUs run",
        vmsa_write,
        "user",
    ),
    Scenario(
        "rmpadjust-race",
        "RMPADJUST in a loop on the page the host converts",
        rmpadjust_race,
        "user",
        rmp_env={"SNPEMU_RMP_INSN_HOLD_US": "300"},
    ),
    Scenario("psc-storm", "a PSC storm from one guest while others talk", psc_storm, ""),
]
POLICIES = ["sigbus", "convert", "convert-kill", "gmem"]
