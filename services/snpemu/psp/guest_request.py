"""SNP_GUEST_REQUEST: the guest message path, where the attestation report and the derived key
are assembled.

SPEC: SNP ABI (56860) "SNP_GUEST_REQUEST", "MSG_REPORT_REQ", "MSG_KEY_REQ"; KERNEL:
arch/x86/kvm/svm/sev.c snp_handle_guest_req() (the bounce pages), arch/x86/coco/sev/core.c for
the guest's side of the header and the AEAD (docs/abi.md#guest-message).
"""

from __future__ import annotations

from snpemu.abi import guest_message as gm
from snpemu.abi import guest_payload as payload
from snpemu.abi.addr import PAGE_SIZE, Spa
from snpemu.abi.guest_payload import KeyField, KeyRequest, ReportRequest
from snpemu.abi.report import SIGNING_KEY_NONE, SIGNING_KEY_VCEK
from snpemu.abi.rmp import PageState
from snpemu.psp import report as rpt
from snpemu.psp.guest import GuestContext, GuestState, derive_key, tcb_le
from snpemu.psp.mailbox import API_MAJOR, API_MINOR, BUILD, Mailbox, command
from snpemu.psp.status import SevStatus, fail

MAX_VMPL = 3
SEQNO_LIMIT = 2**64 - 2  # the response's seqno + 1 must still fit the 64-bit IV counter
REPORT_VERSION = 3
PLATFORM_INFO_SMT_EN = 1 << 0  # SPEC: SNP ABI, PLATFORM_INFO


class GuestRequestCommands(Mailbox):
    @command("SNP_GUEST_REQUEST")
    async def guest_request(self, gctx_paddr: Spa, req_paddr: Spa, res_paddr: Spa) -> None:
        ctx = self._guest(gctx_paddr, GuestState.RUNNING)
        await self._address(req_paddr, "request page")
        await self._address(res_paddr, "response page")
        # The request comes from a hypervisor page, the response goes to a firmware page
        # (KVM's bounce pages); each state is checked in the same step as the access.
        page = await self.rmp.read(
            req_paddr,
            PAGE_SIZE,
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
            or hdr.vmpck > MAX_VMPL
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
        if hdr.seqno >= SEQNO_LIMIT:
            raise fail(SevStatus.AEAD_OFLOW, "sequence numbers are exhausted")
        key = ctx.vmpcks[hdr.vmpck]
        try:
            body = gm.open_payload(key, hdr, page)
        except gm.MessageError as e:
            raise fail(SevStatus.INVALID_PARAM, f"message does not authenticate: {e}") from None
        if hdr.msg_type == gm.MsgType.REPORT_REQ:
            reply = self._report_reply(ctx, hdr.vmpck, body)
        elif hdr.msg_type == gm.MsgType.KEY_REQ:
            reply = self._key_reply(ctx, hdr.vmpck, body)
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
        """MSG_REPORT_RSP (abi/guest_payload.py): the status, then the report on success."""
        try:
            asked = ReportRequest.unpack(req)
        except ValueError:
            return payload.report_response(SevStatus.INVALID_PARAM)
        if not msg_vmpl <= asked.vmpl <= MAX_VMPL:
            return payload.report_response(SevStatus.INVALID_PARAM)
        report = self.attestation_report(ctx, asked.user_data, asked.vmpl)
        return payload.report_response(SevStatus.SUCCESS, report)

    def attestation_report(self, ctx: GuestContext, user_data: bytes, vmpl: int) -> bytes:
        product = self.id.product
        signing = SIGNING_KEY_NONE if ctx.vcek_disabled else SIGNING_KEY_VCEK
        fields = rpt.ReportFields(
            version=REPORT_VERSION,
            guest_svn=ctx.guest_svn,
            policy=ctx.policy,
            family_id=ctx.family_id,
            image_id=ctx.image_id,
            vmpl=vmpl,
            current_tcb=self.current_tcb.raw,
            platform_info=PLATFORM_INFO_SMT_EN if self.topology.smt else 0,
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
        """MSG_KEY_RSP (abi/guest_payload.py): the status, then the key on success."""
        bad = payload.key_response(SevStatus.INVALID_PARAM)
        try:
            asked = KeyRequest.unpack(req)
        except ValueError:
            return bad
        if asked.root_key_select != 0:  # VMRK (bit 0) needs a migration agent: not supported
            return bad
        select = asked.field_select
        if select >> payload.KEY_FIELD_BITS or not msg_vmpl <= asked.vmpl <= MAX_VMPL:
            return bad
        if select & KeyField.GUEST_SVN and asked.guest_svn > ctx.guest_svn:
            return bad
        if select & KeyField.TCB_VERSION and not tcb_le(asked.tcb_version, self.committed_tcb.raw):
            return bad
        key = derive_key(
            self.id.chip_secret,
            ctx,
            vmpl=asked.vmpl,
            field_select=select,
            guest_svn=asked.guest_svn,
            tcb=asked.tcb_version,
        )
        return payload.key_response(SevStatus.SUCCESS, key)
