"""A guest vCPU's RMP instructions: PVALIDATE and RMPADJUST at a GPA.

The GPA goes through the ASID's nested page table first (a GPA it does not map is a #NPF);
the RMP checks are RmpTable's. Each instruction is counted by its result, -1 when it faulted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from snpemu.abi.rmp import Code
from snpemu.rmp.counters import Counters
from snpemu.rmp.fault import Fault, npf
from snpemu.rmp.identities import Identity
from snpemu.rmp.paging import NestedPaging
from snpemu.rmp.table import RmpTable


class GuestInstructions:
    def __init__(self, table: RmpTable, paging: NestedPaging, counters: Counters) -> None:
        self.table = table
        self.paging = paging
        self.counters = counters

    def pvalidate(
        self, ident: Identity, gpa: int, *, size_2m: bool, validate: bool
    ) -> Code | Fault:
        pfn = self.paging.translate(ident.asid, gpa)
        if pfn is None:
            return npf(gpa, "GPA not mapped in the nested page table", write=True)
        result = self.table.pvalidate(
            pfn, gpa=gpa, asid=ident.asid, vmpl=ident.vmpl, size_2m=size_2m, validate=validate
        )
        self.counters.count("pvalidate", int(result) if isinstance(result, Code) else -1)
        return result

    def pvalidate_batch(
        self, ident: Identity, gpas: npt.NDArray[np.uint64], *, validate: bool
    ) -> tuple[npt.NDArray[np.uint8], Fault | None]:
        """4K PVALIDATE of each GPA in order, up to the first fault (unmapped GPAs included)."""
        pfns = self.paging.translate_many(ident.asid, gpas)
        unmapped = pfns < 0
        stop = int(np.argmax(unmapped)) if unmapped.any() else len(gpas)
        codes, fault = self.table.pvalidate_batch(
            pfns[:stop], gpas[:stop], asid=ident.asid, vmpl=ident.vmpl, validate=validate
        )
        if fault is None and stop < len(gpas):
            fault = npf(int(gpas[stop]), "GPA not mapped in the nested page table", write=True)
        self.counters.count("pvalidate", codes)
        if fault is not None:
            self.counters.count("pvalidate", -1)
        return codes, fault

    def rmpadjust(
        self,
        ident: Identity,
        gpa: int,
        *,
        size_2m: bool,
        target_vmpl: int,
        perms: int,
        vmsa: bool,
    ) -> Code | Fault:
        pfn = self.paging.translate(ident.asid, gpa)
        if pfn is None:
            return npf(gpa, "GPA not mapped in the nested page table")
        result = self.table.rmpadjust(
            pfn,
            gpa=gpa,
            asid=ident.asid,
            vmpl=ident.vmpl,
            size_2m=size_2m,
            target_vmpl=target_vmpl,
            perms=perms,
            vmsa=vmsa,
        )
        self.counters.count("rmpadjust", int(result) if isinstance(result, Code) else -1)
        return result
