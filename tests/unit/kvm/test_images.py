"""kvm reads a VM's images only from its image directory, or takes them as bytes (kvm/images.py):
resolved paths that stay inside, regular files only (a FIFO refused without blocking), a cap
per image, off the event loop, every refusal a clear error, and nothing taken on refusal.

The refused cases are the ones reported against CreateVm/LaunchVm: a FIFO as kernel_path (kvm
froze), /etc/hostname as firmware, a missing or directory kernel (UNKNOWN with a traceback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from snpemu.errors import InvalidArgument, NotFound, PermissionDenied, SnpemuError
from snpemu.kvm import images
from snpemu.kvm.config import VmConfig
from snpemu.kvm.images import ImageLimits, ImageStore
from snpemu.kvm.machine import Kvm
from snpemu.kvm.options import KvmOptions
from snpemu.kvm.reasons import KvmReason
from snpemu.vmm import tiny_firmware
from snpemu.vmm.ovmf import SEV_META_DATA_GUID, _footer_table

from tests.unit.kvm.fakes import FakePsp, FakeRmp, Faults
from tests.unit.kvm.test_rollback import held

TINY = tiny_firmware.build()
SMALL = ImageLimits(firmware=len(TINY), kernel=4096, initrd=4096)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    d = tmp_path / "images"
    d.mkdir()
    (d / "fw.fd").write_bytes(TINY)
    (d / "vmlinuz").write_bytes(b"k" * 4096)
    return ImageStore(str(d), str(d / "fw.fd"), SMALL)


def cfg(vcpus: int = 2, **kw: object) -> VmConfig:
    return VmConfig(memory_bytes=16 << 20, vcpus=vcpus, **kw)  # type: ignore[arg-type]


def bad_metadata() -> bytes:
    """The tiny firmware with its SEV metadata offset pointing past the image's end."""
    table = _footer_table(TINY)[SEV_META_DATA_GUID]
    at = TINY.rindex(table)
    return TINY[:at] + struct.pack("<I", 0) + TINY[at + 4 :]


def refused(store: ImageStore, config: VmConfig) -> SnpemuError:
    with pytest.raises(SnpemuError) as info:
        asyncio.run(images.load(store, config, vcpu_signature=0, sev_features=1))
    return info.value


def test_a_fifo_is_refused_without_blocking(store: ImageStore) -> None:
    fifo = Path(store.directory) / "fifo"
    os.mkfifo(fifo)
    out: list[BaseException] = []

    def read() -> None:
        try:
            images.read_image(store, "kernel", "fifo", SMALL.kernel)
        except BaseException as e:  # handed to the test's thread
            out.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    try:
        assert not reader.is_alive(), "opening the FIFO blocked"
    finally:
        if reader.is_alive():  # a writer end releases a reader stuck in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(out[0], InvalidArgument), out
    assert out[0].reason == KvmReason.IMAGE_NOT_REGULAR


@pytest.mark.parametrize(
    ("make", "path", "cls", "reason"),
    [
        # a symlink in the directory that leads out of it
        (
            lambda d: (d / "esc").symlink_to("/etc/hostname"),
            "esc",
            PermissionDenied,
            KvmReason.IMAGE_OUTSIDE_DIR,
        ),
        (lambda d: None, "../../../etc/hostname", PermissionDenied, KvmReason.IMAGE_OUTSIDE_DIR),
        (lambda d: None, "/etc/hostname", PermissionDenied, KvmReason.IMAGE_OUTSIDE_DIR),
        (lambda d: None, "/dev/zero", PermissionDenied, KvmReason.IMAGE_OUTSIDE_DIR),
        (
            lambda d: (d / "zero").symlink_to("/dev/zero"),
            "zero",
            PermissionDenied,
            KvmReason.IMAGE_OUTSIDE_DIR,
        ),
        # missing inside the directory (outside it, existence is not told: OUTSIDE above)
        (lambda d: None, "nonexistent", NotFound, KvmReason.IMAGE_NOT_FOUND),
        (
            lambda d: (d / "dangling").symlink_to(d / "gone"),
            "dangling",
            NotFound,
            KvmReason.IMAGE_NOT_FOUND,
        ),
        (lambda d: (d / "sub").mkdir(), "sub", InvalidArgument, KvmReason.IMAGE_NOT_REGULAR),
        (lambda d: None, ".", InvalidArgument, KvmReason.IMAGE_NOT_REGULAR),
        (
            lambda d: (d / "big").write_bytes(bytes(4097)),
            "big",
            InvalidArgument,
            KvmReason.IMAGE_TOO_LARGE,
        ),
    ],
    ids=[
        "symlink-escape",
        "dotdot",
        "absolute-outside",
        "dev-zero",
        "symlink-to-device",
        "missing",
        "dangling-symlink",
        "directory",
        "the-directory-itself",
        "oversize",
    ],
)
def test_a_kernel_path_kvm_must_not_read_is_refused(
    store: ImageStore, make: object, path: str, cls: type[SnpemuError], reason: KvmReason
) -> None:
    make(Path(store.directory))  # type: ignore[operator]
    e = refused(store, cfg(kernel_path=path))
    assert type(e) is cls and e.reason == reason, (e, e.reason)
    assert len(e.message) < 200


def test_a_device_inside_the_image_directory_is_not_a_regular_file() -> None:
    e = refused(ImageStore("/dev", "/dev/zero"), cfg(kernel_path="zero"))
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.IMAGE_NOT_REGULAR
    e = refused(ImageStore("/dev", "/dev/zero"), cfg())  # even as the default firmware
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.IMAGE_NOT_REGULAR


def test_each_image_has_its_cap(store: ImageStore) -> None:
    d = Path(store.directory)
    (d / "initrd").write_bytes(bytes(4096))
    ok = asyncio.run(
        images.load(
            store,
            cfg(kernel_path="vmlinuz", initrd_path="initrd"),
            vcpu_signature=0,
            sev_features=1,
        )
    )
    assert ok.kernel_hashes
    (d / "initrd").write_bytes(bytes(4097))
    e = refused(store, cfg(kernel_path="vmlinuz", initrd_path="initrd"))
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.IMAGE_TOO_LARGE
    (d / "fw2.fd").write_bytes(TINY + bytes(4096))
    e = refused(store, cfg(firmware_path="fw2.fd"))
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.IMAGE_TOO_LARGE
    e = refused(store, cfg(kernel=bytes(4097)))  # sent as bytes: the same cap
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.IMAGE_TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [Path("/etc/hostname").read_bytes(), bytes(4096), os.urandom(8192), b"", bad_metadata()],
    ids=["etc-hostname", "a-zero-page", "random-pages", "empty", "metadata-past-the-end"],
)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_firmware_that_is_not_ovmf_is_invalid_argument(
    store: ImageStore, data: bytes, vcpus: int
) -> None:
    (Path(store.directory) / "hostname").write_bytes(data)
    e = refused(store, cfg(vcpus, firmware_path="hostname"))
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.FIRMWARE_INVALID, e
    if data:
        e = refused(store, cfg(vcpus, firmware=data))
        assert isinstance(e, InvalidArgument) and e.reason == KvmReason.FIRMWARE_INVALID, e


def test_a_firmware_that_cannot_launch_this_vm_is_invalid_argument(store: ImageStore) -> None:
    """QEMU refuses a kernel for a firmware without a hashes table; a section outside the VM's
    memory would fail the launch after LAUNCH_START."""
    no_hashes = tiny_firmware.build(with_hashes=False)
    assert asyncio.run(
        images.load(store, cfg(firmware=no_hashes), vcpu_signature=0, sev_features=1)
    )
    e = refused(store, cfg(firmware=no_hashes, kernel=b"k"))
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.FIRMWARE_INVALID
    small = VmConfig(memory_bytes=4 << 20, vcpus=1, firmware=TINY)  # sections at 8 MiB
    e = refused(store, small)
    assert isinstance(e, InvalidArgument) and e.reason == KvmReason.FIRMWARE_INVALID


def test_the_requests_own_mistakes(store: ImageStore) -> None:
    cases = [
        (cfg(kernel_path="vmlinuz", kernel=b"k"), KvmReason.IMAGE_PATH_AND_BYTES),
        (cfg(firmware_path="fw.fd", firmware=TINY), KvmReason.IMAGE_PATH_AND_BYTES),
        (cfg(kernel_path="vm\0linuz"), KvmReason.IMAGE_PATH_INVALID),
        (cfg(kernel_path="a" * 4096), KvmReason.IMAGE_PATH_INVALID),
        (cfg(initrd=b"i"), KvmReason.KERNEL_REQUIRED),
        (cfg(initrd_path="vmlinuz"), KvmReason.KERNEL_REQUIRED),
        (cfg(cmdline="console=ttyS0"), KvmReason.KERNEL_REQUIRED),
        (cfg(kernel_path="vmlinuz", cmdline="x" * 2048), KvmReason.CMDLINE_TOO_LONG),
        (cfg(kernel=b"", kernel_path="empty"), KvmReason.IMAGE_EMPTY),
    ]
    (Path(store.directory) / "empty").write_bytes(b"")
    for config, reason in cases:
        e = refused(store, config)
        assert isinstance(e, InvalidArgument) and e.reason == reason, (config, e)
        assert len(e.message) < 200, e.message


def test_a_path_is_taken_in_the_image_directory_and_the_default_firmware_anywhere(
    tmp_path: Path, store: ImageStore
) -> None:
    elsewhere = tmp_path / "elsewhere.fd"
    elsewhere.write_bytes(TINY)
    outside_default = dataclasses.replace(store, default_firmware=str(elsewhere))
    load = images.load
    for s, config in [
        (store, cfg(firmware_path="fw.fd")),
        (store, cfg(firmware_path=str(Path(store.directory) / "fw.fd"))),
        (store, cfg()),
        (outside_default, cfg()),
        (outside_default, cfg(firmware_path=str(elsewhere))),  # its own path: the same file
        (store, cfg(firmware=TINY, kernel=b"k", initrd=b"i", cmdline="c")),
    ]:
        got = asyncio.run(load(s, config, vcpu_signature=0, sev_features=1))
        assert got.ovmf.data == TINY
    e = refused(store, cfg(firmware_path=str(elsewhere)))  # not the default: outside
    assert isinstance(e, PermissionDenied) and e.reason == KvmReason.IMAGE_OUTSIDE_DIR


def test_the_files_are_read_off_the_event_loop(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    real = images.read_image

    def spy(*args: object) -> bytes:
        threads.append(threading.current_thread())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "read_image", spy)
    asyncio.run(images.load(store, cfg(kernel_path="vmlinuz"), vcpu_signature=0, sev_features=1))
    assert len(threads) == 2 and threading.main_thread() not in threads


def test_the_settings(tmp_path: Path) -> None:
    default = KvmOptions.from_env({})
    assert default.images() == ImageStore(
        "/usr/share/OVMF",
        "/usr/share/OVMF/OVMF_CODE.fd",
        ImageLimits(16 << 20, 64 << 20, 256 << 20),
    )
    o = KvmOptions.from_env(
        {
            "SNPEMU_KVM_IMAGE_DIR": str(tmp_path),
            "SNPEMU_KVM_MAX_FIRMWARE_MIB": "4",
            "SNPEMU_KVM_MAX_KERNEL_MIB": "8",
            "SNPEMU_KVM_MAX_INITRD_MIB": "32",
        }
    )
    assert o.images() == ImageStore(
        str(tmp_path), "/usr/share/OVMF/OVMF_CODE.fd", ImageLimits(4 << 20, 8 << 20, 32 << 20)
    )
    for bad in [
        {"SNPEMU_KVM_IMAGE_DIR": "relative"},
        {"SNPEMU_KVM_MAX_KERNEL_MIB": "0"},
        {"SNPEMU_KVM_MAX_FIRMWARE_MIB": "x"},
    ]:
        with pytest.raises(InvalidArgument):
            KvmOptions.from_env(bad)


# --- through CreateVm and LaunchVm (the model on fake peers) ---------------------------------


async def _host(store: ImageStore) -> Kvm:
    faults = Faults()
    rmp = FakeRmp(faults)
    kvm = Kvm(rmp, FakePsp(faults, rmp), firmware=store.default_firmware)
    kvm.images = store  # type: ignore[attr-defined]
    await kvm.bring_up()
    return kvm


def test_a_refused_image_creates_nothing(store: ImageStore) -> None:
    async def run() -> None:
        kvm = await _host(store)
        before = held(kvm, kvm.rmp, kvm.psp)  # type: ignore[arg-type]
        os.mkfifo(Path(store.directory) / "fifo")
        shutil.copy("/etc/hostname", Path(store.directory) / "hostname")
        for config in [
            cfg(kernel_path="fifo"),
            cfg(firmware_path="hostname"),
            cfg(kernel_path="nonexistent"),
            cfg(kernel_path="/etc/hostname"),
            cfg(firmware_path="fw.fd", firmware=TINY),
        ]:
            with pytest.raises((InvalidArgument, NotFound, PermissionDenied)):
                await asyncio.wait_for(kvm.create_vm(config), timeout=30)
            assert held(kvm, kvm.rmp, kvm.psp) == before, config  # type: ignore[arg-type]

    asyncio.run(run())


def test_the_launch_uses_what_create_read(store: ImageStore) -> None:
    """LaunchVm reads no file (QEMU too reads its images before the first ioctl): the image
    may go after CreateVm; GetVm's config keeps no bytes."""

    async def run() -> None:
        kvm = await _host(store)
        by_path = await kvm.create_vm(cfg(firmware_path="fw.fd", kernel_path="vmlinuz"))
        sent = await kvm.create_vm(cfg(firmware=TINY, kernel=b"k" * 4096))
        os.remove(Path(store.directory) / "fw.fd")
        os.remove(Path(store.directory) / "vmlinuz")
        assert sent.config.firmware == b"" and sent.config.kernel == b""
        assert by_path.config.images is not None and sent.config.images is not None
        assert by_path.config.images.kernel_hashes == sent.config.images.kernel_hashes
        for vm in (by_path, sent):
            assert len(await kvm.launch_vm(vm)) == 48
            assert vm.config.images is None  # launched: not kept

    asyncio.run(run())


def test_a_file_swapped_between_the_check_and_the_open_is_refused(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was opened must be the file that was checked (a directory on the way replaced by a
    symlink in between): procfs names the opened file, here as if it had been swapped."""
    monkeypatch.setattr(images.os, "readlink", lambda _path: "/etc/hostname")
    e = refused(store, cfg(kernel_path="vmlinuz"))
    assert isinstance(e, PermissionDenied) and e.reason == KvmReason.IMAGE_OUTSIDE_DIR
