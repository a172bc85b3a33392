"""The guest's virtio-net driver and the VMM's vhost-user side of it, against netd.

Rings and buffers live in a device window of guest RAM that the driver converts to shared
(set_memory_decrypted, as virtio's DMA API does under SNP) before it hands it to netd. The VMM
keeps the device held (the vhost-user socket); when netd dies the hold breaks and the VMM
reconnects and registers again, as QEMU's vhost-user `reconnect` does. The device is netd's
capability: RegisterDevice returns its token, which every later call on it carries. When the
host unregisters the device netd ends the hold, and the driver registers again the same way.
KERNEL: drivers/net/virtio_net.c (start_xmit, receive_buf), drivers/virtio/virtio_ring.c.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from snpemu.abi import virtio
from snpemu.abi.addr import PAGE_MASK, PAGE_SIZE, Gpa, gpa_to_gfn, page_bytes, pages
from snpemu.errors import InvalidArgument, SnpemuError, WrongState
from snpemu.guest.errors import GuestFault, GuestReason
from snpemu.guest.exits import BootState
from snpemu.guest.ports import DeviceHold, Hold, PacketResult, Queue, Ring, VmHandle

if TYPE_CHECKING:
    from snpemu.guest.kernel import GuestKernel

log = logging.getLogger(__name__)
WINDOW_GPA = 0x100_0000  # 16 MiB: above the firmware's metadata pages, below anything else used
BUFFER_SIZE = 2048  # a virtio_net_hdr and a 1514-byte frame fit


def check_mac(what: str, mac: str) -> None:
    """A unicast station address, checked before the driver touches anything; an error quotes
    no more of the input than a MAC's 17 characters."""
    if len(mac) != len("02:00:00:00:00:01"):
        raise InvalidArgument(f"{what} is not six hex octets like 02:00:00:00:00:01")
    try:
        raw = virtio.mac_bytes(mac)
    except virtio.VirtioError as e:
        raise InvalidArgument(f"{what}: {e}") from None
    if not any(raw):  # KERNEL: include/linux/etherdevice.h is_valid_ether_addr()
        raise InvalidArgument(f"{what} {mac} is the all-zero address")


@dataclass(frozen=True)
class DeviceRef:
    """A device as RegisterDevice returned it: netd's id and the capability token."""

    id: str
    token: bytes = field(repr=False)


class DeviceGone(WrongState):
    """netd no longer has the device (the host unregistered it, or netd restarted)."""

    default_reason = GuestReason.NO_DEVICE


class Netd(Protocol):
    """netd's vhost-user side as the driver needs it: every call on a device carries its
    token (guest/netd_client.py implements it)."""

    async def register_device(self, vm: VmHandle, mac: str, rx: Ring, tx: Ring) -> DeviceRef: ...
    async def hold_device(self, dev: DeviceRef) -> DeviceHold: ...
    async def notify_queue(self, dev: DeviceRef, queue: Queue) -> list[PacketResult]: ...
    async def unregister_device(self, dev: DeviceRef) -> None: ...


@dataclass
class Layout:
    entries: int

    @property
    def rx_ring(self) -> int:
        return WINDOW_GPA

    @property
    def tx_ring(self) -> int:
        return WINDOW_GPA + PAGE_SIZE

    @property
    def rx_buffers(self) -> int:
        return WINDOW_GPA + 2 * PAGE_SIZE

    @property
    def tx_buffers(self) -> int:
        return self.rx_buffers + page_bytes(pages(self.entries * BUFFER_SIZE))

    @property
    def end(self) -> int:
        return self.tx_buffers + page_bytes(pages(self.entries * BUFFER_SIZE))

    def rx_buffer(self, slot: int) -> int:
        return self.rx_buffers + slot * BUFFER_SIZE

    def tx_buffer(self, slot: int) -> int:
        return self.tx_buffers + slot * BUFFER_SIZE


@dataclass
class Received:
    source_mac: str
    payload: bytes


@dataclass
class NetStats:
    sent: dict[str, int] = field(default_factory=dict)  # by netd result, or "lost"
    received: dict[str, int] = field(default_factory=dict)  # ok, rx_error, vc, bad_frame
    reconnects: int = 0

    def add(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


class NetDevice:
    def __init__(self, kernel: GuestKernel, netd: Netd, mac: str, entries: int) -> None:
        self.k, self.netd, self.mac = kernel, netd, mac
        self.layout = Layout(entries)
        self.ring = virtio.Layout(entries)
        self.dev: DeviceRef | None = None
        self.boot_id = ""
        self.lock = asyncio.Lock()
        self.stats = NetStats()
        self.private_rx: set[int] = set()  # RX buffer pages this driver reads as private
        self.pending: list[Received] = []
        self.rx_seen = 0  # used idx the driver has consumed up to
        self.rx_avail = 0  # avail idx the driver has published
        self.tx_next = 0
        self.hold: Hold | None = None
        self.watch: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # a send found the device gone before its hold ended: the watcher registers again
        self.stale = asyncio.Event()
        # why sends are refused until the device is registered again ("" while it is there)
        self.gone = ""
        self.closed = False
        self.skip_rx_conversion = False  # attached as the buggy driver (SkipDmaConversion)

    @property
    def device_id(self) -> str:
        return self.dev.id if self.dev is not None else ""

    # --- set-up: what the virtio-net probe and QEMU's vhost-user start do ------------------

    async def attach(self, *, skip_rx_conversion: bool = False) -> None:
        k, lay = self.k, self.layout
        if not k.in_ram(WINDOW_GPA, lay.end - WINDOW_GPA):
            raise InvalidArgument("guest RAM is too small for the device window")
        self.skip_rx_conversion = skip_rx_conversion
        before = k.page_states(WINDOW_GPA, lay.end - WINDOW_GPA)
        try:
            await self._convert_window(skip_rx_conversion)
            await self._register()
        except BaseException:
            # netd refused (a MAC in use, no room), or the call was cancelled: the window as
            # it was, as a failed probe frees its DMA buffers; a guest that cannot convert is
            # terminated by then
            if k.state == BootState.RUNNING:
                await k.restore_pages(WINDOW_GPA, before)
            raise
        self.watch = asyncio.ensure_future(self._keep_connected())

    async def _convert_window(self, skip_rx_conversion: bool) -> None:
        k, lay = self.k, self.layout
        if skip_rx_conversion:  # the buggy driver: RX buffers stay private (and get accepted)
            await k.convert(lay.rx_ring, 2 * PAGE_SIZE, private=False, size_2m=False)
            await k.convert(lay.tx_buffers, lay.end - lay.tx_buffers, private=False, size_2m=False)
            rx_pages = range(lay.rx_buffers, lay.tx_buffers, PAGE_SIZE)
            await k.accept_on_touch(lay.rx_buffers, lay.tx_buffers - lay.rx_buffers)
            for gpa in rx_pages:  # shared from an earlier attach: private again, as first found
                if not k.accepted[gpa_to_gfn(gpa)]:
                    await k.convert(gpa, PAGE_SIZE, private=True, size_2m=False)
            self.private_rx = set(rx_pages)
        else:
            await k.convert(WINDOW_GPA, lay.end - WINDOW_GPA, private=False, size_2m=False)
            self.private_rx = set()

    async def _reset_rings(self) -> None:
        """Fresh rings with every RX buffer offered (virtio 3.1: the driver sets the queues up)."""
        lay, n = self.layout, self.layout.entries
        rx = bytearray(virtio.empty_ring(n, lay.rx_buffers, BUFFER_SIZE, device_writes=True))
        for i in range(n):
            virtio.U16.pack_into(rx, self.ring.avail_slot(i), i)
        virtio.U16.pack_into(rx, self.ring.avail_idx, n)
        await self.k.write(lay.rx_ring, bytes(rx), shared=True)
        tx = virtio.empty_ring(n, lay.tx_buffers, BUFFER_SIZE, device_writes=False)
        await self.k.write(lay.tx_ring, tx, shared=True)
        self.rx_seen, self.rx_avail, self.tx_next = 0, n, 0

    async def _register(self) -> None:
        lay, n = self.layout, self.layout.entries
        await self._reset_rings()
        assert self.k.vm is not None
        rx = Ring(Gpa(lay.rx_ring), Gpa(lay.rx_buffers), n, BUFFER_SIZE)
        tx = Ring(Gpa(lay.tx_ring), Gpa(lay.tx_buffers), n, BUFFER_SIZE)
        dev = await self.netd.register_device(self.k.vm, self.mac, rx, tx)
        try:
            held = await self.netd.hold_device(dev)
        except SnpemuError:
            # not held: netd would keep it (and its MAC) for nobody
            with contextlib.suppress(SnpemuError):
                await self.netd.unregister_device(dev)
            raise
        self.dev, self.hold, self.boot_id = dev, held.hold, held.daemon_boot_id
        self.gone = ""
        self.stale.clear()
        self.connected.set()
        self.k.event("net_attached", detail=f"{self.mac} device {dev.id}")

    async def _hold_ends(self) -> bool:
        """Until the device is lost; whether netd dropped it (else netd went away)."""
        assert self.hold is not None
        ended = asyncio.ensure_future(self.hold.wait())
        stale = asyncio.ensure_future(self.stale.wait())
        try:
            await asyncio.wait({ended, stale}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stale.cancel()
            if not ended.done():
                ended.cancel()
                self.hold.cancel()
        # a broken stream is netd gone; one netd ended (or a refused doorbell) is the device
        broke = ended.done() and not ended.cancelled() and ended.exception() is not None
        return not broke

    async def _keep_connected(self) -> None:
        """When netd goes away the hold breaks, and when netd drops the device it ends the
        hold: keep what was received, reconnect, register again."""
        while not self.closed:
            dropped = await self._hold_ends()
            if self.closed:
                return
            self.connected.clear()
            if dropped:
                self.gone = f"netd dropped device {self.device_id} (the host unregistered it)"
            self.k.event("net_disconnected", detail=self.gone or "netd went away")
            delay = 0.1
            while not self.closed:
                await asyncio.sleep(delay)
                try:
                    async with self.lock:
                        await self._drain()
                        await self._register()
                    self.stats.reconnects += 1
                    break
                except SnpemuError as e:
                    if self.k.state != BootState.RUNNING:  # the guest itself cannot go on
                        log.warning("cannot reattach: %s", e)
                        return
                    # netd not back yet, or it refused (the MAC taken meanwhile): again later
                    log.info("cannot reattach yet: %s", e.message[:200])
                    delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        self.closed = True
        if self.hold is not None:
            self.hold.cancel()
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watch

    # --- data path ------------------------------------------------------------------------

    async def send(self, dst: str, payload: bytes) -> str:
        """start_xmit: the frame into the next TX buffer, offer it, ring the doorbell. Returns
        what netd did with it, or "lost" when netd was not there to take it."""
        check_mac("destination_mac", dst)
        try:
            raw = virtio.frame(dst, self.mac, payload)
        except virtio.VirtioError as e:
            raise InvalidArgument(str(e)) from None
        self.k.check_running()
        async with self.lock:
            if not self.connected.is_set():
                self.stats.add(self.stats.sent, "lost")
                if self.gone:
                    raise DeviceGone(f"{self.gone}: not sent; the driver is registering it again")
                return "lost"
            assert self.dev is not None
            lay, n = self.layout, self.layout.entries
            slot = self.tx_next % n
            await self.k.write(lay.tx_buffer(slot), raw, shared=True)
            desc = virtio.Desc(lay.tx_buffer(slot), len(raw), 0, 0).encode()
            await self.k.write(lay.tx_ring + self.ring.desc(slot), desc, shared=True)
            await self.k.write(
                lay.tx_ring + self.ring.avail_slot(self.tx_next), virtio.U16.pack(slot), shared=True
            )
            self.tx_next = (self.tx_next + 1) & 0xFFFF
            await self.k.write(
                lay.tx_ring + self.ring.avail_idx, virtio.U16.pack(self.tx_next), shared=True
            )
            try:
                results = await self.netd.notify_queue(self.dev, Queue.TX)
            except DeviceGone as e:
                self.k.event("net_lost", detail=e.message[:200])
                self.stats.add(self.stats.sent, "lost")
                if e.metadata.get("daemon_boot_id", self.boot_id) != self.boot_id:
                    return "lost"  # a new netd: the broken hold brings the watcher round
                # the same netd dropped it, before its end of the hold reached the watcher:
                # tell the watcher, and the caller
                self.stale.set()
                raise DeviceGone(
                    f"netd no longer has device {self.dev.id}: not sent; the driver is "
                    "registering it again"
                ) from None
            except SnpemuError as e:
                # netd died with the packet (or forgot the device): lost, and counted
                self.k.event("net_lost", detail=str(e))
                self.stats.add(self.stats.sent, "lost")
                return "lost"
            result = results[-1].value if results else "lost"
            self.stats.add(self.stats.sent, result)
            return result

    async def _drain(self) -> None:
        """receive_buf for every used RX buffer since the last look; each is offered again."""
        lay, ring = self.layout, self.ring
        page = await self.k.read(lay.rx_ring, PAGE_SIZE, shared=True)
        used = virtio.U16.unpack_from(page, ring.used_idx)[0]
        while self.rx_seen != used:
            slot, length = virtio.USED_ELEM.unpack_from(page, ring.used_slot(self.rx_seen))
            self.rx_seen = (self.rx_seen + 1) & 0xFFFF
            if slot < lay.entries:
                await self._receive_one(slot, length)
                await self.k.write(
                    lay.rx_ring + ring.avail_slot(self.rx_avail), virtio.U16.pack(slot), shared=True
                )
                self.rx_avail = (self.rx_avail + 1) & 0xFFFF
        await self.k.write(
            lay.rx_ring + ring.avail_idx, virtio.U16.pack(self.rx_avail), shared=True
        )

    async def _receive_one(self, slot: int, length: int) -> None:
        if length < virtio.NET_HDR.size + virtio.ETH_HDR.size or length > BUFFER_SIZE:
            self.stats.add(self.stats.received, "rx_error")  # "rx error: len too short"
            return
        gpa = self.layout.rx_buffer(slot)
        private = gpa & PAGE_MASK in self.private_rx
        try:
            raw = await self.k.read(gpa, length, shared=not private)
        except GuestFault:  # #VC, logged by the kernel: the guest was told
            self.stats.add(self.stats.received, "vc")
            return
        try:
            f = virtio.parse_frame(raw)
        except virtio.VirtioError:
            self.stats.add(self.stats.received, "bad_frame")
            return
        self.stats.add(self.stats.received, "ok")
        self.pending.append(Received(virtio.mac_text(f.src), f.payload))

    async def receive(self, max_packets: int) -> list[Received]:
        self.k.check_running()
        async with self.lock:
            if self.connected.is_set():
                await self._drain()
            out, self.pending = self.pending[:max_packets], self.pending[max_packets:]
            return out

    # --- misbehaviour helpers ---------------------------------------------------------------

    async def next_rx_buffer(self) -> int:
        """The GPA of the RX buffer netd will fill next (the oldest one offered)."""
        page = await self.k.read(self.layout.rx_ring, PAGE_SIZE, shared=True)
        used = virtio.U16.unpack_from(page, self.ring.used_idx)[0]
        slot = virtio.U16.unpack_from(page, self.ring.avail_slot(used))[0]
        if slot >= self.layout.entries:
            raise WrongState("the RX ring is corrupt", reason=GuestReason.BAD_RING)
        return self.layout.rx_buffer(slot)

    async def wait_copy_start(self, gpa: int, timeout_s: float) -> bytes:
        """Poll a buffer (cleared first) until netd's copy into it has begun."""
        blank = bytes(virtio.NET_HDR.size)
        await self.k.write(gpa, blank, shared=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            head = await self.k.read(gpa, virtio.NET_HDR.size, shared=True)
            if head != blank:
                return head
            await asyncio.sleep(0.002)
        raise WrongState(
            f"no copy into {gpa:#x} began within {timeout_s:g} s (send this guest a packet)",
            reason=GuestReason.NO_COPY,
        )
