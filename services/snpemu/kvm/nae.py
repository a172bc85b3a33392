"""The NAE replies kvm/scratch.py builds for IOIO and MMIO; they live in kvm/exits/nae.py.

kvm/scratch.py imports this name; once it imports `snpemu.kvm.exits.nae`, this module goes.
"""

from __future__ import annotations

from snpemu.kvm.exits.nae import Reply, ioio_size, port_in

__all__ = ["Reply", "ioio_size", "port_in"]
