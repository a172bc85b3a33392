"""Guest-context commands: GCTX_CREATE, LAUNCH_START, ACTIVATE, LAUNCH_UPDATE, LAUNCH_FINISH,
GUEST_STATUS, DECOMMISSION, PAGE_RECLAIM, PAGE_UNSMASH and DBG_DECRYPT/DBG_ENCRYPT.

SPEC: SNP ABI (56860) chapters "Guest Management" and "Page Management"; KERNEL:
arch/x86/kvm/svm/sev.c (snp_launch_start(), snp_launch_update(), snp_launch_finish()).
"""

from __future__ import annotations

import secrets

from snpemu.abi.addr import PAGE_SIZE, PMD_SIZE, Spa
from snpemu.abi.asid import MAX_SNP_ASID, MIN_SNP_ASID
from snpemu.abi.page_type import PageType
from snpemu.abi.policy import GuestPolicy
from snpemu.abi.rmp import VMSA_GPA, FwOp, PageState
from snpemu.abi.secrets import GOSVW_SIZE
from snpemu.psp.guest import (
    GuestContext,
    GuestState,
    check_cpuid,
    check_policy,
    new_vmpcks,
    secrets_page,
    verify_id,
)
from snpemu.psp.mailbox import API_MAJOR, API_MINOR, Mailbox, command
from snpemu.psp.rmp_port import Page
from snpemu.psp.status import SevStatus, fail

HOST_DATA_SIZE = 32


class LaunchCommands(Mailbox):
    @command("SNP_GCTX_CREATE")
    async def gctx_create(self, gctx_paddr: Spa) -> None:
        self._need_snp()
        await self._address(gctx_paddr, "context page")
        if len(self.guests) >= MAX_SNP_ASID:
            raise fail(SevStatus.RESOURCE_LIMIT, "no room for another guest context")
        await self._expect(gctx_paddr, PageState.FIRMWARE, what="context page")
        await self.rmp.transition([gctx_paddr], FwOp.CONTEXT)
        self.guests[gctx_paddr] = GuestContext(gctx_paddr)

    @command("SNP_LAUNCH_START")
    async def launch_start(
        self, gctx_paddr: Spa, *, policy: int, gosvw: bytes, ma_en: bool, imi_en: bool
    ) -> None:
        ctx = self._guest(gctx_paddr, GuestState.INIT)
        if ma_en:
            raise fail(SevStatus.INVALID_PARAM, "migration agents are not supported")
        if len(gosvw) not in (0, GOSVW_SIZE):
            raise fail(SevStatus.INVALID_PARAM, "GOSVW is 16 bytes")
        check_policy(policy, (API_MAJOR, API_MINOR), smt_enabled=self.topology.smt)
        ctx.policy = policy
        ctx.gosvw = gosvw or bytes(GOSVW_SIZE)
        ctx.imi_en = imi_en
        ctx.vmpcks = new_vmpcks()
        ctx.report_id = secrets.token_bytes(32)
        ctx.launch_tcb = self.current_tcb.raw
        ctx.state = GuestState.LAUNCH

    @command("SNP_ACTIVATE")
    async def activate(self, gctx_paddr: Spa, asid: int) -> None:
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
        if ctx.policy & GuestPolicy.SINGLE_SOCKET and self.topology.sockets > 1:
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
        gctx_paddr: Spa,
        *,
        address: Spa,
        page_type: int,
        size_2m: bool,
        imi: bool,
        vmpl_perms: tuple[int, int, int],
    ) -> bytes:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH)
        await self._address(address)
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
            contents = await self.rmp.read(address, PAGE_SIZE)
        elif ptype == PageType.CPUID:
            ok, fixed = check_cpuid(await self.rmp.read(address, PAGE_SIZE))
            if not ok:
                # The corrected table goes back unencrypted for the host to inspect.
                await self.rmp.write(address, fixed)
                raise fail(
                    SevStatus.INVALID_PARAM, "CPUID page has values the CPU does not support"
                )
            contents = fixed
        elif ptype == PageType.SECRETS:
            contents = secrets_page(ctx, self.id.product)
        elif ptype == PageType.ZERO:  # the firmware zeroes ZERO pages
            contents = bytes(PAGE_SIZE)
        else:  # UNMEASURED pages keep their contents
            contents = await self.rmp.read(address, PAGE_SIZE)
        digest = ctx.digest.update(int(ptype), gpa, contents, vmpl_perms=vmpl_perms)
        await self.rmp.write(address, contents, asid=ctx.asid)
        if ptype == PageType.VMSA:
            await self.rmp.transition([address], FwOp.VMSA, ctx.asid)
        ctx.launched.append(address)
        return digest

    @command("SNP_LAUNCH_FINISH")
    async def launch_finish(
        self,
        gctx_paddr: Spa,
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
        if len(host_data) not in (0, HOST_DATA_SIZE):
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
        # a page launched twice (measured twice) becomes guest-valid once
        await self.rmp.transition(list(dict.fromkeys(ctx.launched)), FwOp.FINISH, ctx.asid)
        if block is not None:
            ctx.family_id, ctx.image_id, ctx.guest_svn = (
                block.family_id,
                block.image_id,
                block.guest_svn,
            )
        ctx.id_key_digest, ctx.author_key_digest = id_digest, author_digest
        ctx.author_key_en = auth_key_en
        ctx.host_data = host_data or bytes(HOST_DATA_SIZE)
        ctx.vcek_disabled = vcek_disabled
        ctx.state = GuestState.RUNNING
        return ctx.digest.value

    @command("SNP_GUEST_STATUS")
    async def guest_status(self, gctx_paddr: Spa) -> GuestContext:
        return self._guest(gctx_paddr)

    @command("SNP_DECOMMISSION")
    async def decommission(self, gctx_paddr: Spa) -> None:
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
    async def page_reclaim(self, paddr: Spa, size_2m: bool) -> None:
        self._need_snp()
        await self._address(paddr, size=PMD_SIZE if size_2m else PAGE_SIZE)
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
    async def page_unsmash(self, paddr: Spa) -> None:
        self._need_snp()
        if paddr % PMD_SIZE:
            raise fail(SevStatus.INVALID_ADDRESS, "UNSMASH takes a 2 MiB-aligned address")
        await self._address(paddr, "2 MiB page", size=PMD_SIZE)
        if not (await self.rmp.transition([paddr], FwOp.UNSMASH))[0]:
            raise fail(SevStatus.INVALID_PAGE_STATE, "the 512 entries do not describe one 2M page")

    @command("SNP_DBG_DECRYPT")
    async def dbg_decrypt(self, gctx_paddr: Spa, src: Spa, dst: Spa) -> None:
        ctx = self._debuggable(gctx_paddr)
        src, dst = (
            await self._address(src, "source page"),
            await self._address(dst, "destination page"),
        )
        page = await self._guest_page(ctx, src)
        await self._expect(dst, PageState.FIRMWARE, what="destination page")
        await self.rmp.write(dst, await self.rmp.read(src, PAGE_SIZE, asid=page.asid))

    @command("SNP_DBG_ENCRYPT")
    async def dbg_encrypt(self, gctx_paddr: Spa, src: Spa, dst: Spa) -> None:
        ctx = self._debuggable(gctx_paddr)
        src, dst = (
            await self._address(src, "source page"),
            await self._address(dst, "destination page"),
        )
        await self._expect(src, PageState.FIRMWARE, what="source page")
        page = await self._guest_page(ctx, dst)
        await self.rmp.write(dst, await self.rmp.read(src, PAGE_SIZE), asid=page.asid)

    def _debuggable(self, gctx_paddr: int) -> GuestContext:
        ctx = self._guest(gctx_paddr, GuestState.LAUNCH, GuestState.RUNNING)
        if not ctx.policy & GuestPolicy.DEBUG:
            raise fail(SevStatus.POLICY_FAILURE, "the guest policy does not allow debugging")
        return ctx

    async def _guest_page(self, ctx: GuestContext, spa: Spa) -> Page:
        page = await self.rmp.page(spa)
        if page.asid != ctx.asid or page.state not in (
            PageState.PRE_GUEST,
            PageState.GUEST_INVALID,
            PageState.GUEST_VALID,
        ):
            raise fail(SevStatus.INVALID_PAGE_OWNER, f"page {spa:#x} is not this guest's")
        return page
