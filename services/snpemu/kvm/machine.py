"""kvm: host bring-up and the life of SNP VMs (create, launch as QEMU does, destroy).

`Kvm` holds the host's state (ASIDs, VMs, the certificate table, counters, tracepoints); what
it does is in the modules named for it: bringup.py (SNP_INIT and the legacy init at load),
create.py (KVM_CREATE_VM), snp_cmds.py (the SEV commands and KVM_CREATE_VCPU),
memory_ioctls.py (guest_memfd, memslots, memory attributes), launch.py (QEMU's launch over
them), teardown.py (sev_vm_destroy()), policy.py (the
checks of a VM's configuration). It reaches rmp and psp only through the ports of ports.py.
Exit handling is in the exits/ package.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from snpemu.abi.addr import Pfn
from snpemu.abi.asid import MAX_SNP_ASID, MIN_SNP_ASID
from snpemu.errors import NotFound, WrongState
from snpemu.kvm import bringup, create, launch, teardown
from snpemu.kvm.config import VmConfig
from snpemu.kvm.gmem import GuestMemfds
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.images import ImageStore
from snpemu.kvm.policy import SVM_SEV_FEAT_DEBUG_SWAP
from snpemu.kvm.ports import PspPort, RmpPort
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.trace import TraceHub
from snpemu.kvm.vm import MemoryModel, Vm

CBIT = 51
DEFAULT_FIRMWARE = "/usr/share/OVMF/OVMF_CODE.fd"


@dataclass
class Counters:
    vmgexits: Counter[str] = field(default_factory=Counter)
    psc_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    psc_pages: Counter[tuple[str, str]] = field(default_factory=Counter)
    guest_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    # exits handed to the VMM, by kvm_run exit reason ("hypercall")
    vmm_exits: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    # Called with each guest request's duration (the metrics histogram).
    observe_request: Callable[[float], None] = lambda _seconds: None


class Kvm:
    def __init__(
        self,
        rmp: RmpPort,
        psp: PspPort,
        *,
        snp: bool = True,
        firmware: str = DEFAULT_FIRMWARE,
        throttle_ms: int = 0,
        throttle_burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        images: ImageStore | None = None,
    ) -> None:
        self.rmp, self.psp = rmp, psp
        # where CreateVm may read images from (kvm/images.py); by default beside the firmware
        self.images = images or ImageStore.beside(firmware)
        # the clock of the per-VM guest-request throttles (seconds; tests drive a fake one)
        self.clock = clock
        self.snp_requested = snp
        self.snp_enabled = False
        self.api: tuple[int, int] = (0, 0)
        self.default_firmware = firmware
        self.default_throttle = (throttle_ms, throttle_burst)
        self.vms: dict[str, Vm] = {}
        self.gmems = GuestMemfds()
        self.free_asids = list(range(MIN_SNP_ASID, MAX_SNP_ASID + 1))
        self.trace = TraceHub()
        self.counters = Counters()
        self.tmr_pfns: list[Pfn] = []
        self.certs_blob = b""
        # KERNEL: arch/x86/kvm/svm/sev.c sev_hardware_setup(): DEBUG_SWAP when SEV-ES is on,
        # the debug_swap parameter is (default true) and the CPU has DEBUG_SWAP and
        # NO_NESTED_DATA_BP. UNVERIFIED(vmsa-features-cpu): the emulated CPU is taken to have both.
        self.supported_vmsa_features = SVM_SEV_FEAT_DEBUG_SWAP
        # DECOMMISSION clears the firmware's WBINVD indicator: it must not fall between the
        # WBINVD and the DF_FLUSH of sev_flush_asids(). KERNEL: arch/x86/kvm/svm/sev.c
        # sev_deactivate_lock, which snp_decommission_context() and sev_flush_asids() both
        # take for writing.
        self.deactivate_lock = asyncio.Lock()
        # CPUID(1).EAX of the host processor, from the chip psp emulates (None until known)
        self.host_signature: int | None = None

    def need_snp(self) -> None:
        if not self.snp_enabled:
            raise WrongState("SNP is not enabled on this host", reason=KvmReason.SNP_DISABLED)

    def vm(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"no VM {vm_id!r}")
        return vm

    def identity(self, vm: Vm, vcpu_id: int) -> VcpuIdentity:
        return VcpuIdentity(vm.vm_id, vcpu_id, vm.asid, vm.vcpus[vcpu_id].token)

    async def bring_up(self) -> None:
        await bringup.bring_up(self)

    async def create_vm(
        self, config: VmConfig, owner: str = "", model: MemoryModel = MemoryModel.V5
    ) -> Vm:
        return await create.create_vm(self, config, owner, model)

    async def launch_vm(self, vm: Vm) -> bytes:
        return await launch.launch_vm(self, vm)

    async def destroy_vm(self, vm: Vm) -> int:
        return await teardown.destroy_vm(self, vm)
