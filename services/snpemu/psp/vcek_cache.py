"""The VCEK certificates psp has issued, bounded in memory and on disk.

Anyone who can reach the KDS endpoint chooses the TCB of the VCEK it asks for, so every distinct
TCB would otherwise cost one more signature, one more file and one more entry forever. The cache
keeps at most `cap` certificates, least recently used first out; each one also lives as a DER
file in the data directory (so a restart serves the same bytes), and a certificate leaving the
cache takes its file with it, so the directory never holds more than `cap` of them either.

The first request for a TCB derives it; concurrent requests for the same TCB wait for that one
derivation and get the same bytes. Files are replaced atomically (atomic_write.py), and one that
does not parse (a crash of an older psp mid-write) is derived again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from snpemu.psp.atomic_write import TEMP_SUFFIX, write_atomic
from snpemu.psp.tcb import Tcb

log = logging.getLogger(__name__)

# A host has a handful of TCBs in use (current, reported, committed, and what guests launched
# at); 32 leaves room for them and for a verifier's probing, at ~1.5 KiB of DER each.
CAP = 32


class VcekCache:
    def __init__(
        self,
        directory: Path,
        stem: str,
        derive: Callable[[Tcb], bytes],
        check: Callable[[Tcb, bytes], None],
        cap: int = CAP,
    ) -> None:
        """derive(tcb) signs a new certificate (DER); check(tcb, der) raises ValueError for
        bytes that are not that TCB's certificate (a file cut short, another chip's)."""
        if cap < 1:
            raise ValueError(f"a VCEK cache holds at least one certificate, not {cap}")
        self.directory, self.stem, self.cap = directory, stem, cap
        self._derive, self._check = derive, check
        self._lock = threading.Lock()
        # tcb.raw -> DER, most recently used last; None: on disk from an earlier run, unread
        self._entries: OrderedDict[int, bytes | None] = OrderedDict()
        self._pending: dict[int, Future[bytes]] = {}
        # certificates dropped to stay within cap: snp_psp_vcek_cache_evictions_total.
        # UNVERIFIED(vcek-resign): one asked for again is signed again (same key, new bytes)
        self.evictions = 0
        self._adopt_files()

    def path(self, tcb_raw: int) -> Path:
        return self.directory / f"{self.stem}-{tcb_raw:016x}.der"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, tcb: Tcb) -> bytes:
        raw = tcb.raw
        with self._lock:
            der = self._entries.get(raw)
            if der is not None:
                self._entries.move_to_end(raw)
                return der
            pending = self._pending.get(raw)
            if pending is None:
                mine: Future[bytes] = Future()
                self._pending[raw] = mine
        if pending is not None:
            return pending.result()
        try:
            der = self._read(tcb)
            if der is None:
                der = self._derive(tcb)
                write_atomic(self.path(raw), der)
        except BaseException as e:
            with self._lock:
                del self._pending[raw]
            mine.set_exception(e)
            raise
        with self._lock:
            self._entries[raw] = der
            self._entries.move_to_end(raw)
            self._trim()
            del self._pending[raw]
        mine.set_result(der)
        return der

    # --- the files ----------------------------------------------------------------------------

    def _read(self, tcb: Tcb) -> bytes | None:
        path = self.path(tcb.raw)
        try:
            der = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            self._check(tcb, der)
        except ValueError as e:
            log.warning(
                "VCEK file does not hold its certificate; deriving it again",
                extra={"path": str(path), "error": str(e)[:200]},
            )
            return None
        return der

    def _trim(self) -> None:
        # under _lock, so that no get() for the same TCB writes the file between the pop and
        # the unlink
        while len(self._entries) > self.cap:
            raw, _ = self._entries.popitem(last=False)
            self.path(raw).unlink(missing_ok=True)
            self.evictions += 1

    def _adopt_files(self) -> None:
        """Take what an earlier run left: its newest `cap` certificates stay (read when first
        asked for), older ones and temporary files from a crash go."""
        for tmp in self.directory.glob(f".{self.stem}-*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        found: list[tuple[float, int, Path]] = []
        for path in self.directory.glob(f"{self.stem}-*.der"):
            digits = path.name[len(self.stem) + 1 : -len(".der")]
            try:
                raw = int(digits, 16)
                mtime = path.stat().st_mtime
            except (ValueError, FileNotFoundError):
                continue
            if len(digits) != 16 or path != self.path(raw):
                continue
            found.append((mtime, raw, path))
        found.sort()
        dropped = found[: max(0, len(found) - self.cap)]
        for _, _, path in dropped:
            path.unlink(missing_ok=True)
        for _, raw, _ in found[len(dropped) :]:
            self._entries[raw] = None
        if dropped:
            log.info(
                "VCEK files beyond the cache's cap removed",
                extra={"removed": len(dropped), "kept": len(self._entries), "cap": self.cap},
            )
