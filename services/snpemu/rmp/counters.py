"""What the model counts; the metrics adapter (rmp/metrics.py) reads these at scrape time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class Counters:
    updates: Counter[tuple[str, int]] = field(default_factory=Counter)
    violations: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    leaked_pages: int = 0
    panics: int = 0
    leaked_maps: int = 0

    def count(self, instruction: str, codes: npt.NDArray[np.uint8] | list[int] | int) -> None:
        """One instruction per code (-1: it faulted instead of returning a code)."""
        if isinstance(codes, int):
            self.updates[(instruction, codes)] += 1
            return
        # Codes are hardware EAX values 0..255: one bincount instead of a sort.
        tally = np.bincount(np.asarray(codes, dtype=np.uint8), minlength=256)
        for v in np.flatnonzero(tally):
            self.updates[(instruction, int(v))] += int(tally[v])
