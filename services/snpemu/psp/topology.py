"""The facts about the machine that the firmware checks a guest policy against: whether the
BIOS left SMT enabled, and how many sockets the system has.

SPEC: SNP ABI, Guest Policy (SMT bit 16, SINGLE_SOCKET bit 20), SNP_LAUNCH_START and
SNP_ACTIVATE. The firmware, not KVM, refuses a policy the machine does not meet (KERNEL:
arch/x86/kvm/svm/sev.c snp_launch_start() leaves both bits to it):

    policy SMT = 0, SMT enabled            -> SNP_LAUNCH_START fails with POLICY_FAILURE
    policy SINGLE_SOCKET = 1, > 1 socket   -> SNP_ACTIVATE fails with POLICY_FAILURE

Settings (environment or .env), checked at start:

SNPEMU_HOST_SMT      1 | 0: SMT enabled in the BIOS (default 1)
SNPEMU_HOST_SOCKETS  1 | 2: populated sockets (default 1; EPYC systems have one or two)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snpemu.hostconfig import ConfigError, count

MAX_SOCKETS = 2


@dataclass(frozen=True)
class Topology:
    smt: bool = True
    sockets: int = 1

    @classmethod
    def from_env(cls, values: Mapping[str, str]) -> Topology:
        smt = values.get("SNPEMU_HOST_SMT", "1")
        if smt not in ("0", "1"):
            raise ConfigError(f"SNPEMU_HOST_SMT={smt!r}: 1 or 0")
        sockets = count(
            {"SNPEMU_HOST_SOCKETS": "1", **values}, "SNPEMU_HOST_SOCKETS", 1, MAX_SOCKETS
        )
        return cls(smt=smt == "1", sockets=sockets)
