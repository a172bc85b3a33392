"""What exit handlers may touch of kvm: its VMs, its counters and tracepoints, its peers.

`Kvm` (kvm/machine.py) is the one implementation; the handlers see nothing else of it, and
unit tests stand in for it with as little. The peers are reached only from the few places
named in exits/__init__.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from snpemu.kvm.gmem import GuestMemfds
    from snpemu.kvm.machine import Counters
    from snpemu.kvm.ports import PspPort, RmpPort
    from snpemu.kvm.trace import TraceHub
    from snpemu.kvm.vm import Vm


class ExitContext(Protocol):
    @property
    def vms(self) -> Mapping[str, Vm]: ...

    def vm(self, vm_id: str) -> Vm:
        """The VM, or NotFound."""
        ...

    @property
    def counters(self) -> Counters: ...

    @property
    def trace(self) -> TraceHub: ...

    @property
    def certs_blob(self) -> bytes:
        """The certificate table an extended guest request returns (SNP_SET_EXT_CONFIG)."""
        ...

    @property
    def rmp(self) -> RmpPort: ...

    @property
    def gmems(self) -> GuestMemfds:
        """The guest_memfds, whose frames a first use takes (kvm/faultin.py)."""
        ...

    @property
    def psp(self) -> PspPort: ...
