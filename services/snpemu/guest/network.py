"""The guest's network device as its RPCs drive it, and the misbehaviours that involve a host
writer.

Each misbehaviour sets the trap and returns what it did; the host's writer (netd, or kvm for
the response page) springs it, and the guest's status (#VC events, termination, net counters)
shows what happened. The lab drives these across every violation policy.
"""

from __future__ import annotations

import asyncio
import contextlib

from snpemu.abi import guest_message as gm
from snpemu.abi.addr import PAGE_MASK, PAGE_SIZE, Gpa
from snpemu.errors import InvalidArgument, SnpemuError, WrongState
from snpemu.guest.driver import Driver, report_request
from snpemu.guest.errors import GuestFault, GuestReason, Terminated
from snpemu.guest.exits import BootState
from snpemu.guest.kernel import GuestKernel
from snpemu.guest.layout import RESP_GPA
from snpemu.guest.netdev import Netd, NetDevice, check_mac

DEFAULT_ENTRIES = 16


def _mac_for(name: str) -> str:
    """A locally administered MAC from the instance number: guest-3 -> 02:00:00:00:00:04."""
    n = int(name.rsplit("-", 1)[-1]) + 1 if name.rsplit("-", 1)[-1].isdigit() else 1
    return "02:00:00:00:" + f"{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"


class Network:
    def __init__(self, kernel: GuestKernel, driver: Driver, netd: Netd) -> None:
        self.k, self.driver, self.netd = kernel, driver, netd
        self.dev: NetDevice | None = None
        self.lock = asyncio.Lock()

    def device(self) -> NetDevice:
        if self.dev is None:
            raise WrongState(
                "no network device: call AttachNetDevice", reason=GuestReason.NO_DEVICE
            )
        return self.dev

    async def attach(self, mac: str, entries: int, skip: bool) -> NetDevice:
        """A device with `entries` buffers a ring (a default for 0); `skip`: the buggy driver
        that hands netd its RX buffers still private."""
        self.k.check_running()
        entries = entries or DEFAULT_ENTRIES
        if entries > 64 or entries & (entries - 1):
            raise InvalidArgument("ring_entries is a power of two up to 64")
        mac = mac or _mac_for(self.k.name)
        check_mac("mac", mac)  # before the old device goes or any page is converted
        async with self.lock:  # one reload at a time: each may have to put the last back
            old = self.dev
            await self._detach()  # first, as a driver reload does
            dev = NetDevice(self.k, self.netd, mac, entries)
            try:
                await dev.attach(skip_rx_conversion=skip)
            except BaseException:
                await dev.close()
                if old is not None and self.k.state == BootState.RUNNING:
                    # the reload failed: the driver that was there comes back (its MAC was its
                    # own)
                    again = NetDevice(self.k, self.netd, old.mac, old.layout.entries)
                    with contextlib.suppress(SnpemuError):
                        await again.attach(skip_rx_conversion=old.skip_rx_conversion)
                        self.dev = again
                raise
            self.dev = dev
            return dev

    async def detach(self) -> None:
        """Drop the device, as a driver unload does: its hold ends and netd forgets it (asked
        with the device's token, which only this driver holds)."""
        async with self.lock:
            await self._detach()

    async def _detach(self) -> None:
        old, self.dev = self.dev, None
        if old is None:
            return
        await old.close()
        if old.dev is not None:
            with contextlib.suppress(SnpemuError):
                await self.netd.unregister_device(old.dev)

    # --- misbehaviour ---------------------------------------------------------------------

    async def skip_dma_conversion(self, mac: str, entries: int) -> str:
        """Buggy driver: the RX buffers are handed to netd while still private."""
        dev = await self.attach(mac, entries, skip=True)
        lay = dev.layout
        return (
            f"device {dev.device_id} attached with RX buffers "
            f"{lay.rx_buffers:#x}-{lay.tx_buffers - 1:#x} left private; netd will write them"
        )

    async def flip_buffer_during_copy(self, timeout_ms: int) -> str:
        """Malicious: once netd's copy into the next RX buffer has begun, make its page
        private (PSC to private, then PVALIDATE) so the rest of the copy hits a guest page."""
        dev = self.device()
        self.k.check_running()
        timeout = (timeout_ms or 10_000) / 1000
        if timeout > 60:
            raise InvalidArgument("timeout_ms is at most 60000")
        gpa = await dev.next_rx_buffer()
        head = await dev.wait_copy_start(gpa, timeout)
        page = gpa & PAGE_MASK
        await self.k.convert(page, PAGE_SIZE, private=True, size_2m=False)
        dev.private_rx.add(page)
        return (
            f"copy into {gpa:#x} began (header {head.hex()}); page {page:#x} flipped "
            "to private mid-copy"
        )

    async def expose_vmsa_page(self) -> str:
        """Make the page of the next RX buffer private, mark it a VMSA (RMPADJUST VMSA=1 for
        VMPL1) and leave it offered to netd: the host's next write hits a VMSA page while this
        guest's vCPUs run."""
        dev = self.device()
        self.k.check_running()
        gpa = await dev.next_rx_buffer()
        page = gpa & PAGE_MASK
        if page not in dev.private_rx:
            await self.k.convert(page, PAGE_SIZE, private=True, size_2m=False)
            dev.private_rx.add(page)
        r = await self.k.rmpadjust(Gpa(page), vmsa=True)
        if r.fault is not None or r.eax:
            raise WrongState(
                f"RMPADJUST VMSA of {page:#x} failed (eax {r.eax})",
                reason=GuestReason.RMPADJUST_FAILED,
            )
        return f"page {page:#x} (RX buffer {gpa:#x}) is a VMSA page now, offered to netd"

    async def flip_response_page(self) -> str:
        """A report request whose response page the guest makes private (with a private
        marker written into it) once the driver has cleared it: kvm writes the response there
        in kernel mode. Afterwards the guest reads its marker back privately, which tells
        whether the host converted the page. (Made private before the request, the driver's
        clear of the shared page, as snp_send_guest_request()'s memset, would fault it back to
        shared through kvm first.)"""
        k = self.k
        k.check_running()
        marker = b"private response page".ljust(32, b".")

        async def flip() -> None:
            await k.convert(RESP_GPA, PAGE_SIZE, private=True, size_2m=False)
            await k.write_private(RESP_GPA, marker)

        try:
            await self.driver.request(
                gm.MsgType.REPORT_REQ, report_request(b"", 0), after_clear=flip
            )
            request_outcome = "request completed"
        except SnpemuError as e:
            request_outcome = f"request failed: {e.message}"
        try:
            back = await k.read_private(RESP_GPA, len(marker))
            page_outcome = (
                "marker intact" if back == marker else "marker CHANGED without a #VC (corrupt)"
            )
        except (GuestFault, Terminated) as e:
            page_outcome = f"reading it back: {e.message}"
        return f"{request_outcome}; {page_outcome}"
