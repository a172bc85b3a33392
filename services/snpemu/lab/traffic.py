"""Checksummed traffic among the innocent guests, and the books kept on every packet.

Every payload carries its sender, sequence number and a SHA-256 over both and its filler, so a
receiver can tell a good packet from a corrupted one. Each packet ends in exactly one column:
received intact, corrupted (received, checksum wrong, nobody told: a silent corruption), lost
with a count (the sender was told: netd was away, no buffer, refused), or silently lost (netd
said it delivered it and it never arrived). The last two kinds must be zero in every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from snp.guest.v1 import guest_pb2

MAGIC = b"SNPL"
HEAD = struct.Struct("<4sII")
FILLER = 96


def mac(i: int) -> str:
    return f"02:00:00:00:00:{i + 1:02x}"


def make_payload(src: int, seq: int) -> bytes:
    head = HEAD.pack(MAGIC, src, seq)
    filler = hashlib.sha256(head).digest() * (FILLER // 32)
    return head + filler + hashlib.sha256(head + filler).digest()


def check_payload(raw: bytes) -> tuple[int, int] | None:
    """(src, seq) of an intact payload; None when it is not what was sent."""
    if len(raw) != HEAD.size + FILLER + 32 or raw[:4] != MAGIC:
        return None
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        return None
    _, src, seq = HEAD.unpack_from(raw)
    return src, seq


@dataclass
class Sent:
    src: int
    dst: int
    seq: int
    at: float
    result: str


@dataclass
class Books:
    sent: list[Sent] = field(default_factory=list)
    received: set[tuple[int, int]] = field(default_factory=set)
    corrupted: int = 0
    duplicates: int = 0

    def failures(self) -> list[Sent]:
        return [s for s in self.sent if s.result not in ("delivered", "converted")]

    def lost_counted(self) -> int:
        return len(self.failures())

    def delivered(self) -> int:
        return sum(1 for s in self.sent if (s.src, s.seq) in self.received)

    def silently_lost(self) -> int:
        return sum(
            1
            for s in self.sent
            if s.result in ("delivered", "converted") and (s.src, s.seq) not in self.received
        )

    def innocent_guests_losing(self) -> int:
        return len({s.dst for s in self.failures()} | {s.src for s in self.failures()})

    def recovery_s(self) -> float | None:
        """From the first failed send to the first good send after the last failed one; 0 when
        nothing failed; None when traffic never came back."""
        fails = self.failures()
        if not fails:
            return 0.0
        last = max(f.at for f in fails)
        after = [s.at for s in self.sent if s.at > last and s.result == "delivered"]
        return (min(after) - min(f.at for f in fails)) if after else None


class Traffic:
    """Round robin among `innocents`: each sends one packet to the next, then all receive."""

    def __init__(self, host: Any, innocents: list[int]) -> None:
        self.host, self.innocents = host, innocents
        self.books = Books()
        self.seq = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _send(self, src: int, dst: int) -> None:
        self.seq += 1
        seq, at = self.seq, time.monotonic()
        try:
            r = await self.host.guest(src).SendPacket(
                guest_pb2.SendPacketRequest(
                    destination_mac=mac(dst), payload=make_payload(src, seq)
                ),
                timeout=30,
            )
            result = r.result
        except grpc.aio.AioRpcError as e:
            result = f"error:{e.code().name}"  # the sender knows it failed: counted
        self.books.sent.append(Sent(src, dst, seq, at, result))

    async def receive(self, i: int) -> None:
        try:
            r = await self.host.guest(i).ReceivePackets(
                guest_pb2.ReceivePacketsRequest(max_packets=256), timeout=30
            )
        except grpc.aio.AioRpcError:
            return  # nothing taken off the ring: what is there stays for the next look
        for p in r.packets:
            key = check_payload(p.payload)
            if key is None:
                self.books.corrupted += 1
            elif key in self.books.received:
                self.books.duplicates += 1
            else:
                self.books.received.add(key)

    async def _loop(self, period_s: float) -> None:
        ring = self.innocents
        while not self.stop.is_set():
            started = time.monotonic()
            await asyncio.gather(
                *(self._send(s, ring[(k + 1) % len(ring)]) for k, s in enumerate(ring))
            )
            await asyncio.gather(*(self.receive(i) for i in ring))
            await asyncio.sleep(max(0.0, period_s - (time.monotonic() - started)))

    def start(self, period_s: float = 0.05) -> None:
        self.task = asyncio.ensure_future(self._loop(period_s))

    async def finish(self) -> Books:
        self.stop.set()
        if self.task is not None:
            await self.task
        for _ in range(3):  # what is still on the rings
            await asyncio.gather(*(self.receive(i) for i in self.innocents))
        return self.books
