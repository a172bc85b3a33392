"""netd's model: guest devices, their virtqueues, and the copy between guests (no gRPC here).

A host-wide userspace daemon, as a vhost-user net backend: every access to guest memory is a
host user-mode read or write of the frame behind a GPA (the VMM's memory table), checked by the
RMP. A write that hits a guest-private page goes through the host's violation policy: the
daemon may be told to die of SIGBUS, have the write refused, or find the page converted.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import hmac
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from snpemu.abi import virtio
from snpemu.abi.addr import PAGE_SIZE
from snpemu.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, WrongState
from snpemu.netd import limits
from snpemu.netd.reasons import NetdReason

log = logging.getLogger(__name__)
# virtio-net devices a VM may have at once (QEMU has no fixed limit; a guest agent uses one) and
# devices netd keeps in all
DEVICES_PER_VM = 8
DEVICES_MAX = 1024


class WriteOutcome(enum.Enum):
    """What the host MMU did with one user-mode write (rmp's ViolationOutcome)."""

    NONE = "none"  # the page was not assigned: an ordinary write
    CONVERTED = "converted"  # the host made the page shared, then wrote
    REFUSED = "refused"  # gmem: the page is not mappable; nothing written
    SIGBUS = "sigbus"  # the writer must die


class Result(enum.IntEnum):
    """Values match snp.netd.v1.PacketResult."""

    DELIVERED = 1
    CONVERTED = 2
    NO_ROUTE = 3
    NO_BUFFER = 4
    REFUSED = 5
    BAD_FRAME = 6

    @property
    def label(self) -> str:
        return self.name.lower()


class Memory(Protocol):
    """Host user-mode access to system physical memory."""

    async def read(self, spa: int, length: int) -> bytes: ...

    async def write(self, spa: int, data: bytes) -> WriteOutcome: ...


@dataclass(frozen=True)
class VmRef:
    """A VM handle as the caller sent it: kvm's id and, from a VMM, the VM's token."""

    id: str
    token: bytes = b""


class Vmm(Protocol):
    async def memory_map(
        self, vm: VmRef, populate: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        """(gpa, spa, size) regions of the VM's backed memory, the (gpa, size) ranges of
        `populate` backed first (kvm backs guest memory when it is first touched). The handle
        goes to kvm unchanged, so kvm checks the token: a wrong one raises PermissionDenied, an
        unknown VM NotFound."""
        ...


class Sigbus(Exception):
    """The host delivered SIGBUS: the daemon must die now (the caller raises the signal)."""


@dataclass(frozen=True)
class Ring:
    ring_gpa: int
    buffers_gpa: int
    entries: int
    buffer_size: int

    def check(self, name: str) -> None:
        try:
            virtio.check_queue_size(self.entries)
        except virtio.VirtioError as e:
            raise InvalidArgument(f"{name}: {e}") from None
        if self.ring_gpa % PAGE_SIZE:
            raise InvalidArgument(f"{name}: ring_gpa {self.ring_gpa:#x} is not page aligned")
        if not 64 <= self.buffer_size <= PAGE_SIZE:
            raise InvalidArgument(f"{name}: buffer_size must be 64..4096")

    def areas(self, name: str) -> list[tuple[str, int, int]]:
        """(what, first byte, end) of the ring page and of the buffer array."""
        return [
            (f"{name} ring", self.ring_gpa, self.ring_gpa + PAGE_SIZE),
            (
                f"{name} buffers",
                self.buffers_gpa,
                self.buffers_gpa + self.entries * self.buffer_size,
            ),
        ]


def check_apart(rx: Ring, tx: Ring) -> None:
    """No two areas of a device share a byte: netd writes RX buffers and both used rings, so an
    overlap would have it write a packet over a ring, or a ring over a packet the guest sends.
    Stricter than vhost, which checks each area against the memory table only.
    KERNEL: drivers/vhost/vhost.c vhost_vq_access_ok()"""
    areas = rx.areas("rx") + tx.areas("tx")
    for i, (a, a0, a1) in enumerate(areas):
        for b, b0, b1 in areas[i + 1 :]:
            if a0 < b1 and b0 < a1:
                raise InvalidArgument(
                    f"{a} {a0:#x}..{a1:#x} overlaps {b} {b0:#x}..{b1:#x}",
                    reason=NetdReason.RINGS_OVERLAP,
                )


def pieces(gpa: int, length: int, most: int = PAGE_SIZE) -> Iterator[tuple[int, int]]:
    """(gpa, bytes) of [gpa, gpa+length) cut at page ends and into pieces of at most `most`:
    the frames of two pages need not be neighbours (kvm backs guest memory as it is first
    touched), so each piece is translated on its own."""
    pos = gpa
    while pos < gpa + length:
        n = min(PAGE_SIZE - pos % PAGE_SIZE, most, gpa + length - pos)
        yield pos, n
        pos += n


class MemoryMap:
    def __init__(self, regions: list[tuple[int, int, int]]) -> None:
        # kvm backs guest memory a piece at a time as it is used: pieces that follow each other
        # in guest and host memory are one region here, so a buffer may span them
        merged: list[tuple[int, int, int]] = []
        for gpa, spa, size in sorted(regions):
            if (
                merged
                and merged[-1][0] + merged[-1][2] == gpa
                and merged[-1][1] + merged[-1][2] == spa
            ):
                merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + size)
            else:
                merged.append((gpa, spa, size))
        self.regions = merged
        self._starts = [r[0] for r in self.regions]

    def check(self, gpa: int, length: int) -> None:
        """Every page of [gpa, gpa+length) lies in the map."""
        for at, n in pieces(gpa, length):
            self.spa(at, n)

    def spa(self, gpa: int, length: int) -> int:
        """The SPA of gpa, when [gpa, gpa+length) lies in one region (else the guest lied)."""
        j = bisect.bisect_right(self._starts, gpa) - 1
        if j >= 0:
            start, spa, size = self.regions[j]
            if gpa + length <= start + size:
                return spa + gpa - start
        raise virtio.VirtioError(f"GPA range {gpa:#x}+{length} is outside the guest's memory")


@dataclass
class Counters:
    rx_packets: int = 0
    tx_packets: int = 0
    dropped: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    violations: int = 0


@dataclass
class Device:
    device_id: str
    vm_id: str
    mac: bytes
    rx: Ring
    tx: Ring
    memory: MemoryMap
    counters: Counters = field(default_factory=Counters)
    # device-side ring positions (virtio 2.7.13: last_avail_idx, and our used idx)
    rx_avail: int = 0
    rx_used: int = 0
    tx_avail: int = 0
    tx_used: int = 0
    # one lock per queue: a TX doorbell holds its own TX queue while it fills other devices'
    # RX queues, so taking TX locks before RX locks (never the other way) cannot deadlock
    tx_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rx_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the capability RegisterDevice returned; never shown again
    token: bytes = field(default_factory=lambda: secrets.token_bytes(limits.DEVICE_TOKEN_BYTES))
    # set when the device is unregistered: its holds end, so its VMM knows to register again
    gone: asyncio.Event = field(default_factory=asyncio.Event)


class NetDaemon:
    def __init__(
        self,
        memory: Memory,
        vmm: Vmm,
        *,
        copy_chunk: int = PAGE_SIZE,
        copy_delay_s: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.memory, self.vmm = memory, vmm
        self.copy_chunk, self.copy_delay_s = copy_chunk, copy_delay_s
        # the pause between the chunks of one copy (a test holds a copy mid-way with its own)
        self.sleep = sleep
        self.devices: dict[str, Device] = {}
        self.by_mac: dict[bytes, Device] = {}
        self.results: dict[Result, int] = dict.fromkeys(Result, 0)
        self.boot_id = uuid.uuid4().hex

    # --- registration ---------------------------------------------------------------------

    async def register(self, vm: VmRef, mac: str, rx: Ring, tx: Ring, *, host: bool) -> Device:
        """A device on the caller's VM. A VMM (host False) proves the VM is its own with the
        VM's token, which kvm checks; everything is checked before anything is kept."""
        limits.check_id("vm id", vm.id)
        limits.check_vm_token(vm.token)
        raw_mac = limits.mac_bytes(mac)
        rx.check("rx")
        tx.check("tx")
        check_apart(rx, tx)
        if not host and not vm.token:
            raise PermissionDenied(
                "a VMM registers a device on its own VM: send the VM handle CreateVm returned, "
                "with its token",
                reason=NetdReason.VM_TOKEN_MISSING,
            )
        # kvm first: a caller that may not use the VM learns nothing of the MACs in use or the
        # VM's devices
        # what netd will touch, backed now: the first touch of a vhost-user backend faults the
        # VMM's memory in, and netd reaches guest memory only through this map
        areas = [(lo, hi - lo) for _, lo, hi in rx.areas("rx") + tx.areas("tx")]
        memory = MemoryMap(await self.vmm.memory_map(vm, areas))
        for name, ring in (("rx", rx), ("tx", tx)):
            try:
                memory.check(ring.ring_gpa, PAGE_SIZE)
                memory.check(ring.buffers_gpa, ring.entries * ring.buffer_size)
            except virtio.VirtioError as e:
                raise InvalidArgument(f"{name}: {e}") from None
        if raw_mac in self.by_mac:
            raise AlreadyExists(f"MAC {mac} is already registered", reason=NetdReason.MAC_IN_USE)
        self._check_room(vm.id)
        dev = Device(uuid.uuid4().hex[:16], vm.id, raw_mac, rx, tx, memory)
        self.devices[dev.device_id] = dev
        self.by_mac[raw_mac] = dev
        log.info("registered %s for %s", mac, vm.id, extra={"event": "device_registered"})
        return dev

    def _check_room(self, vm_id: str) -> None:
        """A bound on what callers can make netd keep: devices per VM and in all. A device
        outlives its VM when its VMM never held it, so the bound is what stops that leak."""
        mine = sum(1 for d in self.devices.values() if d.vm_id == vm_id)
        if mine >= DEVICES_PER_VM or len(self.devices) >= DEVICES_MAX:
            raise WrongState(
                f"VM {vm_id} has {mine} devices and netd {len(self.devices)}: at most "
                f"{DEVICES_PER_VM} a VM and {DEVICES_MAX} in all (unregister one first)",
                reason=NetdReason.TOO_MANY_DEVICES,
            )

    def device(self, device_id: str) -> Device:
        limits.check_id("device id", device_id)
        dev = self.devices.get(device_id)
        if dev is None:
            raise NotFound(
                f"no device {limits.quote(device_id)} (netd restarted, or it was unregistered?)",
                reason=NetdReason.UNKNOWN_DEVICE,
                # a VMM tells "netd restarted" (a new boot id) from "my device was dropped"
                metadata={"daemon_boot_id": self.boot_id},
            )
        return dev

    def claim(self, device_id: str, token: bytes, *, host: bool) -> Device:
        """The device, when the caller holds its capability: a VMM must send the device's token;
        the host may omit it, but a token that is sent must be the device's (as kvm treats a
        VM's token)."""
        limits.check_device_token(token)
        dev = self.device(device_id)
        if token:
            if not hmac.compare_digest(token, dev.token):
                raise PermissionDenied(
                    f"wrong token for device {device_id}", reason=NetdReason.DEVICE_TOKEN_WRONG
                )
        elif not host:
            raise PermissionDenied(
                f"device {device_id}: a VMM sends the token RegisterDevice returned",
                reason=NetdReason.DEVICE_TOKEN_MISSING,
            )
        return dev

    def unregister(self, device_id: str) -> None:
        dev = self.device(device_id)
        del self.devices[device_id]
        self.by_mac.pop(dev.mac, None)
        dev.gone.set()
        log.info("unregistered %s", virtio.mac_text(dev.mac), extra={"event": "device_gone"})

    # --- guest memory, as the daemon touches it -------------------------------------------

    async def _read(self, dev: Device, gpa: int, length: int) -> bytes:
        """Page by page, as frames of neighbouring pages need not be neighbours."""
        out = b""
        for at, n in pieces(gpa, length):
            out += await self.memory.read(dev.memory.spa(at, n), n)
        return out

    async def _write(self, dev: Device, gpa: int, data: bytes) -> WriteOutcome:
        """A copy into guest memory, page by page and chunk by chunk as memcpy goes; the worst
        outcome wins. SIGBUS ends the copy at once (the process dies mid-copy)."""
        worst = WriteOutcome.NONE
        for at, n in pieces(gpa, len(data), self.copy_chunk):
            pos = at - gpa
            if pos and self.copy_delay_s:
                await self.sleep(self.copy_delay_s)
            outcome = await self.memory.write(dev.memory.spa(at, n), data[pos : pos + n])
            if outcome != WriteOutcome.NONE:
                dev.counters.violations += 1
            if outcome == WriteOutcome.SIGBUS:
                raise Sigbus(f"SIGBUS writing {dev.vm_id} GPA {at:#x}")
            if outcome == WriteOutcome.REFUSED:
                return outcome
            if outcome == WriteOutcome.CONVERTED:
                worst = outcome
        return worst

    async def _u16(self, dev: Device, gpa: int, value: int) -> WriteOutcome:
        return await self._write(dev, gpa, virtio.U16.pack(value & 0xFFFF))

    # --- the data path ----------------------------------------------------------------------

    async def notify_tx(self, device_id: str) -> list[Result]:
        """The TX doorbell: every descriptor the driver made available since the last one."""
        dev = self.device(device_id)
        results: list[Result] = []
        async with dev.tx_lock:
            layout = virtio.Layout(dev.tx.entries)
            ring = await self._read(dev, dev.tx.ring_gpa, PAGE_SIZE)
            avail = virtio.U16.unpack_from(ring, layout.avail_idx)[0]
            if (avail - dev.tx_avail) & 0xFFFF > dev.tx.entries:
                # vhost's "Guest moved avail index from %u to %u": a broken driver, ignored
                raise InvalidArgument(
                    f"avail idx moved from {dev.tx_avail} to {avail}, more than the "
                    f"{dev.tx.entries} entries of the queue",
                    reason=NetdReason.BROKEN_RING,
                )
            while dev.tx_avail != avail:
                slot = virtio.U16.unpack_from(ring, layout.avail_slot(dev.tx_avail))[0]
                if slot >= dev.tx.entries:
                    result = Result.BAD_FRAME
                else:
                    desc = virtio.Desc.decode(
                        ring[layout.desc(slot) : layout.desc(slot) + virtio.DESC.size]
                    )
                    result = await self._send(dev, desc)
                results.append(self._count(result))
                # return the buffer: used element, then used idx (2.7.8.2: the idx last). len is
                # the bytes the device wrote into the buffer (2.7.8), none for a device-readable
                # TX buffer (as vhost-net's vhost_add_used(vq, head, 0))
                elem = virtio.USED_ELEM.pack(slot, 0)
                await self._write(dev, dev.tx.ring_gpa + layout.used_slot(dev.tx_used), elem)
                dev.tx_used = (dev.tx_used + 1) & 0xFFFF
                dev.tx_avail = (dev.tx_avail + 1) & 0xFFFF
                await self._u16(dev, dev.tx.ring_gpa + layout.used_idx, dev.tx_used)
        return results

    def _count(self, result: Result) -> Result:
        self.results[result] += 1
        return result

    async def _send(self, src: Device, desc: virtio.Desc) -> Result:
        # one descriptor holds one whole frame: a chain, or an indirect table (a feature netd
        # does not offer), is not read as frame bytes
        not_one_frame = virtio.VRING_DESC_F_NEXT | virtio.VRING_DESC_F_INDIRECT
        if desc.length > virtio.NET_HDR.size + virtio.ETH_MAX or desc.flags & not_one_frame:
            src.counters.dropped += 1
            return Result.BAD_FRAME
        try:
            raw = await self._read(src, desc.addr, desc.length)
            frame = virtio.parse_frame(raw)
        except virtio.VirtioError as e:
            log.warning("bad TX frame from %s: %s", src.vm_id, e, extra={"event": "bad_frame"})
            src.counters.dropped += 1
            return Result.BAD_FRAME
        if frame.src != src.mac:
            src.counters.dropped += 1  # spoofed source: a bridge with port security drops it
            return Result.BAD_FRAME
        src.counters.tx_packets += 1
        src.counters.tx_bytes += len(frame.payload)
        dst = self.by_mac.get(frame.dst)
        if dst is None:
            return Result.NO_ROUTE
        return await self._deliver(dst, raw)

    async def _deliver(self, dst: Device, raw: bytes) -> Result:
        """Into the destination's next offered RX buffer, then its used ring."""
        async with dst.rx_lock:
            layout = virtio.Layout(dst.rx.entries)
            ring = await self._read(dst, dst.rx.ring_gpa, PAGE_SIZE)
            avail = virtio.U16.unpack_from(ring, layout.avail_idx)[0]
            if dst.rx_avail == avail:
                dst.counters.dropped += 1
                return Result.NO_BUFFER
            if (avail - dst.rx_avail) & 0xFFFF > dst.rx.entries:
                dst.counters.dropped += 1
                return Result.BAD_FRAME
            slot = virtio.U16.unpack_from(ring, layout.avail_slot(dst.rx_avail))[0]
            dst.rx_avail = (dst.rx_avail + 1) & 0xFFFF
            if slot >= dst.rx.entries:
                dst.counters.dropped += 1
                return Result.BAD_FRAME
            desc = virtio.Desc.decode(
                ring[layout.desc(slot) : layout.desc(slot) + virtio.DESC.size]
            )
            if not desc.flags & virtio.VRING_DESC_F_WRITE or desc.length < len(raw):
                dst.counters.dropped += 1
                return Result.BAD_FRAME
            try:
                outcome = await self._write(dst, desc.addr, raw)
            except virtio.VirtioError:
                dst.counters.dropped += 1
                return Result.BAD_FRAME
            # every buffer goes back through the used ring; a refused one with length 0, which
            # the driver counts as an RX error (virtnet receive_buf: "rx error: len too short")
            done = 0 if outcome == WriteOutcome.REFUSED else len(raw)
            elem = virtio.USED_ELEM.pack(slot, done)
            await self._write(dst, dst.rx.ring_gpa + layout.used_slot(dst.rx_used), elem)
            dst.rx_used = (dst.rx_used + 1) & 0xFFFF
            await self._u16(dst, dst.rx.ring_gpa + layout.used_idx, dst.rx_used)
            if outcome == WriteOutcome.REFUSED:
                dst.counters.dropped += 1
                return Result.REFUSED
            dst.counters.rx_packets += 1
            dst.counters.rx_bytes += len(raw) - virtio.NET_HDR.size - virtio.ETH_HDR.size
            return Result.CONVERTED if outcome == WriteOutcome.CONVERTED else Result.DELIVERED
