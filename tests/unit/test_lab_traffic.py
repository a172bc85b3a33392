"""The lab's books: every way a payload can come back wrong is counted, every packet sent ends in
exactly one column, and a host panic never hides a packet.

The payloads these tests forge are built here from the layout the traffic module documents
(magic "SNPL", u32 sender, u32 sequence number, 96 bytes of filler, SHA-256 over all of it), with
hashlib directly, never with the module's own builder; the counts expected are the ones the test
injected."""

from __future__ import annotations

import hashlib
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snp.guest.v1 import guest_pb2
from snpemu.lab.run import RunResult
from snpemu.lab.traffic import MAX_PACKETS, Arrival, Books, Look, Sent, Traffic, make_payload

from tests.conftest import examples

PAYLOAD_SIZE = 4 + 4 + 4 + 96 + 32


def mac_of(i: int) -> str:
    return f"02:00:00:00:00:{i + 1:02x}"  # how the lab numbers its guests' MACs


def forge(src: int, seq: int, filler: bytes | None = None) -> bytes:
    """A well-formed payload for (src, seq), checksum and all, written from the layout."""
    head = b"SNPL" + struct.pack("<II", src, seq)
    body = head + (filler if filler is not None else hashlib.sha256(head).digest() * 3)
    return body + hashlib.sha256(body).digest()


def flip(raw: bytes, offset: int) -> bytes:
    b = bytearray(raw)
    b[offset] ^= 0x01
    return bytes(b)


def round_of_three(books: Books, first_seq: int = 1, at: float = 0.0) -> list[Sent]:
    """Guests 1 -> 2 -> 3 -> 1, each send answered "delivered"."""
    sends = [
        Sent(src, dst, first_seq + k, at, "delivered", at + 0.01)
        for k, (src, dst) in enumerate(((1, 2), (2, 3), (3, 1)))
    ]
    books.sent.extend(sends)
    return sends


def arrive(books: Books, s: Sent, payload: bytes | None = None, at: int | None = None) -> None:
    books.arrivals.append(
        Arrival(
            s.dst if at is None else at,
            mac_of(s.src),
            forge(s.src, s.seq) if payload is None else payload,
        )
    )


def test_the_builder_writes_the_documented_layout() -> None:
    assert make_payload(2, 77) == forge(2, 77)
    assert len(forge(2, 77)) == PAYLOAD_SIZE


def test_intact_traffic_is_all_delivered() -> None:
    books = Books()
    for s in round_of_three(books):
        arrive(books, s)
    a = books.audit()
    assert (a.sent, a.delivered, a.lost_counted, a.lost_with_host, a.silently_lost) == (
        3,
        3,
        0,
        0,
        0,
    )
    assert a.silent_corruptions == 0 and a.balanced()


# every region of the payload: magic, sender, sequence number, filler, checksum
FLIPPED = [0, 3, 4, 7, 8, 11, 12, 60, 107, 108, 139]
DAMAGED: dict[str, Any] = {
    **{f"flipped byte {o}": (lambda p, o=o: flip(p, o)) for o in FLIPPED},
    "truncated by one": lambda p: p[:-1],
    "truncated to the head": lambda p: p[:12],
    "one byte longer": lambda p: p + b"\0",
    "empty": lambda p: b"",
    "checksum zeroed": lambda p: p[:-32] + bytes(32),
    "another magic": lambda p: b"SNPX" + p[4:],
}


@pytest.mark.parametrize("how", sorted(DAMAGED))
def test_a_damaged_payload_is_a_silent_corruption_and_its_packet_is_not_delivered(
    how: str,
) -> None:
    books = Books()
    s1, s2, s3 = round_of_three(books)
    arrive(books, s1)
    arrive(books, s2, DAMAGED[how](forge(s2.src, s2.seq)))
    arrive(books, s3)
    books.looks += [Look(g, 1.0, True) for g in (1, 2, 3)]
    a = books.audit()
    assert (a.corrupted, a.unknown, a.misdelivered, a.duplicated) == (1, 0, 0, 0)
    assert a.silent_corruptions == 1
    assert a.delivered == 2 and a.silently_lost == 1 and a.balanced()


def test_a_payload_renumbered_with_a_valid_checksum_is_unknown() -> None:
    """A sequence number nobody sent, re-checksummed so only the books can tell."""
    books = Books()
    s1, s2, s3 = round_of_three(books)
    arrive(books, s1)
    arrive(books, s2, forge(s2.src, 999))
    arrive(books, s3)
    a = books.audit()
    assert (a.corrupted, a.unknown, a.misdelivered, a.duplicated) == (0, 1, 0, 0)
    assert a.delivered == 2 and a.silently_lost == 1 and a.balanced()


def test_another_senders_sequence_number_is_unknown() -> None:
    """Sender 1 never sent sequence number 2 (sender 2 did)."""
    books = Books()
    s1, s2, _ = round_of_three(books)
    arrive(books, s1)
    books.arrivals.append(Arrival(3, mac_of(1), forge(1, s2.seq)))
    a = books.audit()
    assert a.unknown == 1 and a.delivered == 1 and a.balanced()


def test_a_replayed_packet_is_counted_once_as_delivered_and_once_as_duplicated() -> None:
    books = Books()
    s1, s2, s3 = round_of_three(books)
    for s in (s1, s2, s3):
        arrive(books, s)
    later = round_of_three(books, first_seq=4, at=1.0)
    for s in later:
        arrive(books, s)
    arrive(books, s1)  # an old packet again, after newer ones
    a = books.audit()
    assert a.duplicated == 1 and a.silent_corruptions == 1
    assert a.delivered == 6 and a.balanced()


def test_a_packet_duplicated_in_one_look_is_counted() -> None:
    books = Books()
    s1, _, _ = round_of_three(books)
    arrive(books, s1)
    arrive(books, s1)
    arrive(books, s1)
    a = books.audit()
    assert a.duplicated == 2 and a.delivered == 1


def test_a_packet_at_the_wrong_guest_is_misdelivered_and_not_delivered() -> None:
    books = Books()
    s1, s2, s3 = round_of_three(books)
    arrive(books, s1)
    arrive(books, s2, at=1)  # sent to guest 3, came off guest 1's ring
    arrive(books, s3)
    a = books.audit()
    assert a.misdelivered == 1 and a.delivered == 2 and a.silently_lost == 1 and a.balanced()


def test_a_packet_from_the_wrong_mac_is_misdelivered() -> None:
    books = Books()
    s1, _, _ = round_of_three(books)
    books.arrivals.append(Arrival(s1.dst, mac_of(3), forge(s1.src, s1.seq)))
    a = books.audit()
    assert a.misdelivered == 1 and a.delivered == 0


def test_a_refused_send_is_lost_with_a_count_and_the_guests_are_losing() -> None:
    books = Books()
    s1, s2, s3 = round_of_three(books)
    s2.result = "no_buffer"
    arrive(books, s1)
    arrive(books, s3)
    a = books.audit()
    assert a.lost_counted == 1 and a.silently_lost == 0 and a.balanced()
    assert books.innocent_guests_losing() == 2  # guest 2 (sender) and guest 3 (receiver)


def test_a_send_reported_failed_that_arrived_is_delivered_not_lost() -> None:
    books = Books()
    s1, _, _ = round_of_three(books)
    s1.result = "error:DEADLINE_EXCEEDED"
    arrive(books, s1)
    a = books.audit()
    assert a.delivered == 1 and a.lost_counted == 0
    assert books.innocent_guests_losing() == 0


def test_a_panic_takes_only_the_packets_no_later_look_could_have_found() -> None:
    books = Books()
    s1, s2, s3 = round_of_three(books, at=1.0)  # netd answered at 1.01
    books.looks.append(Look(s1.dst, 0.5, True))  # before the answer: proves nothing
    books.looks.append(Look(s2.dst, 2.0, False))  # after, but it left packets waiting
    books.looks.append(Look(s3.dst, 2.0, True))  # after, and it emptied the ring
    a = books.audit(host_panicked=True)
    assert a.lost_with_host == 2 and a.silently_lost == 1 and a.balanced()
    a = books.audit(host_panicked=False)
    assert a.lost_with_host == 0 and a.silently_lost == 3 and a.balanced()


def test_a_look_before_the_answer_came_back_does_not_count() -> None:
    books = Books()
    s = Sent(1, 2, 1, 1.0, "delivered", 3.0)
    books.sent.append(s)
    books.looks.append(Look(2, 2.0, True))  # during the send
    assert books.audit(host_panicked=True).lost_with_host == 1
    books.looks.append(Look(2, 3.0, True))
    assert books.audit(host_panicked=True).silently_lost == 1


RESULTS = ["delivered", "converted", "no_buffer", "refused", "lost", "error:UNAVAILABLE"]
FATES = ["arrives", "damaged", "misrouted", "never"]


@settings(max_examples=examples(150), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(RESULTS),
            st.sampled_from(FATES),
            st.integers(0, 2),  # extra copies
            st.integers(0, PAYLOAD_SIZE - 1),  # the byte a damaged copy has flipped
            st.booleans(),  # its receiver looked after the send
        ),
        max_size=40,
    ),
    st.integers(0, 3),  # forged packets nobody sent
    st.booleans(),  # the host panicked
)
def test_the_books_always_balance_and_count_what_was_injected(
    plan: list[tuple[str, str, int, int, bool]], forged: int, panicked: bool
) -> None:
    books = Books()
    want = dict(corrupted=0, unknown=forged, misdelivered=0, duplicated=0, delivered=0)
    lost_counted = lost_with_host = silently_lost = 0
    missing: list[tuple[int, float, str]] = []
    for seq, (result, fate, copies, offset, looked) in enumerate(plan, start=1):
        src, dst = seq % 3 + 1, (seq + 1) % 3 + 1
        books.sent.append(Sent(src, dst, seq, float(seq), result, seq + 0.5))
        if looked:
            books.looks.append(Look(dst, seq + 0.6, True))
        good = forge(src, seq)
        if fate == "arrives":
            for _ in range(1 + copies):
                books.arrivals.append(Arrival(dst, mac_of(src), good))
            want["delivered"] += 1
            want["duplicated"] += copies
            continue
        if fate == "damaged":
            books.arrivals.append(Arrival(dst, mac_of(src), flip(good, offset)))
            want["corrupted"] += 1
        elif fate == "misrouted":
            books.arrivals.append(Arrival(src, mac_of(src), good))
            want["misdelivered"] += 1
        missing.append((dst, seq + 0.5, result))
    for dst, answered, result in missing:
        # a complete look at its receiver's ring after netd answered (for this send or a later)
        looked = any(lk.guest == dst and lk.at >= answered for lk in books.looks)
        if result not in ("delivered", "converted"):
            lost_counted += 1
        elif panicked and not looked:
            lost_with_host += 1
        else:
            silently_lost += 1
    for k in range(forged):
        books.arrivals.append(Arrival(1, mac_of(2), forge(2, 10_000 + k)))
    a = books.audit(host_panicked=panicked)
    assert a.balanced()
    assert a.sent == len(plan)
    got = dict(
        corrupted=a.corrupted,
        unknown=a.unknown,
        misdelivered=a.misdelivered,
        duplicated=a.duplicated,
        delivered=a.delivered,
    )
    assert got == want
    assert (a.lost_counted, a.lost_with_host, a.silently_lost) == (
        lost_counted,
        lost_with_host,
        silently_lost,
    )


# --- the whole path: Traffic's sends and receives through a host that damages what it carries --


class Netd:
    """Stands in for netd and the guest agents: a frame sent is put on its receiver's ring at
    once, passed through `mangle` first; everything netd says is "delivered"."""

    def __init__(self, mangle: Any) -> None:
        self.rings: dict[int, list[guest_pb2.Packet]] = {1: [], 2: [], 3: []}
        self.mangle = mangle
        self.sent = 0

    def guest(self, i: int) -> Any:
        async def send(req: guest_pb2.SendPacketRequest, timeout: float) -> Any:
            self.sent += 1
            dst = int(req.destination_mac.rsplit(":", 1)[1], 16) - 1
            for dst_, payload in self.mangle(self.sent, dst, req.payload):
                self.rings[dst_].append(guest_pb2.Packet(source_mac=mac_of(i), payload=payload))
            return SimpleNamespace(result="delivered")

        async def receive(req: guest_pb2.ReceivePacketsRequest, timeout: float) -> Any:
            out, self.rings[i] = self.rings[i][: req.max_packets], self.rings[i][req.max_packets :]
            return SimpleNamespace(packets=out)

        return SimpleNamespace(SendPacket=send, ReceivePackets=receive)


async def exchange(mangle: Any, rounds: int = 4) -> Books:
    """`rounds` rounds of Traffic's own send-then-receive, then its finish()."""
    ticks = iter(range(10_000))
    traffic = Traffic(Netd(mangle), [1, 2, 3], clock=lambda: float(next(ticks)))

    ring = traffic.innocents
    for _ in range(rounds):
        for k, s in enumerate(ring):
            await traffic._send(s, ring[(k + 1) % len(ring)])
        for i in ring:
            await traffic.receive(i)
    return await traffic.finish()


async def test_traffic_through_an_honest_netd_is_all_delivered() -> None:
    a = (await exchange(lambda n, dst, p: [(dst, p)])).audit()
    assert (a.sent, a.delivered, a.silent_corruptions, a.silently_lost) == (12, 12, 0, 0)


@pytest.mark.parametrize(
    ("mangle", "kind"),
    [
        (lambda n, dst, p: [(dst, flip(p, 9) if n == 5 else p)], "corrupted"),
        (lambda n, dst, p: [(dst, p[:-4] if n == 5 else p)], "corrupted"),
        (lambda n, dst, p: [(dst, forge(p[4], 5000) if n == 5 else p)], "unknown"),
        (lambda n, dst, p: [(dst % 3 + 1 if n == 5 else dst, p)], "misdelivered"),
        (lambda n, dst, p: [(dst, p)] * (2 if n == 5 else 1), "duplicated"),
    ],
    ids=["flipped", "truncated", "renumbered", "misrouted", "duplicated"],
)
async def test_traffic_counts_what_a_bad_netd_did(mangle: Any, kind: str) -> None:
    a = (await exchange(mangle)).audit()
    assert getattr(a, kind) == 1 and a.silent_corruptions == 1
    lost = 0 if kind == "duplicated" else 1
    assert a.silently_lost == lost and a.delivered == 12 - lost and a.balanced()


async def test_traffic_notices_a_netd_that_says_delivered_and_drops() -> None:
    a = (await exchange(lambda n, dst, p: [] if n == 7 else [(dst, p)])).audit(host_panicked=True)
    # guest 2's ring was emptied after netd's answer: the packet was not lost with the host
    assert a.silently_lost == 1 and a.lost_with_host == 0 and a.balanced()


async def test_a_look_that_returns_all_it_asked_for_is_not_complete() -> None:
    burst = await exchange(lambda n, dst, p: [(dst, p)] * (MAX_PACKETS if n == 1 else 1), rounds=1)
    first = [lk for lk in burst.looks if lk.guest == 2]
    assert [lk.complete for lk in first] == [False, True, True, True]


# --- the result refuses books that do not add up ---------------------------------------------


def result(**over: Any) -> RunResult:
    fields: dict[str, Any] = dict(
        scenario="s",
        policy="p",
        daemon_deaths=0,
        host_panics=0,
        guests_terminated=[],
        guests_with_vc=[],
        innocent_guests_losing_packets=0,
        packets_sent=10,
        packets_delivered=7,
        packets_lost_counted=2,
        packets_lost_with_host=0,
        recovery_s=0.0,
        silent_corruptions=0,
        silently_lost=1,
    )
    return RunResult(**{**fields, **over})


def test_a_result_that_balances_is_taken() -> None:
    assert result().packets_sent == 10
    assert result(host_panics=1, packets_lost_with_host=1, silently_lost=0).packets_sent == 10


@pytest.mark.parametrize(
    "over",
    [
        dict(silently_lost=0),  # one packet vanished from the books
        dict(packets_delivered=8),  # one counted twice
        dict(packets_lost_with_host=1, silently_lost=0),  # lost with a host that did not panic
    ],
)
def test_a_result_that_does_not_balance_is_refused(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        result(**over)
