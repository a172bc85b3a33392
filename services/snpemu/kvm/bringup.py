"""What kvm_amd and the CCP driver do at load: SNP_INIT, SNP_DF_FLUSH, the legacy SEV INIT, and
the certificate table extended guest requests return."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from snpemu.abi import cert_table
from snpemu.abi.addr import Pfn, page_bytes, pfn_to_spa
from snpemu.abi.platform_status import PlatformState
from snpemu.abi.rmp import PageState, Placement
from snpemu.cpu import Cpu
from snpemu.errors import InvalidArgument
from snpemu.kvm.pages import LIST_MAX, release_firmware_pages, to_firmware
from snpemu.kvm.tmr_record import TmrRecord
from snpemu.kvm.undo import Undo
from snpemu.psp.status import SevStatus
from snpemu.runtime.peers import PeerError

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)

MIN_API = (1, 51)  # SNP_MIN_API: KERNEL drivers/crypto/ccp/sev-dev.c
TMR_PAGES = 512


async def bring_up(
    kvm: Kvm,
    *,
    tmr_record: TmrRecord | None = None,
    after_snp_init: Callable[[Kvm], Awaitable[object]] | None = None,
) -> None:
    """SNP_INIT, SNP_DF_FLUSH, then SEV INIT. `after_snp_init` runs once SNP is up again, before
    the TMR is taken (the recovery from a firmware reset takes the old VMs' pages back there).

    KERNEL: arch/x86/kvm/svm/sev.c sev_hardware_setup(); drivers/crypto/ccp/sev-dev.c
    """
    if not kvm.snp_requested:
        log.info("SNP disabled by configuration (like kvm_amd sev_snp=0)")
        return
    plat = await kvm.rmp.platform_info()
    if not plat.snp_capable:
        log.warning("SNP unavailable: the IOMMU is off or passthrough", extra={"event": "snp_off"})
        return
    status = await kvm.psp.platform_status()
    kvm.api = (status.api_major, status.api_minor)
    if kvm.api < MIN_API:
        log.warning("SNP unavailable: firmware API %d.%d < 1.51", *kvm.api)
        return
    # WBINVD, SNP_INIT, WBINVD, SNP_DF_FLUSH: "the following sequence must be issued before
    # launching the first SNP guest to ensure all dirty cache lines are flushed".
    # KERNEL: drivers/crypto/ccp/sev-dev.c __sev_snp_init_locked()
    await kvm.rmp.wbinvd()
    try:
        await kvm.psp.snp_init()
    except PeerError as e:
        if (
            SevStatus.from_reason(e.reason) is not SevStatus.INVALID_PLATFORM_STATE
        ):  # already initialised (kvm restarted)
            raise
    await kvm.rmp.wbinvd()
    await kvm.psp.snp_df_flush()
    if after_snp_init is not None:
        await after_snp_init(kvm)
    await legacy_init(kvm, tmr_record)
    await publish_certificates(kvm)
    kvm.snp_enabled = True
    log.info("SNP enabled: firmware API %d.%d", *kvm.api, extra={"event": "snp_on"})


async def legacy_init(kvm: Kvm, tmr_record: TmrRecord | None = None) -> None:
    """Legacy SEV INIT with a 2 MiB TMR of firmware pages (needed once SNP is on). A failure
    takes the TMR back, so that the retried bring-up does not lose it.

    A TMR from before (this kvm's, or the one a previous kvm recorded): kept while the
    firmware is initialised (it still uses it), reclaimed and freed once the firmware was
    reset (it no longer does), so that there is one TMR, never a second one beside a lost
    first. KERNEL: drivers/crypto/ccp/sev-dev.c __sev_platform_init_locked() allocates
    sev_es_tmr once and keeps it across SEV_SHUTDOWN/INIT; snp_free_firmware_page() (leaking
    a page that will not come back) for the one of a reset firmware."""
    status = await kvm.psp.platform_status()
    previous = kvm.tmr_pfns
    if not previous and tmr_record is not None:
        recorded = tmr_record.load()
        previous = recorded if recorded and await _firmware_pages(kvm, recorded) else []
    if status.state != PlatformState.UNINIT:
        kvm.tmr_pfns = previous
        return
    if previous:
        log.warning(
            "the firmware was reset: its TMR at PFN %#x goes back to the host",
            previous[0],
            extra={"event": "tmr_released"},
        )
        kvm.tmr_pfns = []
        await release_firmware_pages(
            kvm.rmp, kvm.psp, [pfn_to_spa(p) for p in previous], "the TMR of a reset firmware"
        )
    if tmr_record is not None:
        tmr_record.clear()
    pfns = await kvm.rmp.allocate(TMR_PAGES, Placement.ALIGNED_2M)
    async with Undo() as undo:
        spas = [pfn_to_spa(p) for p in pfns]
        undo.push("the TMR", lambda: release_firmware_pages(kvm.rmp, kvm.psp, spas, "the TMR"))
        await to_firmware(kvm.rmp, pfns)
        await kvm.psp.sev_init(pfn_to_spa(pfns[0]), page_bytes(TMR_PAGES))
        undo.commit()
    kvm.tmr_pfns = pfns
    if tmr_record is not None:
        tmr_record.save(pfns)


async def _firmware_pages(kvm: Kvm, pfns: list[Pfn]) -> bool:
    """Whether every page is in firmware state (a recorded TMR still given to a firmware)."""
    seen = 0
    for off in range(0, len(pfns), LIST_MAX):
        count = min(LIST_MAX, len(pfns) - off)
        try:
            entries = await kvm.rmp.read_entries(pfns[off], count)
        except PeerError:  # beyond this host's memory: not a TMR of this host
            return False
        seen += sum(1 for e in entries if e.state == PageState.FIRMWARE)
    return seen == len(pfns)


async def publish_certificates(kvm: Kvm) -> None:
    """The certificate table extended guest requests return (VCEK, ASK, ARK)."""
    c = await kvm.psp.get_certificates()
    # The host CPU is the chip psp emulates, as the VCEK names it (productName, e.g.
    # Milan-B1); a vCPU of the host's own model sees its stepping (vmsa.vcpu_signature).
    try:
        kvm.host_signature = Cpu.from_product_name(c.product_name).signature
    except InvalidArgument as e:
        log.warning("host CPU unknown (%s): vCPUs keep their models' signatures", e.message)
    kvm.certs_blob = cert_table.build(
        [
            (cert_table.VCEK, c.vcek_der),
            (cert_table.ASK, c.ask_der),
            (cert_table.ARK, c.ark_der),
        ]
    )
    await kvm.psp.set_extended_config(kvm.certs_blob)
