"""Every (platform state or guest state, command) pair answers the expected firmware status and
a failing command leaves the firmware and the RMP exactly as they were."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import Placement
from snpemu.psp.status import FirmwareError, SevStatus
from snpemu.psp.tcb import Tcb

from tests.unit.psp.launch_helpers import Host, make_host, report_request

OK = SevStatus.SUCCESS
IPS = SevStatus.INVALID_PLATFORM_STATE
IGS = SevStatus.INVALID_GUEST_STATE


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chip")


def snapshot(h: Host) -> tuple[object, ...]:
    guests = {g: (c.state, c.asid, c.digest.value, tuple(c.seqnos)) for g, c in h.fw.guests.items()}
    return (
        h.fw.status_bytes(),
        guests,
        copy.copy(h.fw.unflushed),
        h.fw.legacy_initialized,
        h.rmp.wbinvd_indicator,
        h.rmp.table.lo.copy(),
        h.rmp.table.kind.copy(),
    )


async def expect(h: Host, cmd: Callable[[], Awaitable[object]], status: SevStatus) -> None:
    before = snapshot(h)
    try:
        await cmd()
    except FirmwareError as e:
        assert e.status == status, f"got {e.status.name}, expected {status.name}: {e.message}"
        after = snapshot(h)
        for a, b in zip(before, after, strict=True):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, "state changed"
        return
    assert status == OK, f"succeeded, expected {status.name}"


def tmr(h: Host) -> tuple[int, int]:
    pfns = h.rmp.allocate(512, Placement.ALIGNED_2M)
    for p in pfns:
        h.rmp.rmpupdate(p << 12, gpa=0, assigned=True, size_2m=False, immutable=True, asid=0)
    return pfns[0] << 12, 2 << 20


Command = Callable[[], Awaitable[object]]
# name -> prepare(host) -> command: pages the command needs are made before the snapshot.
PLATFORM_COMMANDS: dict[str, Callable[[Host], Command]] = {
    "SNP_INIT": lambda h: h.fw.snp_init,
    "SNP_INIT_EX": lambda h: partial(
        h.fw.snp_init_ex, init_rmp=True, hv_fixed=[(h.shared_page(), 1)]
    ),
    "SNP_DF_FLUSH": lambda h: h.fw.df_flush,
    "SNP_SHUTDOWN": lambda h: h.fw.snp_shutdown,
    "SNP_SHUTDOWN_EX": lambda h: lambda: h.fw.snp_shutdown_ex(iommu=True, x86=False),
    "SNP_CONFIG": lambda h: (
        lambda: h.fw.config(reported_tcb=Tcb(1, 0, 1, 1), mask_chip_id=True, mask_chip_key=False)
    ),
    "SNP_COMMIT": lambda h: h.fw.commit,
    "SNP_PLATFORM_STATUS": lambda h: partial(h.fw.platform_status, h.firmware_page()),
    "SNP_FEATURE_INFO": lambda h: lambda: h.fw.feature_info(0),
    "SNP_GCTX_CREATE": lambda h: partial(h.fw.gctx_create, h.firmware_page()),
    "SNP_PAGE_RECLAIM": lambda h: partial(h.fw.page_reclaim, h.firmware_page(), False),
    "SEV_INIT": lambda h: partial(h.fw.sev_init, *tmr(h)),
}

# command -> status in platform state UNINIT, INIT (no guest), WORKING (a guest exists)
PLATFORM_TABLE = {
    "SNP_INIT": (OK, IPS, IPS),
    "SNP_INIT_EX": (OK, IPS, IPS),
    "SNP_DF_FLUSH": (IPS, OK, OK),
    "SNP_SHUTDOWN": (IPS, OK, IPS),
    "SNP_SHUTDOWN_EX": (IPS, OK, IPS),
    "SNP_CONFIG": (IPS, OK, OK),
    "SNP_COMMIT": (IPS, OK, OK),
    "SNP_PLATFORM_STATUS": (OK, OK, OK),
    "SNP_FEATURE_INFO": (OK, OK, OK),
    "SNP_GCTX_CREATE": (IPS, OK, OK),
    "SNP_PAGE_RECLAIM": (IPS, OK, OK),
    "SEV_INIT": (OK, OK, OK),
}


@pytest.mark.parametrize("platform", ["UNINIT", "INIT", "WORKING"])
@pytest.mark.parametrize("name", sorted(PLATFORM_TABLE))
async def test_platform_state_command_pairs(tmp: Path, platform: str, name: str) -> None:
    h = make_host(tmp)
    if platform != "UNINIT":
        await h.fw.snp_init()
    if platform == "WORKING":
        await h.fw.gctx_create(h.firmware_page())
    column = ("UNINIT", "INIT", "WORKING").index(platform)
    await expect(h, PLATFORM_COMMANDS[name](h), PLATFORM_TABLE[name][column])


async def _to_state(h: Host, state: str) -> None:
    await h.fw.snp_init()
    h.gctx = h.firmware_page()
    await h.fw.gctx_create(h.gctx)
    if state == "INIT":
        return
    await h.fw.launch_start(h.gctx, policy=0x30000, gosvw=b"", ma_en=False, imi_en=False)
    if state == "LAUNCH":
        return
    await h.fw.activate(h.gctx, 7)
    h.asid = 7
    if state == "LAUNCH_ACTIVE":
        return
    await h.place(0x5000, None, PageType.SECRETS)
    h.secrets_gpa = 0x5000
    await h.finish()


def _launch_update(h: Host) -> Command:
    spa = h.shared_page()
    h.rmp.rmpupdate(spa, gpa=0x9000, assigned=True, size_2m=False, immutable=True, asid=h.asid or 7)
    return lambda: h.fw.launch_update(
        h.gctx,
        address=spa,
        page_type=PageType.NORMAL,
        size_2m=False,
        imi=False,
        vmpl_perms=(0, 0, 0),
    )


def _guest_request(h: Host) -> Command:
    req, res = h.shared_page(), h.firmware_page()
    key = h.vmpck(0) if h.secrets_gpa else bytes(32)
    hdr = gm.Header(seqno=1, msg_type=gm.MsgType.REPORT_REQ, msg_version=1, msg_sz=96, vmpck=0)
    h.rmp.frames.replace(req >> 12, gm.seal(key, hdr, report_request()))
    return lambda: h.fw.guest_request(h.gctx, req, res)


GUEST_COMMANDS: dict[str, Callable[[Host], Command]] = {
    "SNP_LAUNCH_START": lambda h: (
        lambda: h.fw.launch_start(h.gctx, policy=0x30000, gosvw=b"", ma_en=False, imi_en=False)
    ),
    "SNP_ACTIVATE": lambda h: lambda: h.fw.activate(h.gctx, 8),
    "SNP_LAUNCH_UPDATE": _launch_update,
    "SNP_LAUNCH_FINISH": lambda h: lambda: h.finish(),
    "SNP_GUEST_REQUEST": _guest_request,
    "SNP_GUEST_STATUS": lambda h: lambda: h.fw.guest_status(h.gctx),
    "SNP_DBG_DECRYPT": lambda h: partial(
        h.fw.dbg_decrypt, h.gctx, h.shared_page(), h.firmware_page()
    ),
    "SNP_DECOMMISSION": lambda h: lambda: h.fw.decommission(h.gctx),
    "SNP_PAGE_RECLAIM(live context)": lambda h: lambda: h.fw.page_reclaim(h.gctx, False),
}

PF = SevStatus.POLICY_FAILURE
INACTIVE = SevStatus.INACTIVE
ACTIVE = SevStatus.ACTIVE
PSTATE = SevStatus.INVALID_PAGE_STATE
# command -> status in guest state INIT, LAUNCH (no ASID), LAUNCH (activated), RUNNING
GUEST_TABLE = {
    "SNP_LAUNCH_START": (OK, IGS, IGS, IGS),
    "SNP_ACTIVATE": (IGS, OK, ACTIVE, ACTIVE),
    "SNP_LAUNCH_UPDATE": (IGS, INACTIVE, OK, IGS),
    "SNP_LAUNCH_FINISH": (IGS, INACTIVE, OK, IGS),
    "SNP_GUEST_REQUEST": (IGS, IGS, IGS, OK),
    "SNP_GUEST_STATUS": (OK, OK, OK, OK),
    "SNP_DBG_DECRYPT": (IGS, PF, PF, PF),
    "SNP_DECOMMISSION": (OK, OK, OK, OK),
    "SNP_PAGE_RECLAIM(live context)": (PSTATE, PSTATE, PSTATE, PSTATE),
}
GUEST_STATES = ["INIT", "LAUNCH", "LAUNCH_ACTIVE", "RUNNING"]


@pytest.mark.parametrize("state", GUEST_STATES)
@pytest.mark.parametrize("name", sorted(GUEST_TABLE))
async def test_guest_state_command_pairs(tmp: Path, state: str, name: str) -> None:
    h = make_host(tmp)
    await _to_state(h, state)
    await expect(h, GUEST_COMMANDS[name](h), GUEST_TABLE[name][GUEST_STATES.index(state)])


async def test_asid_rules(tmp: Path) -> None:
    h = make_host(tmp)
    await _to_state(h, "LAUNCH_ACTIVE")
    other = h.firmware_page()
    await h.fw.gctx_create(other)
    await h.fw.launch_start(other, policy=0x30000, gosvw=b"", ma_en=False, imi_en=False)
    await expect(h, lambda: h.fw.activate(other, 7), SevStatus.ASID_OWNED)
    await expect(h, lambda: h.fw.activate(other, 0), SevStatus.INVALID_ASID)
    await expect(h, lambda: h.fw.activate(other, 100), SevStatus.INVALID_ASID)
    await h.fw.decommission(h.gctx)
    await expect(h, lambda: h.fw.activate(other, 7), SevStatus.DFFLUSH_REQUIRED)
    await expect(h, lambda: h.fw.snp_shutdown(), IPS)
    h.rmp.wbinvd()  # wbinvd_on_all_cpus() before DF_FLUSH, as sev_flush_asids() does
    await h.fw.df_flush()
    await expect(h, lambda: h.fw.activate(other, 7), OK)


async def test_shutdown_needs_df_flush_after_decommission(tmp: Path) -> None:
    h = make_host(tmp)
    await _to_state(h, "LAUNCH_ACTIVE")
    await h.fw.decommission(h.gctx)
    await expect(h, lambda: h.fw.snp_shutdown_ex(iommu=True, x86=True), SevStatus.DFFLUSH_REQUIRED)
    h.rmp.wbinvd()
    await h.fw.df_flush()
    await expect(h, lambda: h.fw.snp_shutdown_ex(iommu=True, x86=True), OK)


# KERNEL: include/uapi/linux/psp-sev.h SEV_RET_WBINVD_REQUIRED = 0x000E,
# SEV_RET_DFFLUSH_REQUIRED = 0x000F
SEV_RET_WBINVD_REQUIRED = 0x000E
SEV_RET_DFFLUSH_REQUIRED = 0x000F


async def test_df_flush_needs_a_wbinvd_since_the_last_decommission(tmp: Path) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c sev_flush_asids(): "DEACTIVATE will clear the WBINVD
    indicator causing DF_FLUSH to fail", so wbinvd_on_all_cpus() runs right before DF_FLUSH.
    A refused DF_FLUSH changes nothing (the ASID stays unflushed)."""

    assert SevStatus.WBINVD_REQUIRED == SEV_RET_WBINVD_REQUIRED
    assert SevStatus.DFFLUSH_REQUIRED == SEV_RET_DFFLUSH_REQUIRED
    h = make_host(tmp)
    await _to_state(h, "LAUNCH_ACTIVE")
    await expect(h, h.fw.df_flush, OK)  # nothing decommissioned yet: the indicator is set
    h.rmp.wbinvd()  # a WBINVD before the DECOMMISSION does not count
    await h.fw.decommission(h.gctx)
    await expect(h, h.fw.df_flush, SevStatus.WBINVD_REQUIRED)
    assert h.fw.unflushed == {h.asid}
    h.rmp.wbinvd()
    await expect(h, h.fw.df_flush, OK)
    assert h.fw.unflushed == set()
    # the ASID is free again, and DF_FLUSH may repeat without another WBINVD
    await expect(h, h.fw.df_flush, OK)


async def test_decommission_of_a_guest_without_an_asid_leaves_the_indicator(tmp: Path) -> None:
    """No ASID was bound, so no cache lines carry it: DF_FLUSH stays possible."""

    h = make_host(tmp)
    await _to_state(h, "LAUNCH_ACTIVE")
    other = h.firmware_page()
    await h.fw.gctx_create(other)
    await h.fw.decommission(other)
    assert h.rmp.wbinvd_indicator
    await expect(h, h.fw.df_flush, OK)


@pytest.mark.parametrize(
    ("policy", "status"),
    [
        (0x10000, SevStatus.POLICY_FAILURE),  # bit 17 clear
        (0x20000, SevStatus.POLICY_FAILURE),  # SMT not allowed on an SMT host
        (0x30000 | 2 << 8, SevStatus.POLICY_FAILURE),  # needs ABI 2.0
        (0x30000 | 1 << 18, SevStatus.POLICY_FAILURE),  # migration agent
        (0x30000 | 1 << 40, SevStatus.INVALID_PARAM),  # reserved bit
        (0x30000 | 1 << 8 | 55, OK),  # ABI 1.55 is this firmware's
    ],
)
async def test_launch_start_policy_checks(tmp: Path, policy: int, status: SevStatus) -> None:
    h = make_host(tmp)
    await _to_state(h, "INIT")
    await expect(
        h,
        lambda: h.fw.launch_start(h.gctx, policy=policy, gosvw=b"", ma_en=False, imi_en=False),
        status,
    )


async def test_page_state_errors(tmp: Path) -> None:
    h = make_host(tmp)
    await h.fw.snp_init()
    # the context page and the status page must be firmware pages
    await expect(h, lambda: h.fw.gctx_create(h.shared_page()), SevStatus.INVALID_PAGE_STATE)
    await expect(h, lambda: h.fw.platform_status(h.shared_page()), SevStatus.INVALID_PAGE_STATE)
    await expect(h, lambda: h.fw.gctx_create(h.shared_page() | 8), SevStatus.INVALID_ADDRESS)
    await _to_state_after_init(h)
    # a page that is not pre-guest, or belongs to another ASID
    spa = h.shared_page()
    await expect(
        h,
        lambda: h.fw.launch_update(
            h.gctx, address=spa, page_type=1, size_2m=False, imi=False, vmpl_perms=(0, 0, 0)
        ),
        SevStatus.INVALID_PAGE_STATE,
    )
    h.rmp.rmpupdate(spa, gpa=0, assigned=True, size_2m=False, immutable=True, asid=9)
    await expect(
        h,
        lambda: h.fw.launch_update(
            h.gctx, address=spa, page_type=1, size_2m=False, imi=False, vmpl_perms=(0, 0, 0)
        ),
        SevStatus.INVALID_PAGE_OWNER,
    )
    await expect(
        h,
        lambda: h.fw.launch_update(
            h.gctx, address=spa, page_type=7, size_2m=False, imi=False, vmpl_perms=(0, 0, 0)
        ),
        SevStatus.INVALID_PARAM,
    )


async def _to_state_after_init(h: Host) -> None:
    h.gctx = h.firmware_page()
    await h.fw.gctx_create(h.gctx)
    await h.fw.launch_start(h.gctx, policy=0x30000, gosvw=b"", ma_en=False, imi_en=False)
    await h.fw.activate(h.gctx, 7)
    h.asid = 7


async def test_cpuid_page_is_validated_and_corrected(tmp: Path) -> None:
    import struct

    h = make_host(tmp)
    await _to_state(h, "LAUNCH_ACTIVE")
    table = bytearray(4096)
    struct.pack_into("<I", table, 0, 2)
    struct.pack_into("<IIQQIIIIQ", table, 16, 0x8000001F, 0, 0, 0, 0xFFFFFFFF, 0x33, 0, 0, 0)
    struct.pack_into("<IIQQIIIIQ", table, 64, 0x1, 0, 0, 0, 0x00A00F11, 0, 0, 0, 0)
    spa = h.shared_page()
    h.rmp.frames.write(spa >> 12, 0, bytes(table))
    h.rmp.rmpupdate(spa, gpa=0x6000, assigned=True, size_2m=False, immutable=True, asid=7)
    with pytest.raises(FirmwareError) as info:
        await h.fw.launch_update(
            h.gctx,
            address=spa,
            page_type=PageType.CPUID,
            size_2m=False,
            imi=False,
            vmpl_perms=(0, 0, 0),
        )
    assert info.value.status == SevStatus.INVALID_PARAM
    back = h.rmp.host_read(spa, 4096)  # corrected and left unencrypted
    # Which bits the firmware allows is product specific and unpublished
    # (UNVERIFIED(cpuid-policy)), so the expectation is what any correction must be: fewer
    # bits than asked for, keeping the SEV features of an SNP host. KERNEL:
    # arch/x86/include/asm/cpufeatures.h word 19 (CPUID 0x8000001F EAX): X86_FEATURE_SME
    # bit 0, X86_FEATURE_SEV 1, X86_FEATURE_SEV_ES 3, X86_FEATURE_SEV_SNP 4
    sev_features = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4
    eax = struct.unpack_from("<I", back, 16 + 24)[0]
    assert eax != 0xFFFFFFFF and eax & sev_features == sev_features, hex(eax)
    assert back[64:112] == table[64:112]
    # the host fixes the table as told and retries
    await h.fw.launch_update(
        h.gctx,
        address=spa,
        page_type=PageType.CPUID,
        size_2m=False,
        imi=False,
        vmpl_perms=(0, 0, 0),
    )
