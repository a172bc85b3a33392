"""Where kvm's TMR is, kept in kvm's data directory so that a restarted kvm finds the TMR it
gave the firmware: it keeps using it while the firmware does, and hands it back to the host
once the firmware was reset (instead of taking a second one and losing the first).

The record is only a hint: bring-up trusts it only while rmp still shows all its pages in
firmware state (a host reboot, a fresh rmp, leaves them hypervisor pages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from snpemu.abi.addr import Pfn

log = logging.getLogger(__name__)


class TmrRecord:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Pfn]:
        try:
            data = json.loads(self.path.read_text())
            first, count = int(data["first_pfn"]), int(data["pages"])
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the TMR record %s: %s", self.path, e)
            return []
        if first < 0 or not 0 < count <= 1 << 20:
            return []
        return [Pfn(first + i) for i in range(count)]

    def save(self, pfns: list[Pfn]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"first_pfn": int(pfns[0]), "pages": len(pfns)}))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only state directory: only a kvm restart loses it
            log.warning("cannot record the TMR in %s: %s", self.path, e)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
