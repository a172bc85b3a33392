"""The guest's GHCB page-state-change loop against a scripted host.

GuestKernel.psc follows arch/x86/coco/sev/core.c vmgexit_psc() and __set_pages_state(): the
descriptor goes back to the host until cur_entry passes end_entry, with no retry limit; any
nonzero SW_EXITINFO2, a nonzero header reserved field or processing that goes backwards
terminates the guest with SEV_TERM_SET_LINUX / GHCB_TERM_PSC.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from snpemu.abi import ghcb as g
from snpemu.abi import psc
from snpemu.guest.errors import Terminated
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.layout import GHCB_GPA
from snpemu.guest.ports import GhcbReply, MsrReply
from snpemu.kvm.identity import VcpuIdentity

# arch/x86/include/asm/sev-common.h
GHCB_MSR_TERM_REQ = 0x100
SEV_TERM_SET_LINUX, GHCB_TERM_PSC = 1, 1
TERM_PSC_MSR = GHCB_MSR_TERM_REQ | SEV_TERM_SET_LINUX << 12 | GHCB_TERM_PSC << 16
# arch/x86/include/asm/svm.h
SVM_VMGEXIT_PSC = 0x8000_0010
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
PSC_HDR = struct.Struct("<HHI")  # struct psc_hdr: u16 cur_entry, u16 end_entry, u32 reserved

# One exit's answer: given the header the guest sent, (sw_exit_info_1, sw_exit_info_2, the
# header the host writes back).
Answer = Callable[[tuple[int, int, int]], tuple[int, int, tuple[int, int, int]]]


def done(hdr: tuple[int, int, int]) -> tuple[int, int, tuple[int, int, int]]:
    _, end, rsvd = hdr
    return 0, 0, (end + 1, end, rsvd)


class Host:
    """kvm as the guest sees it: PSC exits answered from a script (then: all done), TERM_REQ
    recorded."""

    def __init__(self, script: list[Answer]) -> None:
        self.script = script
        self.sent: list[tuple[int, int, int]] = []  # each PSC exit's header, as sent
        self.msrs: list[int] = []

    async def vmgexit_msr(self, vcpu: VcpuIdentity, value: int) -> MsrReply:
        self.msrs.append(value)
        return MsrReply(0, terminated=True)

    async def vmgexit(self, vcpu: VcpuIdentity, ghcb: bytes) -> GhcbReply:
        x = g.Ghcb.decode(ghcb)
        assert x.get("sw_exit_code") == SVM_VMGEXIT_PSC
        assert x.get("sw_scratch") == GHCB_GPA + g.SHARED_BUFFER
        hdr = PSC_HDR.unpack_from(x.shared, 0)
        self.sent.append(hdr)
        answer = self.script.pop(0) if self.script else done
        info1, info2, back = answer(hdr)
        PSC_HDR.pack_into(x.shared, 0, *back)
        return GhcbReply(info1, info2, False, x.encode())


def kernel(host: Host) -> GuestKernel:
    opts = SimpleNamespace(firmware="none", memory_bytes=64 << 20, memory_model=2)  # v5
    k = GuestKernel(
        "psc-test",
        opts,
        exits=host,
        vmm=None,
        rmp=None,
        default_firmware="none",  # type: ignore[arg-type]
    )
    k.vcpus = [VcpuIdentity("vm", 0, 1, b"")]
    return k


ENTRIES = [psc.Entry(0, 0x100 + i, psc.Op.PRIVATE, False) for i in range(10)]


async def run_psc(
    script: list[Answer], entries: list[psc.Entry] = ENTRIES
) -> tuple[Host, GuestKernel]:
    host = Host(script)
    k = kernel(host)
    await k.psc(entries)
    return host, k


async def assert_terminated_for_psc(script: list[Answer]) -> Host:
    host = Host(script)
    k = kernel(host)
    with pytest.raises(Terminated):
        await k.psc(ENTRIES)
    assert k.term_reason == (SEV_TERM_SET_LINUX, GHCB_TERM_PSC)
    assert host.msrs == [TERM_PSC_MSR]
    return host


@pytest.mark.parametrize(
    ("info1", "info2"),
    [
        (0, VMGEXIT_PSC_ERROR_GENERIC),
        (0, VMGEXIT_PSC_ERROR_INVALID_HDR),
        (0, VMGEXIT_PSC_ERROR_INVALID_ENTRY),
        (0, 1),  # any other nonzero value
        (g.RESP_MALFORMED_INPUT, g.ERR_INVALID_INPUT),  # sev_es_ghcb_hv_call() failed
    ],
)
async def test_any_psc_error_terminates_at_once(info1: int, info2: int) -> None:
    """vmgexit_psc(): WARN(ret || sw_exit_info_2) -> __set_pages_state() terminates with
    SEV_TERM_SET_LINUX, GHCB_TERM_PSC. PSC_ERROR_GENERIC is not retried either."""
    host = await assert_terminated_for_psc([lambda h: (info1, info2, (h[0] + 3, h[1], h[2]))])
    assert len(host.sent) == 1


async def test_reserved_header_field_terminates() -> None:
    """vmgexit_psc(): "Reserved bit is set in the PSC header"."""
    host = await assert_terminated_for_psc([lambda h: (0, 0, (h[0] + 2, h[1], 1))])
    assert len(host.sent) == 1


async def test_end_entry_growing_terminates() -> None:
    """vmgexit_psc(): data->hdr.end_entry > end_entry is processing going backward."""
    await assert_terminated_for_psc([lambda h: (0, 0, (h[0] + 1, h[1] + 1, 0))])


async def test_cur_entry_below_the_start_terminates() -> None:
    """vmgexit_psc(): cur_entry > data->hdr.cur_entry, against the cur_entry the call began
    with. The descriptors psc() builds start at 0, so drive vmgexit_psc() with one that
    starts at 4 and have the host move it back to 3."""
    host = Host([lambda h: (0, 0, (3, h[1], 0))])
    k = kernel(host)
    buf = bytearray(g.SHARED_BUFFER_SIZE)
    psc.Descriptor(4, 9, 0, ENTRIES).encode_into(buf)
    why = await k.vmgexit_psc(buf)
    assert "backward" in why and host.sent == [(4, 9, 0)]


async def test_cur_entry_moving_back_within_the_call_is_accepted() -> None:
    """Upstream compares with the header as the call began (cur_entry 0 here), not with the
    previous exit: a host that goes 0 -> 5 -> 3 is asked again from 3, as vmgexit_psc() does."""
    host, k = await run_psc([lambda h: (0, 0, (5, h[1], 0)), lambda h: (0, 0, (3, h[1], 0))])
    assert [h[0] for h in host.sent] == [0, 5, 3]
    assert not host.msrs and k.term_reason == (0, 0)


async def test_partial_progress_is_resumed_without_a_retry_limit() -> None:
    """vmgexit_psc(): while (cur_entry <= end_entry) VMGEXIT again; the host may stop after
    any entry, as often as it likes (the old loop gave up after 16 exits)."""
    stall = [lambda h: (0, 0, h)] * 40  # no progress at all, 40 times
    step = [lambda h: (0, 0, (h[0] + 1, h[1], h[2]))] * 9  # one entry at a time
    host, k = await run_psc([*stall, *step])
    assert len(host.sent) == 40 + 9 + 1
    assert host.sent[-1] == (9, 9, 0) and not host.msrs and k.term_reason == (0, 0)


async def test_each_batch_of_253_is_its_own_descriptor() -> None:
    """__set_pages_state(): at most VMGEXIT_PSC_MAX_ENTRY (253) entries per descriptor,
    end_entry inclusive."""
    entries = [psc.Entry(0, 0x1000 + i, psc.Op.SHARED, False) for i in range(300)]
    host, _ = await run_psc([], entries)
    assert host.sent == [(0, 252, 0), (0, 46, 0)]
