"""netd's daemon model against a fake host memory: the virtio rings byte for byte, the copy and
what each violation outcome does to it, and hostile rings (no gRPC here)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import virtio
from snpemu.errors import AlreadyExists, InvalidArgument, NotFound
from snpemu.netd.daemon import NetDaemon, Result, Ring, Sigbus, VmRef, WriteOutcome

from tests.conftest import examples

PAGE = 4096
A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


class FakeMemory:
    """Guest memory as a flat byte array (SPA == GPA + base); some pages guest-private."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.mem = bytearray(size)
        self.private: set[int] = set()
        self.outcome = WriteOutcome.REFUSED  # what a write to a private page gets
        self.writes: list[tuple[int, int]] = []

    async def read(self, spa: int, length: int) -> bytes:
        return bytes(self.mem[spa : spa + length])

    async def write(self, spa: int, data: bytes) -> WriteOutcome:
        assert spa // PAGE == (spa + len(data) - 1) // PAGE, "one page per host write"
        self.writes.append((spa, len(data)))
        if spa // PAGE in self.private:
            if self.outcome == WriteOutcome.CONVERTED:
                self.private.discard(spa // PAGE)
                self.mem[spa : spa + len(data)] = data
            return self.outcome
        self.mem[spa : spa + len(data)] = data
        return WriteOutcome.NONE


class FakeVmm:
    async def memory_map(
        self, vm: VmRef, populate: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        if vm.id not in ("vm-a", "vm-b"):
            raise NotFound(f"no VM {vm.id}")
        base = 0 if vm.id == "vm-a" else 1 << 19
        return [(0, base, 1 << 19)]


def rings(n: int = 4) -> tuple[Ring, Ring]:
    return Ring(0x0, 0x2000, n, 2048), Ring(0x1000, 0x2000 + n * 2048, n, 2048)


class Guest:
    """A driver writing its own rings straight into the fake memory."""

    def __init__(self, mem: FakeMemory, base: int, n: int = 4) -> None:
        self.mem, self.base, self.n = mem, base, n
        self.rx, self.tx = rings(n)
        self.lay = virtio.Layout(n)
        self.tx_next = 0
        rx = bytearray(virtio.empty_ring(n, self.rx.buffers_gpa, 2048, device_writes=True))
        for i in range(n):
            struct.pack_into("<H", rx, self.lay.avail_slot(i), i)
        struct.pack_into("<H", rx, self.lay.avail_idx, n)
        self.put(self.rx.ring_gpa, bytes(rx))
        self.put(self.tx.ring_gpa, virtio.empty_ring(n, self.tx.buffers_gpa, 2048, False))

    def put(self, gpa: int, data: bytes) -> None:
        self.mem.mem[self.base + gpa : self.base + gpa + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem.mem[self.base + gpa : self.base + gpa + n])

    def offer_tx(self, raw: bytes, *, slot: int | None = None, length: int | None = None) -> None:
        s = self.tx_next % self.n if slot is None else slot
        if s < self.n:
            self.put(self.tx.buffers_gpa + s * 2048, raw)
            desc = virtio.Desc(self.tx.buffers_gpa + s * 2048, length or len(raw), 0, 0)
            self.put(self.tx.ring_gpa + self.lay.desc(s), desc.encode())
        self.put(self.tx.ring_gpa + self.lay.avail_slot(self.tx_next), struct.pack("<H", s))
        self.tx_next += 1
        self.put(self.tx.ring_gpa + self.lay.avail_idx, struct.pack("<H", self.tx_next))

    def used(self, ring: Ring) -> tuple[int, list[tuple[int, int]]]:
        page = self.get(ring.ring_gpa, PAGE)
        idx = struct.unpack_from("<H", page, self.lay.used_idx)[0]
        return idx, [struct.unpack_from("<II", page, self.lay.used_slot(i)) for i in range(idx)]


async def pair(mem: FakeMemory, **kw: object) -> tuple[NetDaemon, Guest, Guest, str, str]:
    d = NetDaemon(mem, FakeVmm(), **kw)  # type: ignore[arg-type]
    a, b = Guest(mem, 0), Guest(mem, 1 << 19)
    da = await d.register(VmRef("vm-a"), A, *rings(), host=True)
    db = await d.register(VmRef("vm-b"), B, *rings(), host=True)
    return d, a, b, da.device_id, db.device_id


def test_layout_matches_the_virtio_alignment_rules() -> None:
    lay = virtio.Layout(128)
    assert (lay.avail, lay.used, lay.end) == (2048, 2312, 3342)  # desc 16*N, avail 6+2N, used /4
    assert lay.end <= PAGE
    assert virtio.Layout(1).used % 4 == 0
    for bad in (0, 3, 256):
        with pytest.raises(virtio.VirtioError):
            virtio.Layout(bad)
    assert virtio.NET_HDR.size == 12 and virtio.DESC.size == 16
    assert virtio.net_header() == bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])


async def test_a_packet_lands_in_the_next_rx_buffer_and_both_used_rings() -> None:
    mem = FakeMemory()
    d, a, b, da, _ = await pair(mem)
    raw = virtio.frame(B, A, b"payload")
    a.offer_tx(raw)
    assert await d.notify_tx(da) == [Result.DELIVERED]
    assert b.used(b.rx) == (1, [(0, len(raw))])
    assert b.get(b.rx.buffers_gpa, len(raw)) == raw
    assert a.used(a.tx) == (1, [(0, 0)])  # TX: nothing written into the buffer
    assert await d.notify_tx(da) == []  # nothing new offered
    assert d.results[Result.DELIVERED] == 1


@pytest.mark.parametrize(
    ("outcome", "result", "used_len"),
    [
        (WriteOutcome.REFUSED, Result.REFUSED, 0),
        (WriteOutcome.CONVERTED, Result.CONVERTED, None),
    ],
)
async def test_a_private_rx_buffer(
    outcome: WriteOutcome, result: Result, used_len: int | None
) -> None:
    mem = FakeMemory()
    d, a, b, da, db = await pair(mem)
    mem.private.add(((1 << 19) + b.rx.buffers_gpa) // PAGE)
    mem.outcome = outcome
    raw = virtio.frame(B, A, b"x" * 100)
    a.offer_tx(raw)
    assert await d.notify_tx(da) == [result]
    # the buffer always comes back; refused ones empty, so the driver sees an RX error
    assert b.used(b.rx) == (1, [(0, len(raw) if used_len is None else used_len)])
    assert d.devices[db].counters.violations == 1
    assert d.devices[db].counters.dropped == (1 if outcome == WriteOutcome.REFUSED else 0)


async def test_sigbus_ends_the_copy_at_once() -> None:
    mem = FakeMemory()
    d, a, b, da, _ = await pair(mem, copy_chunk=256)
    mem.private.add(((1 << 19) + b.rx.buffers_gpa) // PAGE)
    mem.outcome = WriteOutcome.SIGBUS
    a.offer_tx(virtio.frame(B, A, b"y" * 1000))
    with pytest.raises(Sigbus):
        await d.notify_tx(da)
    assert b.used(b.rx) == (0, [])


async def test_copies_go_in_chunks_within_pages() -> None:
    mem = FakeMemory()
    d, a, b, da, _ = await pair(mem, copy_chunk=256)
    raw = virtio.frame(B, A, b"z" * 1400)
    a.offer_tx(raw)
    mem.writes.clear()
    await d.notify_tx(da)
    data_writes = [n for spa, n in mem.writes if spa >= (1 << 19) + b.rx.buffers_gpa]
    assert data_writes == [256] * (len(raw) // 256) + [len(raw) % 256]


async def test_hostile_rings_are_dropped_with_a_count() -> None:
    mem = FakeMemory()
    d, a, b, da, _ = await pair(mem)
    good = virtio.frame(B, A, b"ok")
    a.offer_tx(good, slot=9)  # slot beyond the ring
    a.offer_tx(virtio.frame(B, "02:00:00:00:00:0c", b"spoofed"))  # not its own MAC
    a.offer_tx(good, length=5000)  # longer than any frame
    a.offer_tx(b"\xff" * 40)  # not a virtio-net header
    assert await d.notify_tx(da) == [Result.BAD_FRAME] * 4
    a.offer_tx(virtio.frame("02:00:00:00:00:0d", A, b"nobody"))
    # a descriptor that points outside the guest's memory
    a.put(a.tx.ring_gpa + a.lay.desc(1), virtio.Desc(1 << 30, 60, 0, 0).encode())
    a.put(a.tx.ring_gpa + a.lay.avail_slot(a.tx_next), struct.pack("<H", 1))
    a.tx_next += 1
    a.put(a.tx.ring_gpa + a.lay.avail_idx, struct.pack("<H", a.tx_next))
    assert await d.notify_tx(da) == [Result.NO_ROUTE, Result.BAD_FRAME]
    assert b.used(b.rx) == (0, [])
    a.offer_tx(good)
    assert await d.notify_tx(da) == [Result.DELIVERED]  # the queue still works


async def test_no_buffer_and_registration_rules() -> None:
    mem = FakeMemory()
    d, a, _b, da, db = await pair(mem)
    for _ in range(4):
        a.offer_tx(virtio.frame(B, A, b"p"))
    assert await d.notify_tx(da) == [Result.DELIVERED] * 4
    a.offer_tx(virtio.frame(B, A, b"p"))  # B has not offered its buffers again
    assert await d.notify_tx(da) == [Result.NO_BUFFER]
    with pytest.raises(AlreadyExists):
        await d.register(VmRef("vm-a"), A, *rings(), host=True)
    with pytest.raises(InvalidArgument):
        await d.register(
            VmRef("vm-a"), "02:00:00:00:00:0c", Ring(0x10, 0x2000, 4, 2048), rings()[1], host=True
        )
    with pytest.raises(InvalidArgument):
        await d.register(
            VmRef("vm-a"), "02:00:00:00:00:0c", Ring(0, 1 << 30, 4, 2048), rings()[1], host=True
        )
    with pytest.raises(NotFound):
        await d.register(VmRef("vm-x"), "02:00:00:00:00:0c", *rings(), host=True)
    assert set(d.devices) == {da, db}
    d.unregister(db)
    a.offer_tx(virtio.frame(B, A, b"gone"))
    assert await d.notify_tx(da) == [Result.NO_ROUTE]
    with pytest.raises(NotFound):
        await d.notify_tx(db)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000))
def test_parse_frame_never_crashes(raw: bytes) -> None:
    try:
        f = virtio.parse_frame(raw)
    except virtio.VirtioError:
        return
    assert len(f.dst) == 6 and len(f.src) == 6


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=256), st.integers(0, 0xFFFF))
async def test_a_garbage_tx_ring_never_crashes_the_daemon(area: bytes, avail: int) -> None:
    """Descriptors and the driver area full of garbage (the idx kept small enough to run)."""

    mem = FakeMemory()
    d, a, _b, da, _ = await pair(mem)
    page = bytearray(PAGE)
    page[: len(area)] = area
    struct.pack_into("<H", page, a.lay.avail_idx, avail % 64)
    a.put(a.tx.ring_gpa, bytes(page))
    if avail % 64 > 4:
        with pytest.raises(InvalidArgument):  # more offered than the queue holds
            await d.notify_tx(da)
        assert d.devices[da].tx_avail == 0
        return
    results = await d.notify_tx(da)
    assert all(isinstance(r, Result) for r in results)
    assert len(results) == struct.unpack_from("<H", page, a.lay.avail_idx)[0]


def test_starts_are_counted_in_the_data_dir(tmp_path: Path) -> None:
    from snpemu.netd import count_start

    assert [count_start(tmp_path / "netd") for _ in range(3)] == [0, 1, 2]
    (tmp_path / "file").write_text("")
    assert count_start(tmp_path / "file" / "netd") == 0  # cannot be written: logged, not fatal
