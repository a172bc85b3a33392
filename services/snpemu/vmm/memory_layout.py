"""Where the VMM snpemu plays (the guest agent, kvm's LaunchVm, the grpcurl walk-through) puts
guest memory: memslot 0 for RAM from GPA 0, memslot 1 for the firmware that ends at 4 GiB, and
user addresses for them from VMM_HVA_BASE on (where QEMU's mmap might put them; KVM only checks
such addresses, and kvm has nothing behind them)."""

from __future__ import annotations

from snpemu.abi.addr import PMD_SIZE

RAM_SLOT, FIRMWARE_SLOT = 0, 1
VMM_HVA_BASE = 0x7F00_0000_0000


def firmware_hva(ram_bytes: int) -> int:
    """The firmware's memory follows RAM's, 2 MiB aligned."""
    return VMM_HVA_BASE + -(-ram_bytes // PMD_SIZE) * PMD_SIZE
