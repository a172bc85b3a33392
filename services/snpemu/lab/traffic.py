"""Checksummed traffic among the innocent guests, and the books kept on every packet.

Every payload carries its sender, sequence number and a SHA-256 over both and its filler, so a
receiver can tell a good packet from a corrupted one. The books keep what was sent, everything
that arrived (where, from which MAC, the bytes) and every look at a receive ring, and are audited
once at the end, so the order in which replies come back does not change the verdict.

Each packet sent ends in exactly one column, and the audit checks that they add up:
delivered (it arrived intact at the guest it was addressed to), lost with a count (it did not
arrive and the sender was told: netd was away, no buffer, refused), lost with the host (netd
said it delivered it, then the host panicked before its receiver could look at the ring again)
or silently lost (netd said it delivered it and a later complete look at the receiver's ring
did not find it, or the host never panicked). Each arrival that is not a first, intact arrival
of a packet sent to that guest is a silent corruption, by kind: corrupted (wrong length, magic
or checksum: a flipped byte, a truncated frame), unknown (well formed, but nobody sent that
sender and sequence number: a forged or renumbered packet), misdelivered (sent to another guest,
or from a MAC that is not its sender's) and duplicated (the same packet again: a replay).
Silently lost and silent corruptions must be zero in every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from snp.guest.v1 import guest_pb2

MAGIC = b"SNPL"
HEAD = struct.Struct("<4sII")
FILLER = 96
OK_RESULTS = ("delivered", "converted")  # netd's word that the frame is in the receiver's ring
MAX_PACKETS = 256  # asked for per look at a receive ring


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
    at: float  # when the send began
    result: str  # netd's answer ("delivered", "converted", "no_buffer", ...) or "error:CODE"
    done: float | None = None  # when the answer came back (None: as `at`)


@dataclass(frozen=True)
class Arrival:
    guest: int  # the guest whose ring it came off
    source_mac: str
    payload: bytes


@dataclass(frozen=True)
class Look:
    """One ReceivePackets call that succeeded."""

    guest: int
    at: float  # when it began
    complete: bool  # it returned fewer than it asked for: nothing was left waiting


@dataclass(frozen=True)
class Audit:
    sent: int
    delivered: int
    lost_counted: int
    lost_with_host: int
    silently_lost: int
    corrupted: int
    unknown: int
    misdelivered: int
    duplicated: int

    @property
    def silent_corruptions(self) -> int:
        return self.corrupted + self.unknown + self.misdelivered + self.duplicated

    def balanced(self) -> bool:
        return self.sent == (
            self.delivered + self.lost_counted + self.lost_with_host + self.silently_lost
        )


@dataclass
class Books:
    sent: list[Sent] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    looks: list[Look] = field(default_factory=list)

    def _arrived_intact(self) -> set[tuple[int, int]]:
        """(src, seq) of the packets that arrived intact where they were sent."""
        dst = {(s.src, s.seq): s.dst for s in self.sent}
        return {
            key
            for a in self.arrivals
            if (key := check_payload(a.payload)) is not None
            and dst.get(key) == a.guest
            and a.source_mac == mac(key[0])
        }

    def audit(self, host_panicked: bool = False) -> Audit:
        by_key = {(s.src, s.seq): s for s in self.sent}
        corrupted = unknown = misdelivered = duplicated = 0
        seen: set[tuple[int, int]] = set()
        for a in self.arrivals:
            key = check_payload(a.payload)
            if key is None:
                corrupted += 1
            elif key not in by_key:
                unknown += 1
            elif by_key[key].dst != a.guest or a.source_mac != mac(key[0]):
                misdelivered += 1
            elif key in seen:
                duplicated += 1
            else:
                seen.add(key)
        delivered = lost_counted = lost_with_host = silently_lost = 0
        for s in self.sent:
            if (s.src, s.seq) in seen:
                delivered += 1  # even when the sender was told it failed: it is not lost
            elif s.result not in OK_RESULTS:
                lost_counted += 1
            elif host_panicked and not self._looked_after(s):
                lost_with_host += 1
            else:
                silently_lost += 1
        return Audit(
            len(self.sent),
            delivered,
            lost_counted,
            lost_with_host,
            silently_lost,
            corrupted,
            unknown,
            misdelivered,
            duplicated,
        )

    def _looked_after(self, s: Sent) -> bool:
        """Its receiver emptied its ring after netd said the packet was in it: had the packet
        been there, that look would have taken it."""
        done = s.at if s.done is None else s.done
        return any(lk.guest == s.dst and lk.complete and lk.at >= done for lk in self.looks)

    def failures(self) -> list[Sent]:
        """Sends the sender was told failed and that never arrived."""
        got = self._arrived_intact()
        return [s for s in self.sent if s.result not in OK_RESULTS and (s.src, s.seq) not in got]

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

    def __init__(
        self, host: Any, innocents: list[int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.host, self.innocents, self.clock = host, innocents, clock
        self.books = Books()
        self.seq = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _send(self, src: int, dst: int) -> None:
        self.seq += 1
        seq, at = self.seq, self.clock()
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
        self.books.sent.append(Sent(src, dst, seq, at, result, self.clock()))

    async def receive(self, i: int) -> None:
        at = self.clock()
        try:
            r = await self.host.guest(i).ReceivePackets(
                guest_pb2.ReceivePacketsRequest(max_packets=MAX_PACKETS), timeout=30
            )
        except grpc.aio.AioRpcError:
            return  # nothing taken off the ring: what is there stays for the next look
        self.books.looks.append(Look(i, at, len(r.packets) < MAX_PACKETS))
        self.books.arrivals.extend(Arrival(i, p.source_mac, p.payload) for p in r.packets)

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
