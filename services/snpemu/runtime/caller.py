"""Who is calling the RPC being served: the host, a guest's VMM, or the guest's owner.

The handler in runtime/servicer.py checks the credential header before the implementation
runs and records the principal here, so a model can ask "is this the host?" without reading
gRPC metadata. On a real host the same split is Unix permissions: root (the host) may do
anything, a VMM process holds /dev/kvm and the fds it opened, nothing else.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    # A service started without a host credential (by hand, in a unit test): everything is
    # open, and every caller acts as the host.
    OPEN = "open"
    HOST = "host"
    # A guest agent's VMM side (QEMU's role), named by its guest (e.g. "guest-0").
    VMM = "vmm"
    # The guest owner, on a guest agent's own API.
    OWNER = "owner"


@dataclass(frozen=True)
class Caller:
    role: Role
    name: str = ""

    @property
    def is_host(self) -> bool:
        return self.role in (Role.HOST, Role.OPEN)


OPEN = Caller(Role.OPEN)
HOST = Caller(Role.HOST, "host")

_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("snpemu_caller", default=OPEN)


def current_caller() -> Caller:
    """The caller of the RPC this task serves (OPEN outside an RPC)."""
    return _current.get()


def set_caller(caller: Caller) -> contextvars.Token[Caller]:
    return _current.set(caller)
