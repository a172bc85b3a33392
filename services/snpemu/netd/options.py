"""netd settings from the environment, checked at start.

SNPEMU_NETD_COPY_CHUNK     bytes per host write while copying a packet into a guest buffer
                           (default 4096: one write per page, as one memcpy per page)
SNPEMU_NETD_COPY_DELAY_MS  pause between the chunks of one copy (default 0). The lab widens
                           the copy window with it so that a guest can flip its buffer mid-copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snpemu.hostconfig import count, number


@dataclass(frozen=True)
class NetdOptions:
    copy_chunk: int
    copy_delay_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NetdOptions:
        return cls(
            copy_chunk=count(
                {"SNPEMU_NETD_COPY_CHUNK": "4096", **env}, "SNPEMU_NETD_COPY_CHUNK", 16, 4096
            ),
            copy_delay_s=number(env, "SNPEMU_NETD_COPY_DELAY_MS", "0", 10_000) / 1000,
        )
