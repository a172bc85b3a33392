"""Client side of rmp for host processes: the user-mode write path and the credential.

A host user-mode writer (a device daemon) that writes a guest-private page under the
`sigbus` policy must die of SIGBUS, as the v5 host series' fault handler does to it
(do_sigbus on an assigned page); under `gmem` the write fails cleanly with an error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc

from snpemu.errors import WrongState
from snpemu.rmp.reasons import RmpReason
from snpemu.runtime.servicer import CREDENTIAL_HEADER

log = logging.getLogger(__name__)


def credential_metadata(credential: str | None) -> tuple[tuple[str, str], ...]:
    return ((CREDENTIAL_HEADER, credential),) if credential else ()


def read_credential(state_dir: Path | str = ".snpemu") -> str:
    return (Path(state_dir) / "host-credential").read_text().strip()


class HostAccessRefused(WrongState):
    """The host may not map guest-private memory (gmem): the write failed and changed nothing."""

    default_reason = RmpReason.GUEST_PRIVATE_MEMORY


def die_of_sigbus(dump: list[str]) -> None:
    """What the kernel does to a user process whose write hit an assigned page (v5 series)."""
    print("Fatal RMP page fault, terminating process", file=sys.stderr)
    for line in dump:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGBUS)


def check_user_write(reply: rmp_pb2.HostWriteResponse) -> rmp_pb2.HostWriteResponse:
    """Apply a user-mode write's outcome to the calling process."""
    if reply.outcome == rmp_pb2.VIOLATION_OUTCOME_SIGBUS:
        die_of_sigbus(list(reply.rmp_dump))
    if reply.outcome == rmp_pb2.VIOLATION_OUTCOME_REFUSED:
        raise HostAccessRefused(
            f"PFN {reply.entry.pfn:#x} is guest-private: host userspace cannot map it"
        )
    return reply


class RmpUserWriter:
    """A host user-mode process writing guest memory through rmp (synchronous)."""

    def __init__(self, address: str, credential: str | None, writer: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = rmp_pb2_grpc.RmpServiceStub(self.channel)
        self.metadata = credential_metadata(credential)
        self.writer = writer

    def write(self, spa: int, data: bytes) -> rmp_pb2.HostWriteResponse:
        reply = self.stub.HostWrite(
            rmp_pb2.HostWriteRequest(
                spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_USER, writer=self.writer
            ),
            metadata=self.metadata,
        )
        return check_user_write(reply)

    def close(self) -> None:
        self.channel.close()
