"""Where the guest keeps the pages it shares with the host."""

from __future__ import annotations

from snpemu.abi.addr import PAGE_SIZE, Gpa

GHCB_GPA = Gpa(0x1000)
# guest-request pages (shared); INVARIANT: RESP_GPA == REQ_GPA + PAGE_SIZE (one write fills both)
REQ_GPA, RESP_GPA, CERTS_GPA = Gpa(0x3000), Gpa(0x4000), Gpa(0x10000)
CERTS_PAGES = 16
SHARED_GPAS = (
    GHCB_GPA,
    REQ_GPA,
    RESP_GPA,
    *(Gpa(CERTS_GPA + i * PAGE_SIZE) for i in range(CERTS_PAGES)),
)
