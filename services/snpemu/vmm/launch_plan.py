"""The pages a VMM launches for an SNP guest, in order, with their page types.

QEMU target/i386/sev.c (snp_launch_update_data, snp_populate_metadata_pages) and KVM's
LAUNCH_FINISH (one VMSA per vCPU): the order the digest depends on (docs/abi.md#launch-order).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from snpemu.abi.addr import PAGE_SIZE, page_offset
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import VMSA_GPA
from snpemu.vmm import vmsa
from snpemu.vmm.ovmf import Ovmf, SectionType

# SEV hash table GUIDs (QEMU target/i386/sev.c; docs/abi.md#launch-order)
HASH_TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
KERNEL_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")
INITRD_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
CMDLINE_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")


@dataclass(frozen=True)
class LaunchPage:
    gpa: int
    page_type: PageType
    data: bytes | None  # contents the VMM places (None: the firmware fills or zeroes it)


def kernel_hashes_table(kernel: bytes, initrd: bytes, cmdline: str) -> bytes:
    """QEMU's SevHashTable {GUID, u16 len, entries[cmdline, initrd, kernel]} padded to 16."""

    def entry(guid: uuid.UUID, data: bytes) -> bytes:
        return guid.bytes_le + struct.pack("<H", 16 + 2 + 32) + hashlib.sha256(data).digest()

    entries = (
        entry(CMDLINE_GUID, cmdline.encode() + b"\0")  # the command line is hashed with its NUL
        + entry(INITRD_GUID, initrd)
        + entry(KERNEL_GUID, kernel)
    )
    table = HASH_TABLE_GUID.bytes_le + struct.pack("<H", 16 + 2 + len(entries)) + entries
    return table + bytes(-len(table) % 16)


def plan(
    ovmf: Ovmf,
    *,
    vcpus: int,
    vcpu_signature: int,
    sev_features: int = 0x1,
    kernel_hashes: bytes | None = None,
    cpuid_page: bytes | None = None,
) -> list[LaunchPage]:
    if vcpus < 1:
        raise ValueError("a guest has at least one vCPU")
    pages = [
        LaunchPage(ovmf.gpa + off, PageType.NORMAL, ovmf.data[off : off + PAGE_SIZE])
        for off in range(0, len(ovmf.data), PAGE_SIZE)
    ]
    if kernel_hashes is not None and not any(
        s.kind == SectionType.SNP_KERNEL_HASHES for s in ovmf.sections
    ):
        raise ValueError("a kernel was given but the firmware has no SNP_KERNEL_HASHES section")
    for s in ovmf.sections:
        gpas = range(s.gpa, s.gpa + s.size, PAGE_SIZE)
        if s.kind in (SectionType.SNP_SEC_MEM, SectionType.SVSM_CAA):
            pages += [LaunchPage(g, PageType.ZERO, None) for g in gpas]
        elif s.kind == SectionType.SNP_SECRETS:
            pages.append(LaunchPage(s.gpa, PageType.SECRETS, None))
        elif s.kind == SectionType.CPUID:
            pages.append(LaunchPage(s.gpa, PageType.CPUID, cpuid_page or bytes(PAGE_SIZE)))
        elif kernel_hashes is None:
            pages += [LaunchPage(g, PageType.ZERO, None) for g in gpas]
        else:
            page = bytearray(s.size)
            offset = page_offset(ovmf.hashes_table_gpa)
            page[offset : offset + len(kernel_hashes)] = kernel_hashes
            pages += [
                LaunchPage(g, PageType.NORMAL, bytes(page[g - s.gpa : g - s.gpa + PAGE_SIZE]))
                for g in gpas
            ]
    bsp = vmsa.build(vmsa.BSP_EIP, vcpu_signature, sev_features)
    ap = vmsa.build(ovmf.reset_eip, vcpu_signature, sev_features) if vcpus > 1 else bsp
    pages += [LaunchPage(VMSA_GPA, PageType.VMSA, bsp if i == 0 else ap) for i in range(vcpus)]
    return pages


@dataclass(frozen=True)
class Update:
    """One KVM_SEV_SNP_LAUNCH_UPDATE region: consecutive pages of one type."""

    gpa: int
    page_type: PageType
    npages: int
    source: bytes  # empty for ZERO


def updates(plan: list[LaunchPage]) -> Iterator[Update]:
    """The plan's pages but the VMSAs (LAUNCH_FINISH's), as QEMU queues them: consecutive
    GPAs of one type in one update."""
    pages = [p for p in plan if p.page_type != PageType.VMSA]
    runs: list[list[LaunchPage]] = []
    for p in pages:
        last = runs[-1][-1] if runs else None
        if last and last.page_type == p.page_type and last.gpa + PAGE_SIZE == p.gpa:
            runs[-1].append(p)
        else:
            runs.append([p])
    for run in runs:
        zero = run[0].page_type == PageType.ZERO
        yield Update(
            run[0].gpa,
            run[0].page_type,
            len(run),
            b"" if zero else b"".join(p.data or bytes(PAGE_SIZE) for p in run),
        )
