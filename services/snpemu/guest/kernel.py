"""The guest kernel of one SNP VM: the VMM's launch of it, then its boot.

It reaches the host only as a guest can: VMGEXIT to kvm (MSR protocol and GHCB, with its vCPU
identity), guest-mode memory access and PVALIDATE/RMPADJUST through rmp (guest/exits.py,
guest/memory.py). Creating and launching the VM is the VMM's part (QEMU's), done with the VMM
credential.
KERNEL: arch/x86/coco/sev/core.c (snp_set_vmsa, wakeup_cpu_via_vmgexit),
arch/x86/boot/compressed/sev.c (sev_enable: protocol, HV features).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from snpemu.abi import ghcb as g
from snpemu.abi import msr_protocol as msr
from snpemu.abi import policy as guest_policy
from snpemu.abi.addr import PAGE_SIZE, Gpa, gpa_to_gfn
from snpemu.abi.secrets import SecretsPage
from snpemu.guest import vmm_launch
from snpemu.guest.exits import (
    GEN_PROT_UNSUPPORTED,
    GEN_REQ,
    GEN_SNP_UNSUPPORTED,
    LINUX_REGISTER,
    LINUX_SECRETS_PAGE,
    TERM_GEN,
    TERM_LINUX,
    BootState,
)
from snpemu.guest.layout import GHCB_GPA, SHARED_GPAS
from snpemu.guest.memory import GuestMemory
from snpemu.vmm import launch_plan, vmsa
from snpemu.vmm.ovmf import Ovmf, SectionType


class GuestKernel(GuestMemory):
    async def launch(self) -> None:
        """The VMM's part: create and launch the VM, as QEMU does over KVM's ioctls
        (guest/vmm_launch.py)."""
        o = self.opts
        self.state = BootState.LAUNCHING
        machine = await asyncio.to_thread(self._machine)
        self.vm = await self.vmm.create_vm(None, o.memory_model)
        # Hold the VM as a VMM holds its VM fd: if this process dies, kvm destroys the VM.
        self.hold = await self.vmm.hold_vm(self.vm)
        if o.throttle_ms:
            await self.vmm.set_guest_request_throttle(self.vm, o.throttle_ms, o.throttle_burst)
        self.measurement, vcpus = await vmm_launch.launch(self.vmm, self.vm, machine)
        self.vcpus = vcpus
        self.event("launched", detail=self.measurement.hex())

    def _machine(self) -> vmm_launch.Machine:
        """The images read as QEMU reads -bios, -kernel, -initrd (kernel-hashes=on)."""
        o = self.opts
        hashes = None
        if o.kernel:
            initrd = Path(o.initrd).read_bytes() if o.initrd else b""
            kernel = Path(o.kernel).read_bytes()
            hashes = launch_plan.kernel_hashes_table(kernel, initrd, o.cmdline)
        return vmm_launch.Machine(
            memory_bytes=o.memory_bytes,
            vcpus=o.vcpus,
            vcpu_type=o.vcpu_type,
            policy=o.policy or int(guest_policy.DEFAULT),
            firmware=Path(self.firmware).read_bytes(),
            kernel_hashes=hashes,
            host_data=o.host_data,
        )

    async def boot(self) -> None:
        await self.launch()
        self.state = BootState.BOOTING
        info = await self.msr_exit(msr.SEV_INFO_REQ)
        lo, hi = msr.sev_info_versions(info)
        if info & msr.INFO_MASK != msr.SEV_INFO_RESP or not lo <= 2 <= hi:
            return await self.terminate(
                TERM_GEN, GEN_PROT_UNSUPPORTED, "GHCB protocol 2 not offered"
            )
        features = msr.hv_features_of(await self.msr_exit(msr.HV_FT_REQ))
        if not features & msr.HV_FT_SNP:
            return await self.terminate(TERM_GEN, GEN_SNP_UNSUPPORTED, "SNP not offered")
        if await self.msr_exit(GHCB_GPA | msr.REG_GPA_REQ) != GHCB_GPA | msr.REG_GPA_RESP:
            return await self.terminate(TERM_LINUX, LINUX_REGISTER, "GHCB registration refused")
        ovmf = Ovmf.load(self.firmware)
        launched = [s for s in ovmf.sections if self.in_ram(s.gpa, s.size)]
        for s in launched:  # pages the firmware launched are private and validated already
            self.accepted[gpa_to_gfn(s.gpa) : gpa_to_gfn(s.gpa + s.size)] = True
            self.unaccepted[gpa_to_gfn(s.gpa) : gpa_to_gfn(s.gpa + s.size)] = False
        for gpa in SHARED_GPAS:
            self.unaccepted[gpa_to_gfn(gpa)] = False
        secrets = next((s for s in ovmf.sections if s.kind == SectionType.SNP_SECRETS), None)
        if secrets is None:
            return await self.terminate(TERM_LINUX, LINUX_SECRETS_PAGE, "no secrets page")
        self.secrets_gpa = Gpa(secrets.gpa)
        page = await self.read_private(self.secrets_gpa, PAGE_SIZE)
        secrets_page = SecretsPage.unpack(page)
        self.vmpcks = list(secrets_page.vmpcks)
        self.counters = list(secrets_page.msg_seqnos)
        if self.opts.eager:
            for e in self.ram:
                await self.accept(e.addr, e.size)
        await self.start_aps(ovmf)
        if self.state == BootState.TERMINATED:
            return
        self.state = BootState.RUNNING
        self.event(
            "boot",
            detail=f"{len(self.vcpus)} vCPUs, {'eager' if self.opts.eager else 'lazy'} acceptance",
        )

    async def start_aps(self, ovmf: Ovmf) -> None:
        """AP_CREATION with a VMSA the guest builds and marks with RMPADJUST (snp_set_vmsa)."""
        for apic_id in range(1, len(self.vcpus)):
            # at the top of RAM below 4 GiB, never 2 MiB aligned
            low = self.ram[0]
            gpa = Gpa(low.addr + low.size - (2 * apic_id + 1) * PAGE_SIZE)
            await self.accept(gpa, PAGE_SIZE)
            page = vmsa.build(ovmf.reset_eip, 0, 1)
            await self.write_private(gpa, page)
            r = await self.rmpadjust(gpa, vmsa=True)
            if r.eax:
                return await self.terminate(
                    TERM_GEN, GEN_REQ, f"RMPADJUST of the AP VMSA failed: {r.eax}"
                )
            x = g.Ghcb()
            for k, v in (
                ("sw_exit_code", g.EXIT_AP_CREATION),
                ("sw_exit_info_1", apic_id << 32 | 1),
                ("sw_exit_info_2", gpa),
                ("rax", 1),
            ):
                x.set(k, v)
            resp, _ = await self.ghcb_exit(x)
            if resp.sw_exit_info_1:
                return await self.terminate(TERM_GEN, GEN_REQ, f"AP {apic_id} creation refused")


def firmware_default(kvm_default: str) -> str:
    return kvm_default if Path(kvm_default).exists() else ""
