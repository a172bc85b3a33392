"""A workload that runs while services die (tests/cluster/test_recovery.py): attestation
reports, page conversions and packets between the guests, each answer checked.

An error is allowed: a service was killed, and a call to it may fail. A wrong answer is not:
a report that does not verify against the host's root, carries another nonce or another
measurement; memory that reads back other bytes than were written while the guest's VM stayed
the same; a packet received that guest-0 never sent, or from another MAC. Each error is counted
by its status code, and an UNKNOWN one is a finding too (a bug's answer).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from snp.common.v1 import types_pb2
from snp.guest.v1 import guest_pb2 as pb
from snp.guest.v1 import guest_pb2_grpc
from snpemu.guest import verify

CALL_TIMEOUT_S = 30
CONVERT_GPA = 0x180_0000  # 24 MiB: above the netd device window, used by nothing else
SENDER, RECEIVER = "guest-0", "guest-1"
SENDER_MAC = "02:00:00:00:00:01"  # guest-0's default (guest/network.py _mac_for)
RECEIVER_MAC = "02:00:00:00:00:02"


@dataclass
class Tally:
    ok: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong: list[str] = field(default_factory=list)
    first: dict[str, str] = field(default_factory=dict)  # the first error's details, by key
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, kind: str) -> None:
        with self.lock:
            self.ok[kind] += 1

    def error(self, kind: str, e: grpc.RpcError) -> None:
        key = f"{kind} {e.code().name}"  # type: ignore[attr-defined]
        with self.lock:
            self.errors[key] += 1
            self.first.setdefault(key, (e.details() or "")[:300])  # type: ignore[attr-defined]

    def bad(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)

    def count(self, kind: str) -> int:
        with self.lock:
            return self.ok[kind]


class Workload:
    def __init__(
        self,
        address: Callable[[str], str],
        owner_md: Callable[[str], tuple[tuple[str, str], ...]],
        guests: list[str],
        ark: x509.Certificate,
        measurement: bytes,
    ) -> None:
        self.address, self.owner_md, self.guests = address, owner_md, guests
        self.ark, self.measurement = ark, measurement
        self.tally = Tally()
        self.stop = threading.Event()
        self.sent: set[bytes] = set()  # every payload guest-0 tried to send
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        loops = [(self._reports, g) for g in self.guests]
        loops += [(self._conversions, RECEIVER), (self._sends, SENDER), (self._receives, RECEIVER)]
        for loop, guest in loops:
            t = threading.Thread(target=self._run, args=(loop, guest), daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> Tally:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2 * CALL_TIMEOUT_S)
        return self.tally

    def _run(
        self, loop: Callable[[guest_pb2_grpc.GuestServiceStub, str], None], guest: str
    ) -> None:
        while not self.stop.is_set():
            with grpc.insecure_channel(self.address(guest)) as channel:
                stub = guest_pb2_grpc.GuestServiceStub(channel)
                try:
                    while not self.stop.is_set():
                        loop(stub, guest)
                except grpc.RpcError as e:
                    self.tally.error(loop.__name__.strip("_"), e)
                    self.stop.wait(0.2)  # the agent restarting: again on a new channel
                except Exception as e:  # an answer of the wrong shape: wrong, and said so
                    self.tally.bad(f"{guest} {loop.__name__}: {e!r}")
                    self.stop.wait(0.2)

    def _call(self, method: Callable[..., object], request: object, guest: str) -> object:
        return method(request, timeout=CALL_TIMEOUT_S, metadata=self.owner_md(guest))

    # --- the loops: each raises grpc.RpcError for a failed call ----------------------------

    def _reports(self, stub: guest_pb2_grpc.GuestServiceStub, guest: str) -> None:
        nonce = os.urandom(64)
        r = self._call(
            stub.GetExtendedReport,
            pb.GetExtendedReportRequest(report_data=nonce, certs_pages=4),
            guest,
        )
        assert isinstance(r, pb.GetExtendedReportResponse)
        failed = [
            what
            for ok, what in verify.check(bytes(r.report), bytes(r.certs_blob), self.ark, nonce)
            if not ok
        ]
        if bytes(r.fields.measurement) != self.measurement:
            failed.append("MEASUREMENT is the launch's")
        if failed:
            self.tally.bad(f"{guest} report: {failed}")
        else:
            self.tally.done("reports")

    def _vm_id(self, stub: guest_pb2_grpc.GuestServiceStub, guest: str) -> str:
        st = self._call(stub.GetStatus, pb.GetStatusRequest(), guest)
        assert isinstance(st, pb.GetStatusResponse)
        return st.vm_id

    def _conversions(self, stub: guest_pb2_grpc.GuestServiceStub, guest: str) -> None:
        """Shared, a write and a read through the host's view; private, the same through the
        guest's: the bytes read are the bytes written, unless the guest got a new VM."""
        vm = self._vm_id(stub, guest)
        got: list[tuple[bytes, bytes]] = []
        for conversion, shared in (
            (pb.CONVERSION_TO_SHARED, True),
            (pb.CONVERSION_TO_PRIVATE, False),
        ):
            self._call(
                stub.ConvertMemory,
                pb.ConvertMemoryRequest(
                    gpa=CONVERT_GPA,
                    size=4096,
                    conversion=conversion,
                    page_size=types_pb2.PAGE_SIZE_4K,
                ),
                guest,
            )
            data = os.urandom(4096)
            self._call(
                stub.WriteMemory,
                pb.WriteMemoryRequest(gpa=CONVERT_GPA, data=data, shared=shared),
                guest,
            )
            back = self._call(
                stub.ReadMemory,
                pb.ReadMemoryRequest(gpa=CONVERT_GPA, length=4096, shared=shared),
                guest,
            )
            assert isinstance(back, pb.ReadMemoryResponse)
            got.append((data, bytes(back.data)))
        if any(w != r for w, r in got) and self._vm_id(stub, guest) == vm:
            self.tally.bad(f"{guest}: memory read back other bytes than were written")
        else:
            self.tally.done("conversions")

    def _attached(
        self, stub: guest_pb2_grpc.GuestServiceStub, guest: str, e: grpc.RpcError
    ) -> bool:
        """A guest that booted a new VM has no device: attach it again (a driver probe)."""
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
            return False
        self._call(stub.AttachNetDevice, pb.AttachNetDeviceRequest(), guest)
        self.tally.done("attaches")
        return True

    def _sends(self, stub: guest_pb2_grpc.GuestServiceStub, guest: str) -> None:
        payload = os.urandom(32)
        self.sent.add(payload)  # before the call: a lost answer may still have delivered it
        try:
            r = self._call(
                stub.SendPacket,
                pb.SendPacketRequest(destination_mac=RECEIVER_MAC, payload=payload),
                guest,
            )
        except grpc.RpcError as e:
            if not self._attached(stub, guest, e):
                raise
            return
        assert isinstance(r, pb.SendPacketResponse)
        self.tally.done(f"sent {r.result}")
        self.stop.wait(0.05)

    def _receives(self, stub: guest_pb2_grpc.GuestServiceStub, guest: str) -> None:
        try:
            r = self._call(stub.ReceivePackets, pb.ReceivePacketsRequest(), guest)
        except grpc.RpcError as e:
            if not self._attached(stub, guest, e):
                raise
            return
        assert isinstance(r, pb.ReceivePacketsResponse)
        for p in r.packets:
            if p.source_mac != SENDER_MAC or bytes(p.payload) not in self.sent:
                self.tally.bad(f"{guest} received {p.payload[:8].hex()}... from {p.source_mac}")
            else:
                self.tally.done("received")
        self.stop.wait(0.1)
