"""The split virtqueue and the virtio-net header, as netd and a guest driver lay them out.

virtio 1.2 (OASIS), 2.7 "Split Virtqueues"; KERNEL: include/uapi/linux/virtio_ring.h,
include/uapi/linux/virtio_net.h. All fields little-endian (virtio 1.x).

    struct vring_desc      (16 B): le64 addr; le32 len; le16 flags; le16 next      (2.7.5)
    struct vring_avail:            le16 flags; le16 idx; le16 ring[N]; le16 used_event (2.7.6)
    struct vring_used_elem  (8 B): le32 id; le32 len                                (2.7.8)
    struct vring_used:             le16 flags; le16 idx; vring_used_elem ring[N]; le16 avail_event
    struct virtio_net_hdr_v1 (12 B): u8 flags; u8 gso_type; le16 hdr_len, gso_size, csum_start,
                                     csum_offset, num_buffers                        (5.1.6)

One queue's three areas sit in one guest page: the descriptor table at offset 0 (16-byte
aligned), the driver area right after it (2-byte aligned), the device area after that, rounded
up to 4 (2.7 "Alignment" table). Queue sizes are powers of two (2.7: "Queue Size ... is always a
power of 2" for split queues) small enough for that page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snpemu.abi.addr import PAGE_SIZE

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
NET_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1 (VIRTIO_F_VERSION_1: num_buffers present)
ETH_HDR = struct.Struct("!6s6sH")  # destination, source, EtherType (IEEE 802.3)
ETHERTYPE_LOCAL = 0x88B5  # IEEE 802 "Local Experimental EtherType 1"
ETH_MIN, ETH_MAX = ETH_HDR.size, 1514  # no FCS: virtio-net frames carry none

VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT = 1, 2, 4
VIRTIO_NET_HDR_GSO_NONE = 0
MAX_QUEUE = 128  # the largest power of two whose three areas fit one page


class VirtioError(ValueError):
    """A ring or frame that breaks the layout rules (a buggy or hostile driver)."""


def check_queue_size(n: int) -> None:
    if not 1 <= n <= MAX_QUEUE or n & (n - 1):
        raise VirtioError(f"queue size {n} is not a power of two in 1..{MAX_QUEUE}")


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one split queue's areas inside its ring page."""

    size: int

    def __post_init__(self) -> None:
        check_queue_size(self.size)

    @property
    def avail(self) -> int:
        return DESC.size * self.size

    @property
    def avail_idx(self) -> int:
        return self.avail + 2

    def avail_slot(self, i: int) -> int:
        return self.avail + 4 + 2 * (i % self.size)

    @property
    def used(self) -> int:
        end = self.avail + 4 + 2 * self.size + 2
        return (end + 3) & ~3

    @property
    def used_idx(self) -> int:
        return self.used + 2

    def used_slot(self, i: int) -> int:
        return self.used + 4 + USED_ELEM.size * (i % self.size)

    @property
    def end(self) -> int:
        return self.used + 4 + USED_ELEM.size * self.size + 2

    def desc(self, i: int) -> int:
        return DESC.size * i


@dataclass(frozen=True)
class Desc:
    addr: int
    length: int
    flags: int
    next: int

    def encode(self) -> bytes:
        return DESC.pack(self.addr, self.length, self.flags, self.next)

    @classmethod
    def decode(cls, raw: bytes) -> Desc:
        if len(raw) != DESC.size:
            raise VirtioError(f"a descriptor is {DESC.size} bytes, not {len(raw)}")
        return cls(*DESC.unpack(raw))


def empty_ring(size: int, buffers_gpa: int, buffer_size: int, device_writes: bool) -> bytes:
    """A ring page as a driver sets it up: descriptor i points at buffer i, no buffer offered."""
    layout = Layout(size)
    page = bytearray(PAGE_SIZE)
    flags = VRING_DESC_F_WRITE if device_writes else 0
    for i in range(size):
        page[layout.desc(i) : layout.desc(i) + DESC.size] = Desc(
            buffers_gpa + i * buffer_size, buffer_size, flags, 0
        ).encode()
    return bytes(page)


def net_header() -> bytes:
    """No checksum offload, no GSO, one buffer (what a device writes for a plain frame)."""
    return NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise VirtioError(f"MAC {mac[:24]!r} is not six hex octets like 02:00:00:00:00:01")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise VirtioError(f"MAC {mac[:24]!r} is not six hex octets") from None
    if raw[0] & 1:
        raise VirtioError(f"MAC {mac} is a multicast address")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def frame(dst: str, src: str, payload: bytes) -> bytes:
    """virtio_net_hdr_v1 followed by an Ethernet frame: what a TX buffer (or RX buffer) holds."""
    out = net_header() + ETH_HDR.pack(mac_bytes(dst), mac_bytes(src), ETHERTYPE_LOCAL) + payload
    if len(out) - NET_HDR.size > ETH_MAX:
        raise VirtioError(f"payload of {len(payload)} bytes exceeds the {ETH_MAX}-byte frame")
    return out


@dataclass(frozen=True)
class Frame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes


def parse_frame(raw: bytes) -> Frame:
    """A buffer's content: header checked, Ethernet frame split. Raises VirtioError."""
    if len(raw) < NET_HDR.size + ETH_MIN:
        raise VirtioError(f"{len(raw)} bytes is shorter than a header and an Ethernet header")
    flags, gso, _hdr_len, _gso_size, _cs, _co, _nbuf = NET_HDR.unpack_from(raw)
    if gso != VIRTIO_NET_HDR_GSO_NONE or flags & ~1:
        raise VirtioError(f"unsupported virtio-net header (flags {flags:#x}, gso {gso})")
    body = raw[NET_HDR.size :]
    if len(body) > ETH_MAX:
        raise VirtioError(f"a {len(body)}-byte frame exceeds {ETH_MAX} bytes")
    dst, src, ethertype = ETH_HDR.unpack_from(body)
    return Frame(dst, src, ethertype, bytes(body[ETH_HDR.size :]))
