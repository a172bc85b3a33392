"""Platform commands: SNP_INIT/INIT_EX, DF_FLUSH, SHUTDOWN, PLATFORM_STATUS, CONFIG, COMMIT,
FEATURE_INFO, the extended config and legacy SEV init and status.

SPEC: SNP ABI (56860) chapter "Platform Management"; KERNEL: drivers/crypto/ccp/sev-dev.c.
"""

from __future__ import annotations

from snpemu.abi.addr import PAGE_SIZE, PMD_SIZE, Spa, page_aligned, page_bytes
from snpemu.abi.platform_status import PlatformStatus, StatusFlag
from snpemu.abi.rmp import FwOp, PageState
from snpemu.psp.mailbox import API_MAJOR, API_MINOR, BUILD, Mailbox, command
from snpemu.psp.status import SevStatus, fail
from snpemu.psp.tcb import Tcb

TMR_SIZE = PMD_SIZE  # 2 MiB
FW_BLOB_MAX = 0x4000  # SEV_FW_BLOB_MAX_SIZE
SEV_STATUS_FLAGS_CONFIG_ES = 0x100

# SNP_FEATURE_INFO ECX bits (docs/abi.md#feature-info): none of the optional features are emulated.
FEATURE_INFO = (0, 0, 0, 0)


class PlatformCommands(Mailbox):
    @command("SNP_INIT")
    async def snp_init(self) -> None:
        await self._init(hv_fixed=[])

    @command("SNP_INIT_EX")
    async def snp_init_ex(
        self,
        *,
        init_rmp: bool,
        hv_fixed: list[tuple[int, int]],
        rapl_dis: bool = False,
        ciphertext_hiding: bool = False,
    ) -> None:
        if rapl_dis or ciphertext_hiding:
            # SNP_FEATURE_INFO reports neither RAPL_DISABLE nor ciphertext hiding.
            raise fail(SevStatus.INVALID_PARAM, "RAPL_DIS and CIPHERTEXT_HIDING are not supported")
        if not init_rmp:
            raise fail(SevStatus.RMP_INIT_REQUIRED, "INIT_RMP must be set on first initialisation")
        await self._init(hv_fixed=hv_fixed)

    async def _init(self, hv_fixed: list[tuple[int, int]]) -> None:
        if self.snp_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "SNP is already initialised")
        if self.legacy_initialized:
            # Legacy SEV must not run during SNP_INIT. KERNEL: sev-dev.c __sev_snp_init_locked
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "legacy SEV is initialised: SNP first")
        plat = await self.rmp.platform()
        if not plat.snp_capable:
            # UNVERIFIED(iommu-status) code: an IOMMU that is off or passthrough makes SNP
            # unavailable.
            raise fail(SevStatus.INVALID_CONFIG, "the IOMMU is off or in passthrough mode")
        if plat.rmp_covered_bytes < plat.memory_bytes:
            raise fail(SevStatus.RMP_INITIALIZATION_FAILED, "the RMP does not cover all memory")
        spas: list[int] = []
        for base, count in sorted(hv_fixed):
            if not page_aligned(base) or count <= 0:
                raise fail(SevStatus.INVALID_PARAM, f"range {base:#x}+{count} is not page aligned")
            await self._address(base, "HV-fixed range", size=page_bytes(count))
            if spas and base <= spas[-1]:
                # A page listed twice would be made HV-fixed twice.
                # UNVERIFIED(hv-fixed-overlap): the status for it is not from the spec.
                raise fail(SevStatus.INVALID_PARAM, f"range {base:#x}+{count} overlaps another")
            spas += [base + page_bytes(i) for i in range(count)]
        for spa in spas:
            await self._expect(
                spa, PageState.HYPERVISOR, PageState.FIRMWARE, what="HV-fixed range page"
            )
        if spas:
            await self.rmp.transition(spas, FwOp.HV_FIXED)
        self.snp_initialized = True

    @command("SNP_DF_FLUSH")
    async def df_flush(self) -> None:
        self._need_snp()
        # DF_FLUSH needs every core to have executed WBINVD since the last DEACTIVATE (SNP:
        # SNP_DECOMMISSION), else WBINVD_REQUIRED; the host therefore runs WBINVD on all CPUs right
        # before it. KERNEL: arch/x86/kvm/svm/sev.c sev_flush_asids() ("DEACTIVATE will clear the
        # WBINVD indicator causing DF_FLUSH to fail"); drivers/crypto/ccp/sev-dev.c
        # __sev_snp_init_locked(). UNVERIFIED(df-flush-wbinvd): taken from the kernel, not from the
        # SNP ABI spec's SNP_DF_FLUSH section, which was not at hand.
        if not await self.rmp.wbinvd_indicator():
            raise fail(
                SevStatus.WBINVD_REQUIRED,
                "WBINVD has not run on every core since the last SNP_DECOMMISSION",
            )
        self.unflushed.clear()

    @command("SNP_SHUTDOWN")
    async def snp_shutdown(self) -> None:
        await self._shutdown()

    @command("SNP_SHUTDOWN_EX")
    async def snp_shutdown_ex(self, *, iommu: bool, x86: bool) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._need_snp()
        if self.guests:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, f"{len(self.guests)} guest(s) still exist")
        if self.unflushed:
            raise fail(SevStatus.DFFLUSH_REQUIRED, "decommissioned ASIDs await SNP_DF_FLUSH")
        if self.legacy_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "shut legacy SEV down first")
        self.snp_initialized = False

    def status(self) -> PlatformStatus:
        """struct sev_user_data_snp_status. KERNEL: include/uapi/linux/psp-sev.h"""
        flags = StatusFlag.FEATURE_INFO
        if self.mask_chip_id:
            flags |= StatusFlag.MASK_CHIP_ID
        if self.mask_chip_key:
            flags |= StatusFlag.MASK_CHIP_KEY
        return PlatformStatus(
            api_major=API_MAJOR,
            api_minor=API_MINOR,
            state=int(self.platform_state) - 1,
            is_rmp_initialized=self.snp_initialized,
            build_id=BUILD,
            flags=flags,
            guest_count=len(self.guests),
            current_tcb=self.current_tcb.raw,
            reported_tcb=self.reported_tcb.raw,
        )

    def status_bytes(self) -> bytes:
        return self.status().pack()

    @command("SNP_PLATFORM_STATUS")
    async def platform_status(self, status_paddr: Spa) -> bytes:
        await self._address(status_paddr, "status page")
        if self.legacy_initialized and self.tmr <= status_paddr < self.tmr + self.tmr_len:
            # The TMR's pages are in firmware state too, but they are the firmware's own (the
            # SEV-ES save areas it keeps there): a status written over them, and the page then
            # left in reclaim, would take them from under it. UNVERIFIED(status-page-in-tmr):
            # which status the firmware answers is not from the spec.
            raise fail(SevStatus.INVALID_PAGE_STATE, f"status page {status_paddr:#x} is in the TMR")
        if self.snp_initialized:
            # The page must be in firmware state; afterwards it is left in reclaim state.
            # KERNEL: drivers/crypto/ccp/sev-dev.c sev_ioctl_do_snp_platform_status() ("Firmware
            # expects the status page to be in Firmware state, otherwise it will report an
            # error INVALID_PAGE_STATE"; "The status page will be in Reclaim state on success")
            await self._expect(status_paddr, PageState.FIRMWARE, what="status page")
        data = self.status_bytes()
        await self.rmp.write(status_paddr, data)
        if self.snp_initialized:
            await self.rmp.transition([status_paddr], FwOp.RECLAIM)
        return data

    @command("SNP_CONFIG")
    async def config(
        self, *, reported_tcb: Tcb | int, mask_chip_id: bool, mask_chip_key: bool
    ) -> None:
        self._need_snp()
        if isinstance(reported_tcb, int):
            raw = reported_tcb
            reported_tcb = Tcb.from_raw(raw)
            if reported_tcb.raw != raw:
                raise fail(SevStatus.INVALID_PARAM, "reported TCB has non-zero reserved bytes 2-5")
        if not reported_tcb.le(self.current_tcb):
            raise fail(SevStatus.INVALID_PARAM, "reported TCB above the current TCB")
        self.reported_tcb = reported_tcb
        self.mask_chip_id, self.mask_chip_key = mask_chip_id, mask_chip_key

    @command("SNP_COMMIT")
    async def commit(self) -> None:
        self._need_snp()
        self.committed_tcb = self.current_tcb
        self.committed_version = (BUILD, API_MINOR, API_MAJOR)

    @command("SNP_FEATURE_INFO")
    async def feature_info(self, ecx_in: int) -> tuple[int, int, int, int]:
        if ecx_in != 0:
            raise fail(SevStatus.INVALID_PARAM, "only ECX_IN 0 is defined")
        return FEATURE_INFO

    def legacy_status(self) -> tuple[int, int, int, int, int, int]:
        """struct sev_user_data_status: api major/minor, state, flags, build, guest count."""
        state = 1 if self.legacy_initialized else 0
        return (API_MAJOR, API_MINOR, state, SEV_STATUS_FLAGS_CONFIG_ES, BUILD, 0)

    @command("SNP_SET_EXT_CONFIG")
    async def set_ext_config(self, certs_blob: bytes) -> None:
        if len(certs_blob) > FW_BLOB_MAX:
            raise fail(SevStatus.INVALID_LEN, f"certificate blob exceeds {FW_BLOB_MAX} bytes")
        self.certs_blob = certs_blob

    @command("SEV_INIT")
    async def sev_init(self, tmr_paddr: Spa, tmr_len: int) -> None:
        if self.legacy_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "legacy SEV is already initialised")
        # With SNP on, the TMR is 2 MiB of firmware pages. KERNEL: sev-dev.c
        if self.snp_initialized and (tmr_len != TMR_SIZE or tmr_paddr % TMR_SIZE):
            raise fail(SevStatus.INVALID_ADDRESS, "the TMR must be 2 MiB, 2 MiB aligned")
        if tmr_len:
            await self._address(tmr_paddr, "TMR", size=tmr_len)
        if self.snp_initialized:
            for spa in range(tmr_paddr, tmr_paddr + tmr_len, PAGE_SIZE):
                await self._expect(spa, PageState.FIRMWARE, what="TMR page")
        self.legacy_initialized = True
        self.tmr, self.tmr_len = tmr_paddr, tmr_len

    @command("SEV_SHUTDOWN")
    async def sev_shutdown(self) -> None:
        if not self.legacy_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "legacy SEV is not initialised")
        self.legacy_initialized = False
