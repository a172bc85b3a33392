"""A VM's firmware, kernel and initrd: the bytes of the request, or a file of the host's image
directory, read once by CreateVm and kept with the VM's config until it is launched.

QEMU opens -bios/-kernel/-initrd with the VMM's own rights. kvm is a shared host service, so a
path names a file of the operator's, never any file kvm can read: it is resolved (symlinks and
"..") and must lie in the image directory, or be kvm's own default firmware. Only a regular file
is read (a FIFO or device is refused without blocking), at most a cap per image, off the event
loop. The firmware must be an image QEMU would launch as an SNP guest's (its SEV metadata, the
pages fit the VM), so LaunchVm cannot fail late on an image.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from dataclasses import dataclass, field

from snpemu.abi.page_type import PageType
from snpemu.errors import InvalidArgument, NotFound, PermissionDenied, SnpemuError, Unavailable
from snpemu.kvm.config import VmConfig
from snpemu.kvm.reasons import KvmReason
from snpemu.vmm import launch_plan, memory_layout
from snpemu.vmm.ovmf import FOUR_GB, Ovmf

MIB = 1 << 20
# KERNEL: include/uapi/linux/limits.h PATH_MAX (with its NUL)
PATH_LIMIT = 4096
# QEMU hw/i386/x86.c x86_load_linux(): "kernel command line too long" past the setup header's
# cmdline_size (with its NUL), 2048 for Linux's x86 COMMAND_LINE_SIZE
# (arch/x86/include/asm/setup.h).
CMDLINE_LIMIT = 2048
_PATH_QUOTE = 48  # how much of a caller's path an error message repeats
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageLimits:
    """The largest image of each kind kvm reads (bytes)."""

    firmware: int = 16 * MIB
    kernel: int = 64 * MIB
    initrd: int = 256 * MIB


@dataclass(frozen=True)
class ImageStore:
    """Where kvm reads images from: the image directory, and its own default firmware (which
    may lie outside it, the operator having named it)."""

    directory: str
    default_firmware: str
    limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def beside(cls, default_firmware: str, limits: ImageLimits | None = None) -> ImageStore:
        """The default: the default firmware's own directory (Debian's /usr/share/OVMF)."""
        return cls(
            os.path.dirname(os.path.abspath(default_firmware)),
            default_firmware,
            limits or ImageLimits(),
        )


@dataclass(frozen=True)
class LaunchImages:
    """What the launch needs of the images: the firmware, the kernel hashes table if a kernel
    was given (QEMU hashes kernel, initrd and command line; docs/abi.md#launch-order)."""

    ovmf: Ovmf = field(repr=False)
    kernel_hashes: bytes | None = field(default=None, repr=False)


def check_request(config: VmConfig, limits: ImageLimits) -> None:
    """What is wrong with the images a config names, before any file is touched."""
    for kind, path, data, cap in (
        ("firmware", config.firmware_path, config.firmware, limits.firmware),
        ("kernel", config.kernel_path, config.kernel, limits.kernel),
        ("initrd", config.initrd_path, config.initrd, limits.initrd),
    ):
        if path and data:
            raise InvalidArgument(
                f"{kind}_path and {kind} both given: name the image or send it, not both",
                reason=KvmReason.IMAGE_PATH_AND_BYTES,
            )
        if len(path) >= PATH_LIMIT or "\0" in path:
            raise InvalidArgument(
                f"{kind}_path {quote(path)} is not a path (NUL or over {PATH_LIMIT - 1} bytes)",
                reason=KvmReason.IMAGE_PATH_INVALID,
            )
        if len(data) > cap:
            raise InvalidArgument(
                f"{kind} is {len(data)} bytes, more than this host's {cap}",
                reason=KvmReason.IMAGE_TOO_LARGE,
            )
    has_kernel = config.kernel_path or config.kernel
    # QEMU system/vl.c: "-initrd only allowed with -kernel option", and -append likewise
    if not has_kernel and (config.initrd_path or config.initrd or config.cmdline):
        raise InvalidArgument(
            "an initrd or a command line needs a kernel", reason=KvmReason.KERNEL_REQUIRED
        )
    if len(config.cmdline.encode()) >= CMDLINE_LIMIT:
        raise InvalidArgument(
            f"cmdline is over {CMDLINE_LIMIT - 1} bytes", reason=KvmReason.CMDLINE_TOO_LONG
        )


async def load(
    store: ImageStore, config: VmConfig, *, vcpu_signature: int, sev_features: int
) -> LaunchImages:
    """Read and check the images of a config (check_request first), off the event loop."""
    check_request(config, store.limits)
    return await asyncio.to_thread(_load, store, config, vcpu_signature, sev_features)


def _load(
    store: ImageStore, config: VmConfig, vcpu_signature: int, sev_features: int
) -> LaunchImages:
    lim = store.limits
    firmware = config.firmware or read_image(
        store, "firmware", config.firmware_path or store.default_firmware, lim.firmware
    )
    kernel_hashes = None
    if config.kernel_path or config.kernel:
        kernel = config.kernel or read_image(store, "kernel", config.kernel_path, lim.kernel)
        if not kernel:
            raise InvalidArgument("the kernel is empty", reason=KvmReason.IMAGE_EMPTY)
        initrd = config.initrd
        if config.initrd_path:
            initrd = read_image(store, "initrd", config.initrd_path, lim.initrd)
        kernel_hashes = launch_plan.kernel_hashes_table(kernel, initrd, config.cmdline)
    ovmf = parse_firmware(firmware)
    check_launch(ovmf, config, vcpu_signature, sev_features, kernel_hashes)
    return LaunchImages(ovmf, kernel_hashes)


def parse_firmware(data: bytes) -> Ovmf:
    try:
        ovmf = Ovmf.parse(data)
    except (ValueError, struct.error) as e:  # OvmfError is a ValueError
        raise InvalidArgument(
            f"the firmware is not an OVMF image: {e}", reason=KvmReason.FIRMWARE_INVALID
        ) from None
    if not ovmf.sections:
        # QEMU target/i386/sev.c sev_snp_launch_finish(): "Failed to locate SEV metadata header"
        raise InvalidArgument(
            "the firmware has no SEV metadata (not an SNP-capable OVMF)",
            reason=KvmReason.FIRMWARE_INVALID,
        )
    return ovmf


def check_launch(
    ovmf: Ovmf,
    config: VmConfig,
    vcpu_signature: int,
    sev_features: int,
    kernel_hashes: bytes | None,
) -> None:
    """The launch plan of these images can be made and every page lands in the VM's memory:
    its RAM from GPA 0 or the firmware's range below 4 GiB."""
    try:
        plan = launch_plan.plan(
            ovmf,
            vcpus=config.vcpus,
            vcpu_signature=vcpu_signature,
            sev_features=sev_features,
            kernel_hashes=kernel_hashes,
        )
    except (ValueError, struct.error) as e:
        # QEMU target/i386/sev.c: no reset block for the APs, no hashes table for a kernel
        raise InvalidArgument(
            f"the firmware cannot launch this VM: {e}", reason=KvmReason.FIRMWARE_INVALID
        ) from None
    ram = memory_layout.ram_regions(config.memory_bytes)
    for page in plan:
        if page.page_type == PageType.VMSA:
            continue
        in_ram = any(r.gpa <= page.gpa < r.gpa + r.size for r in ram)
        if not (in_ram or ovmf.gpa <= page.gpa < FOUR_GB):
            raise InvalidArgument(
                f"the firmware places a page at GPA {page.gpa:#x}, outside the VM's "
                f"{config.memory_bytes >> 20} MiB of RAM (QEMU's q35 layout) and the firmware",
                reason=KvmReason.FIRMWARE_INVALID,
            )


def read_image(store: ImageStore, kind: str, path: str, cap: int) -> bytes:
    """The file `path` names (relative: in the image directory), if it resolves inside the
    image directory (or is the default firmware), is a regular file and at most `cap` bytes."""
    base = os.path.realpath(store.directory)
    real = os.path.realpath(os.path.join(base, path))
    inside = os.path.commonpath([base, real]) == base
    if not inside and not (kind == "firmware" and real == os.path.realpath(store.default_firmware)):
        raise PermissionDenied(
            f"{kind}_path {quote(path)} is outside the image directory",
            reason=KvmReason.IMAGE_OUTSIDE_DIR,
        )
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (and fstat refuses it)
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        raise _open_error(kind, path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(
                f"{kind}_path {quote(path)} is not a regular file",
                reason=KvmReason.IMAGE_NOT_REGULAR,
            )
        _same_file(fd, real, kind, path)
        if st.st_size > cap:
            raise _too_large(kind, path, cap)
        chunks, total = [], 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if total > cap:  # it grew while being read
                raise _too_large(kind, path, cap)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise Unavailable(
            f"reading {kind}_path {quote(path)} failed: {e.strerror}",
            reason=KvmReason.IMAGE_UNREADABLE,
        ) from None
    finally:
        os.close(fd)


def _same_file(fd: int, real: str, kind: str, path: str) -> None:
    """What was opened is what was checked: a directory on the way swapped for a symlink
    between the check and the open is caught here."""
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no procfs: the check before the open stands alone
    if opened != real:
        raise PermissionDenied(
            f"{kind}_path {quote(path)} changed while it was opened",
            reason=KvmReason.IMAGE_OUTSIDE_DIR,
        )


def _open_error(kind: str, path: str, e: OSError) -> SnpemuError:
    what = f"{kind}_path {quote(path)}"
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return NotFound(f"{what}: no such image", reason=KvmReason.IMAGE_NOT_FOUND)
    if isinstance(e, PermissionError):
        return PermissionDenied(f"{what}: kvm may not read it", reason=KvmReason.IMAGE_UNREADABLE)
    if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV):
        # ELOOP: the last component became a symlink after it was resolved
        return InvalidArgument(f"{what} is not a regular file", reason=KvmReason.IMAGE_NOT_REGULAR)
    return Unavailable(f"{what}: {e.strerror}", reason=KvmReason.IMAGE_UNREADABLE)


def _too_large(kind: str, path: str, cap: int) -> InvalidArgument:
    return InvalidArgument(
        f"{kind}_path {quote(path)} is larger than this host's {cap} bytes",
        reason=KvmReason.IMAGE_TOO_LARGE,
    )


def quote(path: str) -> str:
    return repr(path if len(path) <= _PATH_QUOTE else path[:_PATH_QUOTE] + "...")
