"""The AMD-SP firmware: platform state, guest contexts, launch, guest messages.

One command at a time (the PSP mailbox is serial). A failing command raises FirmwareError and
changes nothing: every check runs before the first change. Memory and the RMP are reached only
through the RmpPort. SPEC: SNP ABI (56860); KERNEL: drivers/crypto/ccp/sev-dev.c,
arch/x86/kvm/svm/sev.c for how the host drives each command.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import secrets
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from snpemu.abi import guest_message as gm
from snpemu.abi.rmp import FwOp, PageState
from snpemu.psp import report as rpt
from snpemu.psp.guest import (
    FIELD_GUEST_SVN,
    FIELD_TCB_VERSION,
    POLICY_DEBUG,
    POLICY_SINGLE_SOCKET,
    GuestContext,
    GuestState,
    check_cpuid,
    check_policy,
    derive_key,
    new_vmpcks,
    secrets_page,
    tcb_le,
    verify_id,
)
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.rmp_port import RmpPort
from snpemu.psp.status import FirmwareError, SevStatus, fail
from snpemu.psp.tcb import Tcb
from snpemu.psp.topology import Topology
from snpemu.rmp.entry import VMSA_GPA

P = ParamSpec("P")
T = TypeVar("T")

API_MAJOR, API_MINOR, BUILD = 1, 55, 21
MIN_SNP_ASID, MAX_SNP_ASID = 1, 99  # SNP/SEV-ES ASIDs are 1..min_sev_asid-1 (CPUID 0x8000001F)
TMR_SIZE = 2 << 20
FW_BLOB_MAX = 0x4000  # SEV_FW_BLOB_MAX_SIZE
MAX_PAGES_PER_CALL = 512

# SNP_FEATURE_INFO ECX bits (docs/abi.md#feature-info): none of the optional features are emulated.
FEATURE_INFO = (0, 0, 0, 0)


class PlatformState(enum.IntEnum):
    """enum sev_state + 1 (matches snp.psp.v1.PlatformState)."""

    UNINIT = 1
    INIT = 2
    WORKING = 3


class PageType(enum.IntEnum):
    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6


@dataclass
class Stats:
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    durations: dict[str, list[float]] = field(default_factory=dict)


def command(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Serialise a firmware command and count it by status (snp_psp_commands_total)."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            fw: Firmware = args[0]  # type: ignore[assignment]
            status = SevStatus.SUCCESS.name
            start = time.perf_counter()
            async with fw.lock:
                try:
                    return await fn(*args, **kwargs)
                except FirmwareError as e:
                    status = e.status.name
                    raise
                except Exception:
                    status = "ERROR"
                    raise
                finally:
                    fw.stats.commands[(name, status)] += 1
                    if fw.on_command is not None:
                        fw.on_command(name, status, time.perf_counter() - start)

        return run

    return wrap


def _page(spa: int, what: str = "address") -> int:
    if spa & 0xFFF:
        raise fail(SevStatus.INVALID_ADDRESS, f"{what} {spa:#x} is not page aligned")
    return spa


class Firmware:
    def __init__(
        self, identity: ChipIdentity, rmp: RmpPort, topology: Topology | None = None
    ) -> None:
        self.id = identity
        self.rmp = rmp
        self.topology = topology or Topology()
        self.lock = asyncio.Lock()
        self.stats = Stats()
        self.on_command: Callable[[str, str, float], None] | None = None
        self.snp_initialized = False
        self.legacy_initialized = False
        self.tmr = 0
        self.current_tcb = identity.product.tcb
        self.reported_tcb = identity.product.tcb
        self.committed_tcb = identity.product.tcb
        self.committed_version = (BUILD, API_MINOR, API_MAJOR)
        self.mask_chip_id = False
        self.mask_chip_key = False
        self.certs_blob = b""
        self.guests: dict[int, GuestContext] = {}
        self.asids: dict[int, int] = {}  # ASID -> gctx_paddr
        self.unflushed: set[int] = set()  # ASIDs decommissioned, awaiting SNP_DF_FLUSH

    # --- state helpers -------------------------------------------------------------------------

    @property
    def platform_state(self) -> PlatformState:
        if not self.snp_initialized:
            return PlatformState.UNINIT
        return PlatformState.WORKING if self.guests else PlatformState.INIT

    def _need_snp(self) -> None:
        if not self.snp_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "SNP is not initialised (SNP_INIT first)")

    def _guest(self, gctx_paddr: int, *states: GuestState) -> GuestContext:
        self._need_snp()
        ctx = self.guests.get(gctx_paddr)
        if ctx is None:
            raise fail(SevStatus.INVALID_GUEST, f"no guest context at {gctx_paddr:#x}")
        if states and ctx.state not in states:
            want = " or ".join(s.name for s in states)
            raise fail(
                SevStatus.INVALID_GUEST_STATE, f"guest is {ctx.state.name}, command needs {want}"
            )
        return ctx

    async def _expect(self, spa: int, *states: PageState, what: str = "page") -> Any:
        page = await self.rmp.page(spa)
        if page.state not in states:
            want = " or ".join(s.name for s in states)
            raise fail(
                SevStatus.INVALID_PAGE_STATE, f"{what} {spa:#x} is {page.state.name}, not {want}"
            )
        return page

    # --- platform ---------------------------------------------------------------------------

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
        spas = []
        for base, count in hv_fixed:
            if base & 0xFFF or count <= 0:
                raise fail(SevStatus.INVALID_PARAM, f"range {base:#x}+{count} is not page aligned")
            spas += [base + i * 4096 for i in range(count)]
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

    def status_bytes(self) -> bytes:
        """struct sev_user_data_snp_status (0x20 bytes). KERNEL: include/uapi/linux/psp-sev.h"""
        flags = int(self.mask_chip_id) | int(self.mask_chip_key) << 1 | 1 << 3  # feature_info
        return struct.pack(
            "<BBBBIIIQQ",
            API_MAJOR,
            API_MINOR,
            int(self.platform_state) - 1,
            int(self.snp_initialized),
            BUILD,
            flags,
            len(self.guests),
            self.current_tcb.raw,
            self.reported_tcb.raw,
        )

    @command("SNP_PLATFORM_STATUS")
    async def platform_status(self, status_paddr: int) -> bytes:
        _page(status_paddr, "status page")
        if self.snp_initialized:
            # The page must be firmware-owned; afterwards it is left in reclaim state.
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
        return (API_MAJOR, API_MINOR, state, 0x100, BUILD, 0)  # SEV_STATUS_FLAGS_CONFIG_ES

    @command("SNP_SET_EXT_CONFIG")
    async def set_ext_config(self, certs_blob: bytes) -> None:
        if len(certs_blob) > FW_BLOB_MAX:
            raise fail(SevStatus.INVALID_LEN, f"certificate blob exceeds {FW_BLOB_MAX} bytes")
        self.certs_blob = certs_blob

    @command("SEV_INIT")
    async def sev_init(self, tmr_paddr: int, tmr_len: int) -> None:
        if self.legacy_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "legacy SEV is already initialised")
        if self.snp_initialized:
            # With SNP on, the TMR is 2 MiB of firmware pages. KERNEL: sev-dev.c
            if tmr_len != TMR_SIZE or tmr_paddr % TMR_SIZE:
                raise fail(SevStatus.INVALID_ADDRESS, "the TMR must be 2 MiB, 2 MiB aligned")
            for spa in range(tmr_paddr, tmr_paddr + tmr_len, 4096):
                await self._expect(spa, PageState.FIRMWARE, what="TMR page")
        self.legacy_initialized = True
        self.tmr = tmr_paddr

    @command("SEV_SHUTDOWN")
    async def sev_shutdown(self) -> None:
        if not self.legacy_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "legacy SEV is not initialised")
        self.legacy_initialized = False

    # --- guest contexts -------------------------------------------------------------------------

    @command("SNP_GCTX_CREATE")
    async def gctx_create(self, gctx_paddr: int) -> None:
        self._need_snp()
        _page(gctx_paddr, "context page")
        if len(self.guests) >= MAX_SNP_ASID:
            raise fail(SevStatus.RESOURCE_LIMIT, "no room for another guest context")
        await self._expect(gctx_paddr, PageState.FIRMWARE, what="context page")
        await self.rmp.transition([gctx_paddr], FwOp.CONTEXT)
        self.guests[gctx_paddr] = GuestContext(gctx_paddr)

    @command("SNP_LAUNCH_START")
    async def launch_start(
        self, gctx_paddr: int, *, policy: int, gosvw: bytes, ma_en: bool, imi_en: bool
    ) -> None:
        ctx = self._guest(gctx_paddr, GuestState.INIT)
        if ma_en:
            raise fail(SevStatus.INVALID_PARAM, "migration agents are not supported")
        if len(gosvw) not in (0, 16):
            raise fail(SevStatus.INVALID_PARAM, "GOSVW is 16 bytes")
        check_policy(policy, (API_MAJOR, API_MINOR), smt_enabled=self.topology.smt)
        ctx.policy = policy
        ctx.gosvw = gosvw or bytes(16)
        ctx.imi_en = imi_en
        ctx.vmpcks = new_vmpcks()
        ctx.report_id = secrets.token_bytes(32)
        ctx.launch_tcb = self.current_tcb.raw
        ctx.state = GuestState.LAUNCH

    @command("SNP_ACTIVATE")
    async def activate(self, gctx_paddr: int, asid: int) -> None:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH, GuestState.RUNNING)
        if not MIN_SNP_ASID <= asid <= MAX_SNP_ASID:
            raise fail(
                SevStatus.INVALID_ASID, f"ASID {asid} is outside {MIN_SNP_ASID}..{MAX_SNP_ASID}"
            )
        if ctx.asid:
            raise fail(SevStatus.ACTIVE, f"guest is already bound to ASID {ctx.asid}")
        if asid in self.asids:
            raise fail(SevStatus.ASID_OWNED, f"ASID {asid} belongs to another guest")
        if asid in self.unflushed:
            raise fail(SevStatus.DFFLUSH_REQUIRED, f"ASID {asid} needs SNP_DF_FLUSH before reuse")
        if ctx.policy & POLICY_SINGLE_SOCKET and self.topology.sockets > 1:
            # SPEC: SNP ABI, SNP_ACTIVATE: a SINGLE_SOCKET guest cannot be activated on every
            # socket of a multi-socket system (SNP_ACTIVATE_EX names a subset; not emulated).
            # UNVERIFIED(activate-single-socket): where this check sits among SNP_ACTIVATE's
            # other checks.
            raise fail(
                SevStatus.POLICY_FAILURE,
                f"policy is SINGLE_SOCKET and the system has {self.topology.sockets} sockets",
            )
        await self.rmp.install_key(asid, secrets.token_bytes(64))
        ctx.asid = asid
        self.asids[asid] = gctx_paddr

    @command("SNP_LAUNCH_UPDATE")
    async def launch_update(
        self,
        gctx_paddr: int,
        *,
        address: int,
        page_type: int,
        size_2m: bool,
        imi: bool,
        vmpl_perms: tuple[int, int, int],
    ) -> bytes:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH)
        _page(address)
        if not ctx.asid:
            raise fail(SevStatus.INACTIVE, "guest has no ASID yet (SNP_ACTIVATE)")
        try:
            ptype = PageType(page_type)
        except ValueError:
            raise fail(SevStatus.INVALID_PARAM, f"page type {page_type} is not 1..6") from None
        if size_2m:
            # UNVERIFIED(launch-4k-only): the emulated firmware launches 4K pages only (as KVM
            # issues them).
            raise fail(SevStatus.INVALID_PAGE_SIZE, "only 4K pages can be launched here")
        if imi and not ctx.imi_en:
            raise fail(SevStatus.INVALID_PARAM, "IMI page in a guest launched without IMI_EN")
        page = await self.rmp.page(address)
        if page.state != PageState.PRE_GUEST:
            raise fail(
                SevStatus.INVALID_PAGE_STATE,
                f"page {address:#x} is {page.state.name}, not PRE_GUEST",
            )
        if page.asid != ctx.asid:
            raise fail(
                SevStatus.INVALID_PAGE_OWNER, f"page {address:#x} belongs to ASID {page.asid}"
            )
        if ptype == PageType.VMSA and page.gpa != VMSA_GPA:
            raise fail(SevStatus.INVALID_PARAM, "a VMSA page is recorded at GPA 0xFFFFFFFFF000")
        gpa = page.gpa
        contents: bytes | None = None
        if ptype in (PageType.NORMAL, PageType.VMSA):
            contents = await self.rmp.read(address, 4096)
        elif ptype == PageType.CPUID:
            ok, fixed = check_cpuid(await self.rmp.read(address, 4096))
            if not ok:
                # The corrected table goes back unencrypted for the host to inspect.
                await self.rmp.write(address, fixed)
                raise fail(
                    SevStatus.INVALID_PARAM, "CPUID page has values the CPU does not support"
                )
            contents = fixed
        elif ptype == PageType.SECRETS:
            contents = secrets_page(ctx, self.id.product)
        else:  # ZERO and UNMEASURED: FW zeroes ZERO pages; UNMEASURED keep their contents
            contents = bytes(4096) if ptype == PageType.ZERO else await self.rmp.read(address, 4096)
        digest = ctx.digest.update(int(ptype), gpa, contents, vmpl_perms=vmpl_perms)
        await self.rmp.write(address, contents, asid=ctx.asid)
        if ptype == PageType.VMSA:
            await self.rmp.transition([address], FwOp.VMSA, ctx.asid)
        ctx.launched.append(address)
        return digest

    @command("SNP_LAUNCH_FINISH")
    async def launch_finish(
        self,
        gctx_paddr: int,
        *,
        id_block: bytes,
        id_auth: bytes,
        id_block_en: bool,
        auth_key_en: bool,
        vcek_disabled: bool,
        host_data: bytes,
    ) -> bytes:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH)
        if not ctx.asid:
            raise fail(SevStatus.INACTIVE, "guest has no ASID yet (SNP_ACTIVATE)")
        if len(host_data) not in (0, 32):
            raise fail(SevStatus.INVALID_PARAM, "host data is 32 bytes")
        if auth_key_en and not id_block_en:
            raise fail(SevStatus.INVALID_PARAM, "AUTH_KEY_EN needs ID_BLOCK_EN")
        block = None
        id_digest = author_digest = bytes(48)
        if id_block_en:
            block, id_digest, author_digest = verify_id(id_block, id_auth, auth_key_en)
            if block.version != 1:
                raise fail(SevStatus.BAD_VERSION, f"ID block version {block.version} is not 1")
            if block.ld != ctx.digest.value:
                raise fail(
                    SevStatus.BAD_MEASUREMENT, "ID block digest differs from the launch digest"
                )
            if block.policy != ctx.policy:
                raise fail(SevStatus.POLICY_FAILURE, "ID block policy differs from the guest's")
        await self.rmp.transition(list(ctx.launched), FwOp.FINISH, ctx.asid)
        if block is not None:
            ctx.family_id, ctx.image_id, ctx.guest_svn = (
                block.family_id,
                block.image_id,
                block.guest_svn,
            )
        ctx.id_key_digest, ctx.author_key_digest = id_digest, author_digest
        ctx.author_key_en = auth_key_en
        ctx.host_data = host_data or bytes(32)
        ctx.vcek_disabled = vcek_disabled
        ctx.state = GuestState.RUNNING
        return ctx.digest.value

    @command("SNP_GUEST_STATUS")
    async def guest_status(self, gctx_paddr: int) -> GuestContext:
        return self._guest(gctx_paddr)

    @command("SNP_DECOMMISSION")
    async def decommission(self, gctx_paddr: int) -> None:
        ctx = self._guest(gctx_paddr)
        if ctx.asid:
            await self.rmp.remove_key(ctx.asid)
            # The ASID's lines may still sit in the caches: clear the WBINVD indicator, so the
            # DF_FLUSH that frees the ASID waits for a WBINVD on every core (see df_flush).
            # KERNEL: arch/x86/kvm/svm/sev.c sev_flush_asids(), sev_unbind_asid()
            await self.rmp.wbinvd_indicator(clear=True)
            del self.asids[ctx.asid]
            self.unflushed.add(ctx.asid)
        await self.rmp.transition([gctx_paddr], FwOp.FIRMWARE)
        del self.guests[gctx_paddr]

    @command("SNP_PAGE_RECLAIM")
    async def page_reclaim(self, paddr: int, size_2m: bool) -> None:
        self._need_snp()
        _page(paddr)
        page = await self._expect(
            paddr, PageState.FIRMWARE, PageState.CONTEXT, PageState.PRE_GUEST, PageState.METADATA
        )
        if page.size_2m != size_2m:
            raise fail(SevStatus.INVALID_PAGE_SIZE, "page size differs from the RMP entry")
        if page.state == PageState.CONTEXT and paddr in self.guests:
            raise fail(
                SevStatus.INVALID_PAGE_STATE, "the context of a live guest (decommission it)"
            )
        if page.state == PageState.PRE_GUEST and page.asid in self.asids:
            owner = self.guests[self.asids[page.asid]]
            if owner.state == GuestState.LAUNCH:
                raise fail(SevStatus.INVALID_PAGE_STATE, "a page of a guest still launching")
        await self.rmp.transition([paddr], FwOp.RECLAIM)

    @command("SNP_PAGE_UNSMASH")
    async def page_unsmash(self, paddr: int) -> None:
        self._need_snp()
        if paddr % (2 << 20):
            raise fail(SevStatus.INVALID_ADDRESS, "UNSMASH takes a 2 MiB-aligned address")
        if not (await self.rmp.transition([paddr], FwOp.UNSMASH))[0]:
            raise fail(SevStatus.INVALID_PAGE_STATE, "the 512 entries do not describe one 2M page")

    @command("SNP_DBG_DECRYPT")
    async def dbg_decrypt(self, gctx_paddr: int, src: int, dst: int) -> None:
        ctx = self._debuggable(gctx_paddr)
        page = await self._guest_page(ctx, _page(src))
        await self._expect(_page(dst), PageState.FIRMWARE, what="destination page")
        await self.rmp.write(dst, await self.rmp.read(src, 4096, asid=page.asid))

    @command("SNP_DBG_ENCRYPT")
    async def dbg_encrypt(self, gctx_paddr: int, src: int, dst: int) -> None:
        ctx = self._debuggable(gctx_paddr)
        await self._expect(_page(src), PageState.FIRMWARE, what="source page")
        page = await self._guest_page(ctx, _page(dst))
        await self.rmp.write(dst, await self.rmp.read(src, 4096), asid=page.asid)

    def _debuggable(self, gctx_paddr: int) -> GuestContext:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH, GuestState.RUNNING)
        if not ctx.policy & POLICY_DEBUG:
            raise fail(SevStatus.POLICY_FAILURE, "the guest policy does not allow debugging")
        return ctx

    async def _guest_page(self, ctx: GuestContext, spa: int) -> Any:
        page = await self.rmp.page(spa)
        if page.asid != ctx.asid or page.state not in (
            PageState.PRE_GUEST,
            PageState.GUEST_INVALID,
            PageState.GUEST_VALID,
        ):
            raise fail(SevStatus.INVALID_PAGE_OWNER, f"page {spa:#x} is not this guest's")
        return page

    # --- guest messages ---------------------------------------------------------------------------

    @command("SNP_GUEST_REQUEST")
    async def guest_request(self, gctx_paddr: int, req_paddr: int, res_paddr: int) -> None:
        ctx = self._guest(gctx_paddr, GuestState.RUNNING)
        _page(req_paddr, "request page")
        _page(res_paddr, "response page")
        # The request comes from a hypervisor page, the response goes to a firmware page
        # (KVM's bounce pages); each state is checked in the same step as the access.
        page = await self.rmp.read(
            req_paddr,
            4096,
            expect=(PageState.HYPERVISOR,),
            checks=((res_paddr, (PageState.FIRMWARE,)),),
        )
        try:
            hdr = gm.parse_header(page)
        except gm.MessageError as e:
            raise fail(SevStatus.INVALID_PARAM, str(e)) from None
        if (
            hdr.algo != gm.AEAD_ALGO_AES_256_GCM
            or hdr.hdr_version != gm.MSG_HDR_VER
            or hdr.hdr_sz != gm.HDR_SIZE
            or not hdr.reserved_clear
            or hdr.vmpck > 3
            or hdr.msg_version == 0
        ):
            raise fail(SevStatus.INVALID_PARAM, "malformed message header")
        # ABI >= 1.51: only the exact next sequence number is accepted.
        # UNVERIFIED(msg-seqno-status) code.
        if hdr.seqno != ctx.seqnos[hdr.vmpck]:
            raise fail(
                SevStatus.INVALID_PARAM,
                f"sequence number {hdr.seqno}, expected {ctx.seqnos[hdr.vmpck]}",
            )
        if hdr.seqno >= 2**64 - 2:
            raise fail(SevStatus.AEAD_OFLOW, "sequence numbers are exhausted")
        key = ctx.vmpcks[hdr.vmpck]
        try:
            payload = gm.open_payload(key, hdr, page)
        except gm.MessageError as e:
            raise fail(SevStatus.INVALID_PARAM, f"message does not authenticate: {e}") from None
        if hdr.msg_type == gm.MsgType.REPORT_REQ:
            reply = self._report_reply(ctx, hdr.vmpck, payload)
        elif hdr.msg_type == gm.MsgType.KEY_REQ:
            reply = self._key_reply(ctx, hdr.vmpck, payload)
        else:
            raise fail(SevStatus.INVALID_PARAM, f"message type {hdr.msg_type} is not supported")
        rsp_hdr = gm.Header(
            seqno=hdr.seqno + 1,
            msg_type=hdr.msg_type + 1,
            msg_version=hdr.msg_version,
            msg_sz=len(reply),
            vmpck=hdr.vmpck,
        )
        await self.rmp.write(res_paddr, gm.seal(key, rsp_hdr, reply), expect=(PageState.FIRMWARE,))
        ctx.seqnos[hdr.vmpck] += 2

    def _report_reply(self, ctx: GuestContext, msg_vmpl: int, req: bytes) -> bytes:
        """MSG_REPORT_RSP: u32 status, u32 report_size, rsvd[24], report (docs/abi.md#payloads)."""
        if len(req) < 96:
            return struct.pack("<II", SevStatus.INVALID_PARAM, 0) + bytes(24)
        user_data = req[:64]
        vmpl = struct.unpack_from("<I", req, 0x40)[0]
        if not msg_vmpl <= vmpl <= 3:
            return struct.pack("<II", SevStatus.INVALID_PARAM, 0) + bytes(24)
        report = self.attestation_report(ctx, user_data, vmpl)
        return struct.pack("<II", 0, len(report)) + bytes(24) + report

    def attestation_report(self, ctx: GuestContext, user_data: bytes, vmpl: int) -> bytes:
        product = self.id.product
        signing = rpt.SIGNING_KEY_NONE if ctx.vcek_disabled else rpt.SIGNING_KEY_VCEK
        fields = rpt.ReportFields(
            version=3,
            guest_svn=ctx.guest_svn,
            policy=ctx.policy,
            family_id=ctx.family_id,
            image_id=ctx.image_id,
            vmpl=vmpl,
            current_tcb=self.current_tcb.raw,
            platform_info=int(self.topology.smt),  # bit 0 SMT_EN (SPEC: SNP ABI, PLATFORM_INFO)
            author_key_en=ctx.author_key_en,
            mask_chip_key=self.mask_chip_key,
            signing_key=signing,
            report_data=user_data,
            measurement=ctx.digest.value,
            host_data=ctx.host_data,
            id_key_digest=ctx.id_key_digest,
            author_key_digest=ctx.author_key_digest,
            report_id=ctx.report_id,
            report_id_ma=b"\xff" * 32,  # no migration agent (UNVERIFIED(report-id-ma) value)
            reported_tcb=self.reported_tcb.raw,
            cpuid_fam=product.family,
            cpuid_mod=product.model,
            cpuid_step=product.stepping,
            chip_id=bytes(64) if self.mask_chip_id else self.id.chip_id,
            committed_tcb=self.committed_tcb.raw,
            current_version=(BUILD, API_MINOR, API_MAJOR),
            committed_version=self.committed_version,
            launch_tcb=ctx.launch_tcb,
        )
        body = rpt.build(fields)
        key = (
            None
            if (self.mask_chip_key or ctx.vcek_disabled)
            else self.id.vcek_key(self.reported_tcb)
        )
        return rpt.sign(body, key)

    def _key_reply(self, ctx: GuestContext, msg_vmpl: int, req: bytes) -> bytes:
        """MSG_KEY_RSP: u32 status, rsvd[28], key[32] (docs/abi.md#payloads)."""
        bad = struct.pack("<I", SevStatus.INVALID_PARAM) + bytes(60)
        if len(req) < 0x28:
            return bad
        root, _, select, vmpl, svn, tcb = struct.unpack_from("<IIQIIQ", req, 0)
        if root != 0:  # VMRK (bit 0) needs a migration agent: not supported
            return bad
        if select >> 6 or not msg_vmpl <= vmpl <= 3:
            return bad
        if select & FIELD_GUEST_SVN and svn > ctx.guest_svn:
            return bad
        if select & FIELD_TCB_VERSION and not tcb_le(tcb, self.committed_tcb.raw):
            return bad
        key = derive_key(
            self.id.chip_secret, ctx, vmpl=vmpl, field_select=select, guest_svn=svn, tcb=tcb
        )
        return struct.pack("<I", 0) + bytes(28) + key
