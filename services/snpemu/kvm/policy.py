"""The checks kvm makes of a VM's configuration before any resource is taken, and how a
firmware command's failure reaches kvm's caller."""

from __future__ import annotations

from snpemu.abi import policy as guest_policy
from snpemu.abi.vcpu_type import VCPU_TYPES
from snpemu.errors import InvalidArgument, SnpemuError, WrongState
from snpemu.kvm.config import VmConfig
from snpemu.kvm.reasons import KvmReason
from snpemu.psp.status import SevStatus, is_state_error
from snpemu.runtime.peers import PeerError

# RAM above 4 GiB goes on from there (vmm/memory_layout.py); up to 512 GiB, so it never reaches
# the HyperTransport hole below 1 TiB that QEMU moves it past
MAX_RAM = 512 << 30
MIN_RAM = 16 << 20
MAX_VCPUS = 64
# KERNEL: arch/x86/include/asm/svm.h SVM_SEV_FEAT_*
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5


def policy_of(config: VmConfig) -> int:
    # 0: QEMU's default for sev-snp-guest (SMT allowed, RSVD_MBO)
    return config.policy or int(guest_policy.DEFAULT)


def check_config(config: VmConfig, supported_vmsa_features: int) -> int:
    """What KVM_CREATE_VM + KVM_SEV_INIT2 refuse, before anything is taken: returns the VMSA
    features (without SNP_ACTIVE)."""
    mem, vcpus = config.memory_bytes, config.vcpus
    if not MIN_RAM <= mem <= MAX_RAM or mem % (2 << 20):
        raise InvalidArgument("memory_bytes must be a multiple of 2 MiB in 16 MiB..512 GiB")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidArgument("vcpus must be in 1..64")
    # UNVERIFIED(policy-at-create): KVM checks the policy in snp_launch_start(); it is part
    # of the VM's config here, so it is checked when the VM is made and a bad one creates
    # nothing.
    check_policy(policy_of(config))
    vmsa_features = check_vmsa_features(config.guest_features, supported_vmsa_features)
    if config.vcpu_type and config.vcpu_type not in VCPU_TYPES:
        raise InvalidArgument(f"unknown vcpu_type {config.vcpu_type}")
    if config.host_data and len(config.host_data) != 32:
        raise InvalidArgument("host_data is 32 bytes")
    return vmsa_features


def check_policy(policy: int) -> None:
    """The guest policy checks KVM makes before the firmware sees it; SMT and SINGLE_SOCKET
    are the firmware's to refuse (SPEC: SNP ABI, SNP_LAUNCH_START and SNP_ACTIVATE).
    KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start() (-EINVAL for either)."""
    # KERNEL: sev.c SNP_POLICY_MASK_VALID (abi/policy.py KVM_VALID_MASK: API_MINOR, API_MAJOR,
    # SMT, RSVD_MBO, DEBUG, SINGLE_SOCKET)
    valid = guest_policy.KVM_VALID_MASK
    if policy & ~valid:
        raise InvalidArgument(
            f"policy {policy:#x} sets bits {policy & ~valid:#x} KVM does not "
            f"support (SNP_POLICY_MASK_VALID is {valid:#x})",
            reason=KvmReason.POLICY_UNSUPPORTED,
        )
    if not policy & guest_policy.GuestPolicy.RSVD_MBO:
        raise InvalidArgument(
            f"policy {policy:#x}: bit 17 (reserved, must be one) is zero",
            reason=KvmReason.POLICY_MBO,
        )


def check_vmsa_features(requested: int, supported: int) -> int:
    """KVM_SEV_INIT2's vmsa_features: the VM's SEV_FEATURES without SNP_ACTIVE.

    A bit outside sev_supported_vmsa_features is -EINVAL (KERNEL: arch/x86/kvm/svm/sev.c
    __sev_guest_init()). SNP_ACTIVE is not among them: QEMU clears it before the ioctl and
    KVM sets it again (QEMU target/i386/sev.c sev_common_kvm_init()), so it is accepted here
    and ignored.
    """
    features = requested & ~SVM_SEV_FEAT_SNP_ACTIVE
    if features & ~supported:
        raise InvalidArgument(
            f"guest_features {requested:#x}: bits {features & ~supported:#x} are not in the "
            f"VMSA features this host supports ({supported | SVM_SEV_FEAT_SNP_ACTIVE:#x})",
            reason=KvmReason.VMSA_FEATURES_UNSUPPORTED,
        )
    return features


def firmware_failure(e: PeerError) -> SnpemuError:
    """A firmware command's failure as the caller's error: the SEV status name and fw_status
    as the psp reported them, in the category the firmware model gives that status (KVM hands
    the firmware's status back in kvm_sev_cmd.error; KERNEL: arch/x86/kvm/svm/sev.c
    __sev_issue_cmd())."""
    assert e.fw_status is not None  # INVARIANT: the caller checked
    try:
        state = is_state_error(SevStatus(e.fw_status))
    except ValueError:
        state = True  # a status this firmware model does not know: not the caller's input
    cls: type[SnpemuError] = WrongState if state else InvalidArgument
    return cls(e.message, reason=e.reason, metadata=e.metadata)
