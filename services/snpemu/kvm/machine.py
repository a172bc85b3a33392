"""kvm: host bring-up and the life of SNP VMs (create, launch as QEMU does, destroy).

Talks to rmp and psp only through their RPCs (peers.py). Exit handling is in exits.py and the
modules it names.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp.common.v1 import handles_pb2, types_pb2
from snp.psp.v1 import psp_pb2
from snp.rmp.v1 import rmp_pb2

from snpemu.abi import cert_table, rmp_batch
from snpemu.cpu import Cpu
from snpemu.errors import InvalidArgument, NotFound, SnpemuError, Unavailable, WrongState
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.vm import PAGE, Run, Vcpu, Vm, VmState, new_vm_id
from snpemu.psp.status import SevStatus, is_state_error
from snpemu.runtime.peers import Peer, PeerError, SessionPool
from snpemu.vmm import launch_plan, vmsa
from snpemu.vmm.ovmf import Ovmf

log = logging.getLogger(__name__)

MIN_API = (1, 51)  # SNP_MIN_API: KERNEL drivers/crypto/ccp/sev-dev.c
MIN_SNP_ASID, MAX_SNP_ASID = 1, 99
CBIT = 51
MAX_RAM = 3 << 30  # RAM sits below the 32-bit hole here; no memory above 4 GiB yet
TMR_PAGES = 512
DEFAULT_FIRMWARE = "/usr/share/OVMF/OVMF_CODE.fd"
VCPU_TYPES = {1: "EPYC", 2: "EPYC-Rome", 3: "EPYC-Milan", 4: "EPYC-Genoa", 5: "EPYC-Turin"}
# KERNEL: arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_* and SNP_POLICY_MASK_VALID (API_MINOR,
# API_MAJOR, SMT, RSVD_MBO, DEBUG, SINGLE_SOCKET)
SNP_POLICY_MASK_RSVD_MBO = 1 << 17
SNP_POLICY_MASK_VALID = 0xFF | 0xFF << 8 | 1 << 16 | SNP_POLICY_MASK_RSVD_MBO | 1 << 19 | 1 << 20
# KERNEL: arch/x86/include/asm/svm.h SVM_SEV_FEAT_*
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5


@dataclass
class TraceEvent:
    name: str
    vm_id: str
    vcpu_id: int
    fields: dict[str, int]
    timestamp_ns: int = field(default_factory=time.time_ns)


class TraceHub:
    """kvm tracepoints: every subscriber gets every event (bounded queues, drops counted)."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[TraceEvent]] = []
        self.dropped = 0

    def emit(self, name: str, vm: Vm, vcpu_id: int, **fields: int) -> None:
        if not self.queues:
            return
        ev = TraceEvent(name, vm.vm_id, vcpu_id, fields)
        for q in self.queues:
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self.dropped += 1

    async def subscribe(self) -> AsyncIterator[TraceEvent]:
        q: asyncio.Queue[TraceEvent] = asyncio.Queue(maxsize=10000)
        self.queues.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.queues.remove(q)


@dataclass
class Counters:
    vmgexits: Counter[str] = field(default_factory=Counter)
    psc_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    psc_pages: Counter[tuple[str, str]] = field(default_factory=Counter)
    guest_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    throttled: int = 0
    # Called with each guest request's duration (the metrics histogram).
    observe_request: Callable[[float], None] = lambda _seconds: None


class Kvm:
    def __init__(
        self,
        rmp: Peer,
        psp: Peer,
        *,
        snp: bool = True,
        firmware: str = DEFAULT_FIRMWARE,
        throttle_ms: int = 0,
        throttle_burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rmp, self.psp = rmp, psp
        # the clock of the per-VM guest-request throttles (seconds; tests drive a fake one)
        self.clock = clock
        self.host = SessionPool(rmp)
        self.snp_requested = snp
        self.snp_enabled = False
        self.api: tuple[int, int] = (0, 0)
        self.default_firmware = firmware
        self.default_throttle = (throttle_ms, throttle_burst)
        self.vms: dict[str, Vm] = {}
        self.free_asids = list(range(MIN_SNP_ASID, MAX_SNP_ASID + 1))
        self.trace = TraceHub()
        self.counters = Counters()
        self.tmr_pfns: list[int] = []
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

    # --- host bring-up ----------------------------------------------------------------------

    async def bring_up(self) -> None:
        """What kvm_amd and the CCP driver do at load: SNP_INIT, SNP_DF_FLUSH, then SEV INIT.

        KERNEL: arch/x86/kvm/svm/sev.c sev_hardware_setup(); drivers/crypto/ccp/sev-dev.c
        """
        if not self.snp_requested:
            log.info("SNP disabled by configuration (like kvm_amd sev_snp=0)")
            return
        plat = await self.rmp.call("GetPlatformInfo", rmp_pb2.GetPlatformInfoRequest())
        if not plat.snp_capable:
            log.warning(
                "SNP unavailable: the IOMMU is off or passthrough", extra={"event": "snp_off"}
            )
            return
        status = await self.psp.call("SevPlatformStatus", psp_pb2.SevPlatformStatusRequest())
        self.api = (status.api_major, status.api_minor)
        if self.api < MIN_API:
            log.warning("SNP unavailable: firmware API %d.%d < 1.51", *self.api)
            return
        # WBINVD, SNP_INIT, WBINVD, SNP_DF_FLUSH: "the following sequence must be issued before
        # launching the first SNP guest to ensure all dirty cache lines are flushed".
        # KERNEL: drivers/crypto/ccp/sev-dev.c __sev_snp_init_locked()
        await self.rmp.call("Wbinvd", rmp_pb2.WbinvdRequest())
        try:
            await self.psp.call("SnpInit", psp_pb2.SnpInitRequest())
        except PeerError as e:
            if e.reason != "INVALID_PLATFORM_STATE":  # already initialised (kvm restarted)
                raise
        await self.rmp.call("Wbinvd", rmp_pb2.WbinvdRequest())
        await self.psp.call("SnpDfFlush", psp_pb2.SnpDfFlushRequest())
        await self._legacy_init()
        await self._publish_certificates()
        self.snp_enabled = True
        log.info("SNP enabled: firmware API %d.%d", *self.api, extra={"event": "snp_on"})

    async def _legacy_init(self) -> None:
        """Legacy SEV INIT with a 2 MiB TMR of firmware pages (needed once SNP is on)."""
        status = await self.psp.call("SevPlatformStatus", psp_pb2.SevPlatformStatusRequest())
        if status.state != psp_pb2.PLATFORM_STATE_UNINIT:
            return
        pfns = list(
            (
                await self.rmp.call(
                    "AllocatePages",
                    rmp_pb2.AllocatePagesRequest(
                        count=TMR_PAGES, placement=rmp_pb2.PLACEMENT_ALIGNED_2M
                    ),
                )
            ).pfns
        )
        await self._to_firmware(pfns)
        self.tmr_pfns = pfns
        await self.psp.call(
            "SevInit", psp_pb2.SevInitRequest(tmr_paddr=pfns[0] << 12, tmr_len=TMR_PAGES * PAGE)
        )

    async def _publish_certificates(self) -> None:
        """The certificate table extended guest requests return (VCEK, ASK, ARK)."""
        c = await self.psp.call("GetCertificates", psp_pb2.GetCertificatesRequest())
        # The host CPU is the chip psp emulates, as the VCEK names it (productName, e.g.
        # Milan-B1); a vCPU of the host's own model sees its stepping (vmsa.vcpu_signature).
        try:
            self.host_signature = Cpu.from_product_name(c.product_name).signature
        except InvalidArgument as e:
            log.warning("host CPU unknown (%s): vCPUs keep their models' signatures", e.message)
        self.certs_blob = cert_table.build(
            [
                (cert_table.VCEK, c.vcek_der),
                (cert_table.ASK, c.ask_der),
                (cert_table.ARK, c.ark_der),
            ]
        )
        await self.psp.call(
            "SetExtendedConfig", psp_pb2.SetExtendedConfigRequest(certs_blob=self.certs_blob)
        )

    def _need_snp(self) -> None:
        if not self.snp_enabled:
            raise WrongState("SNP is not enabled on this host", reason="SNP_DISABLED")

    # --- rmp helpers --------------------------------------------------------------------------

    async def _rmpupdate(
        self,
        spa: int,
        *,
        gpa: int = 0,
        assigned: bool,
        asid: int = 0,
        immutable: bool = False,
        size_2m: bool = False,
    ) -> int:
        r = await self.rmp.call(
            "RmpUpdate",
            rmp_pb2.RmpUpdateRequest(
                spa=spa,
                state=rmp_pb2.RmpState(
                    gpa=gpa,
                    assigned=assigned,
                    asid=asid,
                    immutable=immutable,
                    page_size=types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K,
                ),
            ),
        )
        return int(r.eax)

    async def _npt(
        self, vm: Vm, map_runs: Sequence[Run] = (), unmap_runs: Sequence[Run] = ()
    ) -> None:
        """Program the VM's nested page table in rmp (memslot runs mapped or unmapped)."""

        def mappings(runs: Sequence[Run]) -> list[rmp_pb2.NptMapping]:
            return [
                rmp_pb2.NptMapping(gpa=r.gpa, first_pfn=r.first_pfn, npages=r.npages) for r in runs
            ]

        await self.rmp.call(
            "UpdateNestedPageTable",
            rmp_pb2.UpdateNestedPageTableRequest(
                vm=handles_pb2.VmHandle(id=vm.vm_id),
                asid=vm.asid,
                map=mappings(map_runs),
                unmap=mappings(unmap_runs),
            ),
        )

    async def _to_firmware(self, pfns: list[int]) -> None:
        for pfn in pfns:
            eax = await self._rmpupdate(pfn << 12, assigned=True, immutable=True)
            if eax:
                raise Unavailable(f"RMPUPDATE of PFN {pfn:#x} to firmware failed: {eax}")

    async def _firmware_page(self) -> int:
        (pfn,) = (
            await self.rmp.call(
                "AllocatePages",
                rmp_pb2.AllocatePagesRequest(count=1, placement=rmp_pb2.PLACEMENT_SNP_SAFE),
            )
        ).pfns
        await self._to_firmware([pfn])
        return int(pfn) << 12

    # --- VM lifecycle ---------------------------------------------------------------------------

    def vm(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"no VM {vm_id!r}")
        return vm

    async def create_vm(self, config: Any) -> Vm:
        """KVM_CREATE_VM(KVM_X86_SNP_VM) + KVM_SEV_INIT2: an ASID, memslots, vCPUs."""
        self._need_snp()
        mem, vcpus = config.memory_bytes, config.vcpus
        if not 16 << 20 <= mem <= MAX_RAM or mem % (2 << 20):
            raise InvalidArgument("memory_bytes must be a multiple of 2 MiB in 16 MiB..3 GiB")
        if not 1 <= vcpus <= 64:
            raise InvalidArgument("vcpus must be in 1..64")
        # UNVERIFIED(policy-at-create): KVM checks the policy in snp_launch_start(); it is part
        # of the VM's config here, so it is checked when the VM is made and a bad one creates
        # nothing.
        check_policy(config.policy or 0x30000)
        vmsa_features = check_vmsa_features(config.guest_features, self.supported_vmsa_features)
        if config.vcpu_type and config.vcpu_type not in VCPU_TYPES:
            raise InvalidArgument(f"unknown vcpu_type {config.vcpu_type}")
        if config.host_data and len(config.host_data) != 32:
            raise InvalidArgument("host_data is 32 bytes")
        firmware = config.firmware_path or self.default_firmware
        if not Path(firmware).is_file():
            raise InvalidArgument(f"firmware image {firmware} not found (install Debian's ovmf)")
        if not self.free_asids:
            raise WrongState("no SNP ASID left (all in use)", reason="ASID_EXHAUSTED")
        asid = self.free_asids.pop(0)
        t = config.throttle
        throttle = (
            Throttle(t.interval_ms, t.burst or 1, clock=self.clock)
            if t.interval_ms
            else Throttle(*self.default_throttle, clock=self.clock)
        )
        # KERNEL: arch/x86/kvm/svm/sev.c __sev_guest_init(): SNP_ACTIVE ORed in for KVM_X86_SNP_VM
        vm = Vm(
            new_vm_id(),
            asid,
            config,
            throttle,
            sev_features=vmsa_features | SVM_SEV_FEAT_SNP_ACTIVE,
        )
        vm.cpuid_signature = vmsa.vcpu_signature(
            VCPU_TYPES.get(config.vcpu_type or 3, "EPYC-Milan"), self.host_signature
        )
        try:
            ram = list(
                (
                    await self.rmp.call(
                        "AllocatePages",
                        rmp_pb2.AllocatePagesRequest(
                            count=mem // PAGE, placement=rmp_pb2.PLACEMENT_ALIGNED_2M
                        ),
                    )
                ).pfns
            )
            runs = vm.memslots.add(0, ram)
            await self._npt(vm, map_runs=runs)
            for i in range(vcpus):
                vm.vcpus[i] = Vcpu(i, secrets.token_bytes(32), runnable=(i == 0))
                await self.rmp.call(
                    "RegisterVcpuIdentity",
                    rmp_pb2.RegisterVcpuIdentityRequest(identity=self.identity(vm, i)),
                )
        except Exception:
            self.free_asids.insert(0, asid)
            raise
        self.vms[vm.vm_id] = vm
        log.info(
            "created %s: ASID %d, %d MiB, %d vCPUs",
            vm.vm_id,
            asid,
            mem >> 20,
            vcpus,
            extra={"event": "vm_created"},
        )
        return vm

    def identity(self, vm: Vm, vcpu_id: int) -> handles_pb2.VcpuIdentity:
        return handles_pb2.VcpuIdentity(
            vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=vm.vm_id), vcpu_id=vcpu_id),
            asid=vm.asid,
            vmpl=0,
            token=vm.vcpus[vcpu_id].token,
        )

    async def launch_vm(self, vm: Vm) -> bytes:
        """What QEMU does for an SNP guest (target/i386/sev.c) over KVM's ioctls."""
        if vm.state != VmState.CREATED:
            raise WrongState(f"{vm.vm_id} is {vm.state.name}, not CREATED", reason="VM_STATE")
        if vm.gctx:
            # KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start(): "Don't allow userspace to
            # allocate memory for more than 1 SNP context" (-EINVAL). A launch that failed after
            # LAUNCH_START keeps its context and pages until the VM is destroyed.
            raise WrongState(
                f"{vm.vm_id} has a guest context from a launch that failed: destroy it",
                reason="LAUNCH_STARTED",
            )
        vm.state = VmState.LAUNCHING
        try:
            return await self._launch(vm)
        except PeerError as e:
            vm.state = VmState.CREATED
            if e.fw_status is None:
                raise
            raise firmware_failure(e) from None
        except BaseException:
            vm.state = VmState.CREATED
            raise

    async def _launch(self, vm: Vm) -> bytes:
        cfg: Any = vm.config
        # QEMU target/i386/sev.c sev_common_kvm_init(): launch_start comes before any guest
        # memory is filled, so a policy the firmware refuses costs nothing else.
        await self._launch_start(vm, cfg.policy or 0x30000)
        ovmf = Ovmf.load(cfg.firmware_path or self.default_firmware)
        fw_pfns = list(
            (
                await self.rmp.call(
                    "AllocatePages",
                    rmp_pb2.AllocatePagesRequest(
                        count=len(ovmf.data) // PAGE, placement=rmp_pb2.PLACEMENT_ANY
                    ),
                )
            ).pfns
        )
        runs = vm.memslots.add(ovmf.gpa, fw_pfns)
        await self._npt(vm, map_runs=runs)
        kernel_hashes = None
        if cfg.kernel_path:
            kernel = Path(cfg.kernel_path).read_bytes()
            initrd = Path(cfg.initrd_path).read_bytes() if cfg.initrd_path else b""
            kernel_hashes = launch_plan.kernel_hashes_table(kernel, initrd, cfg.cmdline)
        pages = launch_plan.plan(
            ovmf,
            vcpus=len(vm.vcpus),
            vcpu_signature=vm.cpuid_signature,
            sev_features=vm.sev_features,
            kernel_hashes=kernel_hashes,
        )
        vmsa_count = sum(p.page_type == launch_plan.VMSA for p in pages)
        vm.vmsa_pages = [
            int(pfn) << 12
            for pfn in (
                await self.rmp.call(
                    "AllocatePages",
                    rmp_pb2.AllocatePagesRequest(
                        count=vmsa_count, placement=rmp_pb2.PLACEMENT_SNP_SAFE
                    ),
                )
            ).pfns
        ]
        vmsas = iter(vm.vmsa_pages)
        spas: list[int] = []
        for page in pages:
            spa = (
                next(vmsas)
                if page.page_type == launch_plan.VMSA
                else vm.memslots.translate(page.gpa)
            )
            if spa is None:
                raise InvalidArgument(f"launch page at GPA {page.gpa:#x} is outside guest memory")
            spas.append(spa)
        await self._place_all(vm, pages, spas)
        fin = await self.psp.call(
            "LaunchFinish",
            psp_pb2.LaunchFinishRequest(
                gctx=handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx),
                id_block=cfg.id_block,
                id_auth=cfg.id_auth,
                id_block_en=bool(cfg.id_block),
                auth_key_en=cfg.author_key_en,
                vcek_disabled=cfg.vcek_disabled,
                host_data=cfg.host_data,
            ),
        )
        vm.bounce_req = (await self._alloc(1))[0]
        vm.bounce_res = await self._firmware_page()
        vm.measurement = bytes(fin.measurement)
        vm.state = VmState.RUNNING
        log.info(
            "launched %s: measurement %s",
            vm.vm_id,
            vm.measurement.hex(),
            extra={"event": "vm_launched"},
        )
        return vm.measurement

    async def _launch_start(self, vm: Vm, policy: int) -> None:
        """snp_launch_start(): a context page, SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE;
        if the firmware refuses either of the last two, the context is decommissioned and its
        page freed (KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start() e_free_context)."""
        vm.gctx = await self._firmware_page()
        gctx = handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx)
        await self.psp.call("GctxCreate", psp_pb2.GctxCreateRequest(gctx_paddr=vm.gctx))
        try:
            await self.psp.call("LaunchStart", psp_pb2.LaunchStartRequest(gctx=gctx, policy=policy))
            await self.psp.call("Activate", psp_pb2.ActivateRequest(gctx=gctx, asid=vm.asid))
        except PeerError:
            await self._decommission_context(vm)
            raise

    async def _decommission_context(self, vm: Vm) -> None:
        """snp_decommission_context(): SNP_DECOMMISSION, then the context page back to the host
        (snp_free_firmware_page() reclaims it; a page that will not come back is leaked)."""
        await self._decommission(vm)
        spa, vm.gctx = vm.gctx, 0
        if await self._reclaim(spa):
            await self.rmp.call("FreePages", rmp_pb2.FreePagesRequest(pfns=[spa >> 12]))
        else:
            await self.rmp.call(
                "LeakPages",
                rmp_pb2.LeakPagesRequest(pfns=[spa >> 12], reason=f"context of {vm.vm_id}"),
            )

    async def _decommission(self, vm: Vm) -> None:
        """SNP_DECOMMISSION under the deactivate lock: it clears the firmware's WBINVD
        indicator, so it must not fall between sev_flush_asids()' WBINVD and DF_FLUSH.
        KERNEL: arch/x86/kvm/svm/sev.c snp_decommission_context(), which takes
        sev_deactivate_lock for writing around it."""
        async with self.deactivate_lock:
            await self.psp.call(
                "Decommission",
                psp_pb2.DecommissionRequest(
                    gctx=handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx)
                ),
            )

    async def _alloc(self, count: int) -> list[int]:
        r = await self.rmp.call(
            "AllocatePages",
            rmp_pb2.AllocatePagesRequest(count=count, placement=rmp_pb2.PLACEMENT_ANY),
        )
        return [int(p) << 12 for p in r.pfns]

    async def _place_all(
        self, vm: Vm, pages: list[launch_plan.LaunchPage], spas: list[int]
    ) -> None:
        """Check every page is shared, write the contents, make them pre-guest, then
        SNP_LAUNCH_UPDATE each in launch order (the order the digest depends on)."""
        taken = await self._assigned_entries([s >> 12 for s in spas])
        if taken:
            pfn, state = next(iter(taken.items()))
            name = types_pb2.PageState.Name(types_pb2.PageState.ValueType(state))
            raise WrongState(
                f"page {pfn << 12:#x} is not shared ({name})", reason="PAGE_NOT_SHARED"
            )
        for page, spa in zip(pages, spas, strict=True):
            if page.data:
                await self.rmp.call(
                    "HostWrite",
                    rmp_pb2.HostWriteRequest(
                        spa=spa, data=page.data, origin=rmp_pb2.ACCESS_ORIGIN_USER, writer="vmm"
                    ),
                )
        entries = rmp_batch.pack(
            spas, gpa=[page.gpa for page in pages], assigned=True, asid=vm.asid, immutable=True
        )
        codes = (
            await self.rmp.call("RmpUpdateBatch", rmp_pb2.RmpUpdateBatchRequest(entries=entries))
        ).codes
        if any(codes):
            raise Unavailable(f"RMPUPDATE to pre-guest failed: codes {sorted(set(codes))}")
        gctx = handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx)
        for page, spa in zip(pages, spas, strict=True):
            await self.psp.call(
                "LaunchUpdate",
                psp_pb2.LaunchUpdateRequest(
                    gctx=gctx,
                    address=spa,
                    page_type=psp_pb2.PageType.ValueType(page.page_type),
                    page_size=types_pb2.PAGE_SIZE_4K,
                ),
            )

    async def destroy_vm(self, vm: Vm) -> int:
        """sev_vm_destroy(): DECOMMISSION, reclaim, every page back to hypervisor state, frames
        freed, ASID freed after DF_FLUSH. Pages that fail are leaked (never reused)."""
        leaked: list[int] = []
        if vm.gctx:
            try:
                await self._decommission(vm)
            except PeerError as e:
                log.warning("DECOMMISSION of %s failed: %s", vm.vm_id, e.message)
        firmware_pages = [p for p in (vm.gctx, vm.bounce_res) if p]
        for spa in firmware_pages:
            if not await self._reclaim(spa):
                leaked.append(spa >> 12)
        pfns = vm.memslots.pfns() + [s >> 12 for s in vm.vmsa_pages]
        if vm.bounce_req:
            pfns.append(vm.bounce_req >> 12)
        failed = await self._all_shared(pfns)
        leaked += failed
        failed_set = set(failed)
        free = [p for p in pfns if p not in failed_set]
        free += [s >> 12 for s in firmware_pages if s >> 12 not in leaked]
        await self._npt(vm, unmap_runs=vm.memslots.runs)
        for vcpu_id in vm.vcpus:
            await self.rmp.call(
                "RevokeVcpuIdentity",
                rmp_pb2.RevokeVcpuIdentityRequest(identity=self.identity(vm, vcpu_id)),
            )
        if leaked:
            await self.rmp.call(
                "LeakPages", rmp_pb2.LeakPagesRequest(pfns=leaked, reason=f"teardown of {vm.vm_id}")
            )
        for i in range(0, len(free), 65536):
            await self.rmp.call("FreePages", rmp_pb2.FreePagesRequest(pfns=free[i : i + 65536]))
        # wbinvd_on_all_cpus(), then SNP_DF_FLUSH, with no DECOMMISSION in between. KERNEL:
        # arch/x86/kvm/svm/sev.c sev_flush_asids(). UNVERIFIED(flush-every-destroy): KVM flushes
        # lazily, when sev_asid_new() finds no free ASID (__sev_recycle_asids()) and at module
        # unload (sev_hardware_unsetup()); kvm here flushes at every VM destroy.
        async with self.deactivate_lock:
            await self.rmp.call("Wbinvd", rmp_pb2.WbinvdRequest())
            await self.psp.call("SnpDfFlush", psp_pb2.SnpDfFlushRequest())
        self.free_asids.append(vm.asid)
        vm.state = VmState.DESTROYED
        del self.vms[vm.vm_id]
        log.info(
            "destroyed %s: %d pages leaked", vm.vm_id, len(leaked), extra={"event": "vm_destroyed"}
        )
        return len(leaked)

    async def _reclaim(self, spa: int) -> bool:
        try:
            await self.psp.call(
                "PageReclaim",
                psp_pb2.PageReclaimRequest(paddr=spa, page_size=types_pb2.PAGE_SIZE_4K),
            )
        except PeerError as e:
            if e.reason != "INVALID_PAGE_STATE":
                return False
        return await self._make_shared(spa >> 12)

    async def _assigned_entries(self, pfns: list[int], sizes: bool = False) -> dict[int, int]:
        """The pages among pfns not in hypervisor state: pfn -> state (or page size)."""
        out: dict[int, int] = {}
        wanted = set(pfns)
        for first, count in _ranges(sorted(wanted)):
            for off in range(0, count, 4096):
                r = await self.rmp.call(
                    "ListRmpEntries",
                    rmp_pb2.ListRmpEntriesRequest(
                        first_pfn=first + off, count=min(4096, count - off), non_default_only=True
                    ),
                )
                for e in r.entries:
                    if e.state != types_pb2.PAGE_STATE_HYPERVISOR and e.pfn in wanted:
                        out[e.pfn] = e.page_size if sizes else e.state
        return out

    async def _make_shared(self, pfn: int) -> bool:
        return not await self._all_shared([pfn])

    async def _all_shared(self, pfns: list[int]) -> list[int]:
        """RMPUPDATE every assigned page among pfns back to shared (PSMASH 2M entries first);
        returns the pages that would not go back."""
        sizes = await self._assigned_entries(pfns, sizes=True)
        assigned = sorted(sizes)
        heads = {p & ~511 for p, size in sizes.items() if size == types_pb2.PAGE_SIZE_2M}
        for head in sorted(heads):
            for _ in range(8):
                r = await self.rmp.call("Psmash", rmp_pb2.PsmashRequest(spa=head << 12))
                if r.eax != 3:  # KVM retries while FAIL_INUSE
                    break
        failed: list[int] = []
        for i in range(0, len(assigned), 65536):
            chunk = assigned[i : i + 65536]
            packed = rmp_batch.pack([p << 12 for p in chunk])
            reply = await self.rmp.call(
                "RmpUpdateBatch", rmp_pb2.RmpUpdateBatchRequest(entries=packed)
            )
            failed += [p for p, c in zip(chunk, reply.codes, strict=True) if c]
        return failed


def check_policy(policy: int) -> None:
    """The guest policy checks KVM makes before the firmware sees it; SMT and SINGLE_SOCKET
    are the firmware's to refuse (SPEC: SNP ABI, SNP_LAUNCH_START and SNP_ACTIVATE).
    KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start() (-EINVAL for either)."""
    if policy & ~SNP_POLICY_MASK_VALID:
        raise InvalidArgument(
            f"policy {policy:#x} sets bits {policy & ~SNP_POLICY_MASK_VALID:#x} KVM does not "
            f"support (SNP_POLICY_MASK_VALID is {SNP_POLICY_MASK_VALID:#x})",
            reason="POLICY_UNSUPPORTED",
        )
    if not policy & SNP_POLICY_MASK_RSVD_MBO:
        raise InvalidArgument(
            f"policy {policy:#x}: bit 17 (reserved, must be one) is zero", reason="POLICY_MBO"
        )


def check_vmsa_features(requested: int, supported: int) -> int:
    """KVM_SEV_INIT2's vmsa_features: the VM's SEV_FEATURES without SNP_ACTIVE.

    A bit outside sev_supported_vmsa_features is -EINVAL (KERNEL: arch/x86/kvm/svm/sev.c
    __sev_guest_init()). SNP_ACTIVE is not among them: QEMU clears it before the ioctl and
    KVM sets it again (QEMU target/i386/sev.c sev_common_kvm_init()), so it is accepted here
    and ignored.
    """
    features = requested & ~SVM_SEV_FEAT_SNP_ACTIVE
    if features & ~supported:
        raise InvalidArgument(
            f"guest_features {requested:#x}: bits {features & ~supported:#x} are not in the "
            f"VMSA features this host supports ({supported | SVM_SEV_FEAT_SNP_ACTIVE:#x})",
            reason="VMSA_FEATURES_UNSUPPORTED",
        )
    return features


def firmware_failure(e: PeerError) -> SnpemuError:
    """A firmware command's failure as the caller's error: the SEV status name and fw_status
    as the psp reported them, in the category the firmware model gives that status (KVM hands
    the firmware's status back in kvm_sev_cmd.error; KERNEL: arch/x86/kvm/svm/sev.c
    __sev_issue_cmd())."""
    assert e.fw_status is not None  # INVARIANT: the caller checked
    try:
        state = is_state_error(SevStatus(e.fw_status))
    except ValueError:
        state = True  # a status this firmware model does not know: not the caller's input
    cls: type[SnpemuError] = WrongState if state else InvalidArgument
    return cls(e.message, reason=e.reason, metadata=e.metadata)


def _ranges(pfns: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
