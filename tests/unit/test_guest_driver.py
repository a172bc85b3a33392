"""The guest driver's sequence-number rules, driven against a scripted host.

The real Driver talks to a fake GuestKernel: it records every message the driver hands the
host (the sealed page at REQ_GPA, seen at each guest-request VMGEXIT) and answers each exit
from a hypothesis-drawn script, which can also make an exit raise (kvm unreachable, a broken
peer) or cancel the caller in the BUSY loop's delay. The rules come from
arch/x86/coco/sev/core.c: snp_send_guest_request(), __handle_guest_request(),
snp_issue_guest_request(), snp_inc_msg_seqno() and snp_disable_vmpck().
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import ghcb as g
from snpemu.abi import guest_message as gm
from snpemu.abi.addr import PAGE_SIZE as PAGE
from snpemu.errors import Unavailable
from snpemu.guest.driver import Driver, RequestFailed, VmpckDisabled, report_request
from snpemu.guest.errors import Terminated
from snpemu.guest.layout import CERTS_GPA, REQ_GPA, RESP_GPA

from tests.conftest import examples

# include/linux/sev-guest.h: SNP_GUEST_VMM_ERR(x) = x << 32
INVALID_LEN = 1 << 32  # SNP_GUEST_VMM_ERR_INVALID_LEN
BUSY = 2 << 32  # SNP_GUEST_VMM_ERR_BUSY
FW_ERROR = 0x16  # SEV_RET_INVALID_PARAM (include/uapi/linux/psp-sev.h), in the low half
NEEDED_PAGES = 5
SECRETS_GPA = 0x80_0000
DELAY_S, TIMEOUT_S = 2.0, 60.0  # SNP_REQ_RETRY_DELAY, SNP_REQ_MAX_RETRY_DURATION (sev.h)

OUTCOMES = (
    "ok",  # exitinfo2 0 and a valid sealed response, seqno + 1
    "busy",  # VMM BUSY
    "invalid_len",  # VMM INVALID_LEN with the needed pages in RBX
    "fw_error",  # a firmware error in the low half of exitinfo2
    "timeout",  # BUSY on this and every later exit of the message, past the retry timeout
    "hv_error",  # SW_EXITINFO1 nonzero: the GHCB call itself failed
    "dropped",  # exitinfo2 0 but no response written
    "bad_tag",  # a response whose tag does not authenticate
    "wrong_seqno",  # an authentic response with a sequence number other than seqno + 1
)
# exits whose outcome the guest never learns: the message may have reached the host
LOST = (
    "cancel",  # BUSY, and the caller is cancelled in the retry delay that follows
    "cancel_twice",  # as "cancel", and cancelled again while the VMPCK is being wiped
    "unavailable",  # the exit raises Unavailable (kvm unreachable)
    "error",  # the exit raises some other exception
    "terminated",  # the host terminated the guest at this exit (kvm's reply: terminated, 0, 0)
)

BUSY_ANSWERS = ("busy", "timeout", "cancel", "cancel_twice")  # the exit answered VMM BUSY


class Broken(RuntimeError):
    """Not an SnpemuError: whatever else an exit could raise."""


# what the caller sees when the exit did not come back (the driver re-raises it as it was)
RAISED: dict[str, type[BaseException]] = {
    "cancelled": asyncio.CancelledError,
    "unavailable": Unavailable,
    "error": Broken,
    "terminated": Terminated,
}


@dataclass
class Sent:
    call: int
    vmpck: int
    seqno: int
    page: bytes


@dataclass
class FakeKernel:
    """What Driver uses of GuestKernel, with the host's side of a guest request scripted."""

    script: list[str]
    keys: list[bytes]
    opts: Any = field(
        default_factory=lambda: SimpleNamespace(retry_delay_s=DELAY_S, retry_timeout_s=TIMEOUT_S)
    )
    secrets_gpa: int = SECRETS_GPA
    now: float = 0.0
    call: int = 0
    log: list[Sent | tuple[str, int]] = field(default_factory=list)
    pages: dict[int, bytes] = field(default_factory=dict)
    busy_forever: bool = False
    task: asyncio.Task[Any] | None = None  # the call in flight, for the scripted cancellations
    cancel_in_sleep: bool = False
    cancel_in_wipe: bool = False
    terminated: bool = False
    exits: list[str] = field(default_factory=list)  # what this call's exits were answered
    results: list[BaseException | None] = field(default_factory=list)  # what each call raised

    def __post_init__(self) -> None:
        self.vmpcks = list(self.keys)
        self.disabled: set[int] = set()
        self.counters = [0, 0, 0, 0]
        self.events: list[tuple[str, str]] = []

    # --- the GuestKernel surface --------------------------------------------------------

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.cancel_in_sleep:
            self.cancel_in_sleep = False
            self.exits.append("cancelled")
            await self._cancel_caller()

    async def _cancel_caller(self) -> None:
        """Cancel the call in flight; it lands at this yield (or, if this runs in a task of its
        own, at whatever the call is waiting on)."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.sleep(0)  # a yield to the loop, no time passes

    def check_running(self) -> None:
        if self.terminated:  # GuestKernel.check_running(): a terminated guest runs no more
            raise Terminated("the guest terminated")

    def event(self, kind: str, gpa: int = 0, detail: str = "") -> None:
        self.events.append((kind, detail))

    async def write(self, gpa: int, data: bytes, shared: bool) -> None:
        assert shared
        if gpa == REQ_GPA:  # a new message
            self.busy_forever = self.cancel_in_sleep = self.cancel_in_wipe = False
        for i in range(0, len(data), PAGE):  # a write may span pages (request and response)
            self.pages[gpa + i] = data[i : i + PAGE]

    async def read(self, gpa: int, length: int, shared: bool) -> bytes:
        assert shared
        if gpa == CERTS_GPA:
            return bytes(length)
        return self.pages.get(gpa, bytes(length))

    async def write_private(self, gpa: int, data: bytes) -> None:
        vmpck = (gpa - SECRETS_GPA - 0x20) // 32
        assert data == bytes(32) and gpa == SECRETS_GPA + 0x20 + 32 * vmpck
        if self.cancel_in_wipe:
            self.cancel_in_wipe = False
            await self._cancel_caller()
        self.log.append(("wiped", vmpck))

    async def ghcb_exit(self, x: g.Ghcb) -> tuple[Any, g.Ghcb]:
        code = x.get("sw_exit_code")
        assert code in (g.EXIT_GUEST_REQUEST, g.EXIT_EXT_GUEST_REQUEST)
        assert (x.get("sw_exit_info_1"), x.get("sw_exit_info_2")) == (REQ_GPA, RESP_GPA)
        page = self.pages[REQ_GPA]
        hdr = gm.parse_header(page)
        self.log.append(Sent(self.call, hdr.vmpck, hdr.seqno, page))
        outcome = "timeout" if self.busy_forever else (self.script.pop(0) if self.script else "ok")
        self.exits.append(outcome)
        if outcome == "unavailable":
            raise Unavailable("kvm: connection refused")
        if outcome == "error":
            raise Broken("kvm: the exit went wrong")
        if outcome == "terminated":  # GuestKernel.ghcb_exit(): the GHCB as it went out
            self.terminated = True
            return SimpleNamespace(sw_exit_info_1=0, sw_exit_info_2=0, terminated=True), x
        back = g.Ghcb()
        info1, info2 = 0, 0
        if outcome in ("cancel", "cancel_twice"):
            self.cancel_in_sleep = True
            self.cancel_in_wipe = outcome == "cancel_twice"
            info2 = BUSY
        elif outcome in ("busy", "timeout"):
            self.busy_forever = outcome == "timeout"
            info2 = BUSY
        elif outcome == "invalid_len":
            info2 = INVALID_LEN
            back.set("rbx", NEEDED_PAGES)
        elif outcome == "fw_error":
            info2 = FW_ERROR
        elif outcome == "hv_error":
            info1, info2 = g.RESP_MALFORMED_INPUT, g.ERR_INVALID_INPUT
        elif outcome != "dropped":
            self._respond(hdr, outcome)
        return SimpleNamespace(sw_exit_info_1=info1, sw_exit_info_2=info2, terminated=False), back

    def _respond(self, req: gm.Header, outcome: str) -> None:
        key = self.keys[req.vmpck]  # the firmware's copy, wiped or not in the guest
        seqno = req.seqno + (3 if outcome == "wrong_seqno" else 1)
        body = seqno.to_bytes(8, "little").ljust(32, b"\0")
        hdr = gm.Header(seqno, req.msg_type + 1, req.msg_version, len(body), req.vmpck)
        page = bytearray(gm.seal(key, hdr, body))
        if outcome == "bad_tag":
            page[0] ^= 1
        self.pages[RESP_GPA] = bytes(page)


@dataclass
class Call:
    ext: bool
    vmpck: int


def upstream(ext: bool, exits: list[str]) -> str:
    """What snp_send_guest_request() makes of the answers its exits got (arch/x86/coco/sev/
    core.c, written from __handle_guest_request() and snp_issue_guest_request()): "ok",
    "invalid_len" (the caller is told the needed pages, the VMPCK is kept), "kept" (a plain
    request answered INVALID_LEN: -EIO, no pages, the VMPCK kept) or "disabled".
    The retry timeout is the driver's to measure: a run of exits ending in BUSY timed out.
    An exit that never came back (it raised, or the caller was cancelled) is "disabled": the
    message entered shared memory with the host, so "the sequence number must be incremented
    or the VMPCK must be deleted to prevent reuse of the IV" (__handle_guest_request()), and
    with the outcome unknown, both."""
    override = False
    rc, exitinfo2 = "etimedout", "busy"
    for answer in exits:
        if answer in RAISED:
            return "disabled"
        if answer in BUSY_ANSWERS:  # -EAGAIN: the same message again
            continue
        if answer == "invalid_len" and ext:  # -ENOSPC: the same message as a plain request
            override, ext = True, False
            continue
        exitinfo2 = answer
        if answer == "hv_error":
            rc = "hv_call"  # sev_es_ghcb_hv_call() failed
        elif answer in ("invalid_len", "fw_error"):
            rc = "eio"  # INVALID_LEN on a plain request falls through to -EIO
        else:
            rc = "ok"  # exitinfo2 0, whatever the response page holds
        break
    if override:  # override_err: exitinfo2 INVALID_LEN, and a successful re-send is -EIO
        exitinfo2 = "invalid_len"
        rc = "eio" if rc == "ok" else rc
    if rc == "eio" and exitinfo2 == "invalid_len":  # returned before snp_disable_vmpck()
        return "invalid_len" if override else "kept"
    if rc != "ok":
        return "disabled"
    return "ok" if exits[-1] == "ok" else "disabled"  # verify_and_dec_payload()


CALLS = st.lists(st.builds(Call, st.booleans(), st.integers(0, 1)), min_size=1, max_size=12)
# the lost exits rarer, so that a run goes on past them under the other VMPCK
SCRIPT = st.lists(st.sampled_from(OUTCOMES * 3 + LOST), max_size=40)


async def _run(calls: list[Call], script: list[str]) -> FakeKernel:
    keys = [os.urandom(32), os.urandom(32), bytes(32), bytes(32)]
    k = FakeKernel(list(script), keys)
    driver = Driver(k)  # type: ignore[arg-type]

    sent = [0, 0, 0, 0]  # calls whose message reached the host, per VMPCK
    for i, c in enumerate(calls):
        k.call, k.exits = i, []
        payload = report_request(i.to_bytes(4, "little"), 0)  # a different message each
        wiped_before, started = c.vmpck in k.disabled, k.now
        k.task = asyncio.create_task(
            driver.request(gm.MsgType.REPORT_REQ, payload, vmpck=c.vmpck, ext=c.ext, certs_pages=1)
        )
        try:
            await k.task
            outcome = "ok"
        except VmpckDisabled as e:
            k.results.append(e)
            assert wiped_before
            assert not k.exits, "a disabled VMPCK sent a message"
            continue
        except RequestFailed as e:
            k.results.append(e)
            assert k.exits[-1] not in RAISED, (c, k.exits, e)  # the exit was answered
            if c.vmpck in k.disabled:
                outcome = "disabled"
            elif "needed_pages" in e.metadata:
                outcome = "invalid_len"
                assert e.metadata["needed_pages"] == str(NEEDED_PAGES)
            else:
                outcome = "kept"
        except (asyncio.CancelledError, Exception) as e:
            k.results.append(e)
            if not k.exits:  # refused before anything was sent: the guest is gone
                assert isinstance(e, Terminated) and k.terminated
                continue
            assert type(e) is RAISED[k.exits[-1]], (c, k.exits, e)  # re-raised as it was
            outcome = "disabled"
        else:
            k.results.append(None)
        if driver.wiping:  # a secrets-page wipe its cancelled caller left running
            await asyncio.wait(driver.wiping)
        sent[c.vmpck] += 1
        # snp_inc_msg_seqno() after every message the host may have seen, +2 each
        assert k.counters[c.vmpck] == 2 * sent[c.vmpck], (c, k.exits)
        assert outcome == upstream(c.ext, k.exits), (c, k.exits)
        if k.exits[-1] in BUSY_ANSWERS:  # gave up: only past the retry timeout
            assert k.now - started > TIMEOUT_S
        if outcome == "disabled":
            assert k.vmpcks[c.vmpck] == bytes(32) and ("wiped", c.vmpck) in k.log

    return k


@settings(max_examples=examples(300), deadline=None)
@given(CALLS, SCRIPT)
async def test_no_sequence_number_is_ever_used_for_two_messages(
    calls: list[Call], script: list[str]
) -> None:
    """Whatever the host answers at every step, the driver never seals two different messages
    under one VMPCK with one sequence number (the AES-GCM IV), and once it wipes a VMPCK it
    sends nothing more under it (snp_send_guest_request(), __handle_guest_request())."""
    k = await _run(calls, script)
    pages: dict[tuple[int, int], bytes] = {}
    callers: dict[tuple[int, int], int] = {}
    wiped: set[int] = set()
    for entry in k.log:
        if isinstance(entry, tuple):
            wiped.add(entry[1])
            continue
        assert entry.vmpck not in wiped, f"message sent under the wiped VMPCK{entry.vmpck}"
        slot = (entry.vmpck, entry.seqno)
        # the same ciphertext re-sent (BUSY, or the plain re-send after INVALID_LEN) is fine
        assert pages.setdefault(slot, entry.page) == entry.page, f"IV reuse at {slot}"
        assert callers.setdefault(slot, entry.call) == entry.call, f"seqno reused at {slot}"


async def _plain_resend_case(resend: list[str]) -> FakeKernel:
    return await _run([Call(True, 0), Call(False, 0)], ["invalid_len", *resend])


@pytest.mark.parametrize("resend", [["busy", "ok"], ["busy", "fw_error"], ["fw_error"]])
async def test_plain_resend_after_invalid_len_consumes_the_sequence_number(
    resend: list[str],
) -> None:
    """__handle_guest_request(): -ENOSPC re-sends the message as a plain request through the
    same BUSY loop; snp_inc_msg_seqno() then runs whatever it answered, and the caller is told
    INVALID_LEN (snp_send_guest_request() keeps the VMPCK on -EIO with INVALID_LEN)."""
    k = await _plain_resend_case(resend)
    sent = [e for e in k.log if isinstance(e, Sent)]
    assert [e.seqno for e in sent if e.call == 0] == [1] * (1 + len(resend))
    assert [e.seqno for e in sent if e.call == 1] == [3]  # 1 + 2: the firmware's count too
    assert k.exits == ["ok"] and not k.disabled


async def test_plain_request_answered_invalid_len_keeps_the_vmpck() -> None:
    """snp_issue_guest_request(): INVALID_LEN on a plain request falls through to -EIO with
    exitinfo2 SNP_GUEST_VMM_ERR(INVALID_LEN); snp_inc_msg_seqno() has run, and
    snp_send_guest_request() returns that before snp_disable_vmpck(). No pages are told: only
    an extended request's -ENOSPC sets data_npages."""
    k = await _run([Call(False, 0), Call(False, 0)], ["invalid_len"])
    first, second = k.results
    assert isinstance(first, RequestFailed) and "needed_pages" not in first.metadata
    assert second is None and not k.disabled and ("wiped", 0) not in k.log
    assert [(e.call, e.seqno) for e in k.log if isinstance(e, Sent)] == [(0, 1), (1, 3)]
    assert k.counters[0] == 4


@pytest.mark.parametrize(
    "script, raised",
    [
        (["busy", "cancel"], asyncio.CancelledError),
        (["cancel_twice"], asyncio.CancelledError),
        (["unavailable"], Unavailable),
        (["busy", "error"], Broken),
    ],
)
async def test_an_exit_that_does_not_come_back_uses_up_the_seqno_and_the_vmpck(
    script: list[str], raised: type[BaseException]
) -> None:
    """The message entered shared memory with the host, and whether the host or the firmware
    saw it is unknown: the sequence number is consumed (snp_inc_msg_seqno(), +2) and the VMPCK
    wiped (snp_disable_vmpck(), the secrets page copy too, a second cancellation during the
    wipe included), the caller sees its own error, and nothing more goes out under the key."""
    k = await _run([Call(False, 0), Call(False, 0), Call(False, 1)], script)
    assert [type(e) for e in k.results] == [raised, VmpckDisabled, type(None)]
    assert k.counters[:2] == [2, 2] and k.disabled == {0} and k.vmpcks[0] == bytes(32)
    assert ("wiped", 0) in k.log
    sent = [(e.call, e.vmpck, e.seqno) for e in k.log if isinstance(e, Sent)]
    assert sent == [(0, 0, 1)] * len(script) + [(2, 1, 1)]


@pytest.mark.parametrize("ext", [False, True])
async def test_a_terminated_reply_is_not_a_response(ext: bool) -> None:
    """The host terminated the guest at the request's exit (kvm answers terminated, exit infos
    0): there is no response to read, the guest request fails with the guest's Terminated, and
    as for any exit whose outcome the guest never learns, the sequence number is consumed and
    the VMPCK wiped first (__handle_guest_request(), snp_disable_vmpck()). The guest sends
    nothing more."""
    k = await _run([Call(ext, 0), Call(False, 1)], ["terminated"])
    assert [type(e) for e in k.results] == [Terminated, Terminated]
    assert k.counters[0] == 2 and k.disabled == {0} and k.vmpcks[0] == bytes(32)
    assert ("wiped", 0) in k.log
    assert [(e.call, e.seqno) for e in k.log if isinstance(e, Sent)] == [(0, 1)]
    assert not any("bad response" in detail for _, detail in k.events)


async def test_plain_resend_timing_out_wipes_the_vmpck() -> None:
    """-ETIMEDOUT on the plain re-send is not the INVALID_LEN answer: snp_send_guest_request()
    wipes the VMPCK. The timeout counts from the first exit of the message (req_start) and is
    passed only when more than SNP_REQ_MAX_RETRY_DURATION has gone by."""
    k = await _plain_resend_case(["timeout"])
    assert k.disabled == {0}
    sent = [e for e in k.log if isinstance(e, Sent)]
    assert {e.call for e in sent} == {0}  # the second call is refused before it is sent
    # exits at 0, 2, ..., 60 s are retried; the one at 62 s is past 60 s: 1 + 31 plain exits
    assert len(sent) == 1 + 32 and k.now == TIMEOUT_S + DELAY_S
