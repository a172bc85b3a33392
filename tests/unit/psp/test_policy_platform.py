"""The guest-policy checks that depend on the machine: SMT (SNP_LAUNCH_START), SINGLE_SOCKET
(SNP_ACTIVATE), and the SMT_EN bit of the report's PLATFORM_INFO. Each refusal leaves the guest
as it was.

Expected outcomes are the firmware's, as stated where KVM gave these checks up (KERNEL:
arch/x86/kvm/svm/sev.c snp_launch_start(), commits "KVM: SVM: Allow SNP guest policy disallow
running with SMT enabled" and "... to specify SINGLE_SOCKET"):

    SMT on in the BIOS:   policy SMT 0 -> SNP_LAUNCH_START POLICY_FAILURE, SMT 1 -> success
    SMT off in the BIOS:  either value -> success
    one socket:           SINGLE_SOCKET 0 or 1 -> SNP_ACTIVATE success
    more than one:        SINGLE_SOCKET 1 -> SNP_ACTIVATE POLICY_FAILURE, 0 -> success
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from snpemu.hostconfig import ConfigError
from snpemu.psp.firmware import Firmware
from snpemu.psp.guest import GuestState
from snpemu.psp.local_rmp import LocalRmp
from snpemu.psp.status import FirmwareError
from snpemu.psp.topology import Topology
from snpemu.rmp.machine import RmpMachine

from tests.unit.psp.launch_helpers import Host, identity

# SPEC: SNP ABI, Guest Policy
SMT = 1 << 16
RSVD_MBO = 1 << 17
SINGLE_SOCKET = 1 << 20
# SPEC: SNP ABI, Status Codes
POLICY_FAILURE = 0x07
# SPEC: SNP ABI, ATTESTATION_REPORT: PLATFORM_INFO at 0x40, bit 0 SMT_EN
PLATFORM_INFO = 0x40


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chip")


def host_on(tmp: Path, topology: Topology) -> Host:
    rmp = RmpMachine(64 << 20)
    return Host(rmp, Firmware(identity(tmp), LocalRmp(rmp), topology))


async def created(h: Host) -> None:
    await h.fw.snp_init()
    h.gctx = h.firmware_page()
    await h.fw.gctx_create(h.gctx)


@pytest.mark.parametrize(
    ("smt_enabled", "policy_smt", "refused"),
    [(True, 0, True), (True, SMT, False), (False, 0, False), (False, SMT, False)],
)
async def test_launch_start_refuses_smt_0_only_when_smt_is_enabled(
    tmp: Path, smt_enabled: bool, policy_smt: int, refused: bool
) -> None:
    h = host_on(tmp, Topology(smt=smt_enabled))
    await created(h)
    start = h.fw.launch_start(
        h.gctx, policy=RSVD_MBO | policy_smt, gosvw=b"", ma_en=False, imi_en=False
    )
    if not refused:
        await start
        assert h.fw.guests[h.gctx].state == GuestState.LAUNCH
        return
    with pytest.raises(FirmwareError) as info:
        await start
    assert info.value.status == POLICY_FAILURE
    assert info.value.reason == "POLICY_FAILURE"
    ctx = h.fw.guests[h.gctx]
    assert (ctx.state, ctx.policy) == (GuestState.INIT, 0)


@pytest.mark.parametrize(
    ("sockets", "single_socket", "refused"),
    [(1, 0, False), (1, SINGLE_SOCKET, False), (2, 0, False), (2, SINGLE_SOCKET, True)],
)
async def test_activate_refuses_single_socket_on_a_multi_socket_system(
    tmp: Path, sockets: int, single_socket: int, refused: bool
) -> None:
    h = host_on(tmp, Topology(sockets=sockets))
    await created(h)
    policy = SMT | RSVD_MBO | single_socket
    await h.fw.launch_start(h.gctx, policy=policy, gosvw=b"", ma_en=False, imi_en=False)
    if not refused:
        await h.fw.activate(h.gctx, 5)
        assert h.fw.asids == {5: h.gctx}
        return
    with pytest.raises(FirmwareError) as info:
        await h.fw.activate(h.gctx, 5)
    assert info.value.status == POLICY_FAILURE
    assert (h.fw.guests[h.gctx].asid, h.fw.asids) == (0, {})
    assert not h.rmp.keys.has(5)  # no key was installed for the ASID


@pytest.mark.parametrize("smt_enabled", [True, False])
async def test_report_platform_info_says_whether_smt_is_enabled(
    tmp: Path, smt_enabled: bool
) -> None:
    h = host_on(tmp, Topology(smt=smt_enabled))
    await h.start(policy=SMT | RSVD_MBO)
    await h.finish()
    report = h.fw.attestation_report(h.fw.guests[h.gctx], bytes(64), 0)
    result = int(struct.unpack_from("<Q", report, PLATFORM_INFO)[0])
    assert result & 1 == int(smt_enabled)


def test_topology_settings() -> None:
    assert Topology.from_env({}) == Topology(smt=True, sockets=1)
    assert Topology.from_env({"SNPEMU_HOST_SMT": "0", "SNPEMU_HOST_SOCKETS": "2"}) == Topology(
        smt=False, sockets=2
    )
    for bad in ({"SNPEMU_HOST_SMT": "yes"}, {"SNPEMU_HOST_SOCKETS": "3"}):
        with pytest.raises(ConfigError, match="SNPEMU_HOST_"):
            Topology.from_env(bad)
