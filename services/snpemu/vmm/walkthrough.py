"""The launch pages of a firmware image as grpcurl requests, for launching a guest by hand.

    python -m snpemu.vmm.walkthrough FIRMWARE --vm-id ID --out DIR

writes, in launch order, one JSON request a file (DIR/NNN_Method.json): for each run of pages
QEMU launches from the image (target/i386/sev.c: the image's pages, then its SEV metadata
sections), snp.kvm.v1.KvmService SetMemoryAttributes (the run private) and SnpLaunchUpdate
(the run measured). Their uaddr is the page's GPA above `--hva-base`, where the memslots the
walk-through makes put guest memory. scripts/launch-step-by-step.sh sends them.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.page_type import PageType
from snpemu.vmm import launch_plan
from snpemu.vmm.memory_layout import VMM_HVA_BASE
from snpemu.vmm.ovmf import Ovmf

# KERNEL: include/uapi/linux/kvm.h KVM_MEMORY_ATTRIBUTE_PRIVATE
PRIVATE = 1 << 3
# what kvm's SnpLaunchUpdate does in one call at most: a longer run is sent in pieces, so
# the script need not resend the rest
PAGES_PER_REQUEST = 4096


def requests(
    firmware: bytes, vm_id: str, hva_base: int = VMM_HVA_BASE
) -> list[tuple[str, dict[str, object]]]:
    # the VMSAs are not among them: SnpLaunchFinish measures those
    plan = launch_plan.plan(Ovmf.parse(firmware), vcpus=1, vcpu_signature=0)
    vm = {"id": vm_id}
    out: list[tuple[str, dict[str, object]]] = []
    for u in launch_plan.updates(plan):
        length = u.npages * PAGE_SIZE
        out.append(
            (
                "SetMemoryAttributes",
                {"vm": vm, "address": str(u.gpa), "size": str(length), "attributes": str(PRIVATE)},
            )
        )
        for first in range(0, u.npages, PAGES_PER_REQUEST):
            n = min(PAGES_PER_REQUEST, u.npages - first)
            gpa = u.gpa + first * PAGE_SIZE
            update: dict[str, object] = {
                "vm": vm,
                "gfn_start": str(gpa // PAGE_SIZE),
                "len": str(n * PAGE_SIZE),
                "type": int(u.page_type),
            }
            if u.page_type != PageType.ZERO:
                piece = u.source[first * PAGE_SIZE : (first + n) * PAGE_SIZE]
                update["uaddr"] = str(hva_base + gpa)
                update["source"] = base64.b64encode(piece).decode()
            out.append(("SnpLaunchUpdate", update))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m snpemu.vmm.walkthrough", description=__doc__)
    p.add_argument("firmware", type=Path)
    p.add_argument("--vm-id", required=True)
    p.add_argument("--hva-base", type=lambda v: int(v, 0), default=VMM_HVA_BASE)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for i, (method, body) in enumerate(requests(a.firmware.read_bytes(), a.vm_id, a.hva_base)):
        (a.out / f"{i:03d}_{method}.json").write_text(json.dumps(body))


if __name__ == "__main__":
    main()
