"""What a KDS URL asks for, checked before anything is derived.

SPEC: AMD 57230 (VCEK Certificate and KDS Interface Specification) chapter 4, the KDS interface:
    GET /vcek/v1/{product_name}/cert_chain             ASK then ARK, PEM
    GET /vcek/v1/{product_name}/crl                    the CRL, DER
    GET /vcek/v1/{product_name}/{hwid}?{parameters}    the VCEK, DER
"where unspecified SPL values are assumed to be zero" (as the IETF RATS wiki's "AMD Key
Distribution Service" page summarises chapter 4); the parameters are blSPL, teeSPL, snpSPL and
ucodeSPL (go-sev-guest kds/kds.go VCEKCertQuery), decimal. The hwid is the CHIP_ID as hex:
64 bytes (SNP ABI ATTESTATION_REPORT CHIP_ID; go-sev-guest ParseVCEKCertURL wants exactly
abi.ChipIDSize bytes).

Status codes: a product or a chip KDS does not know is 404 (observed of AMD's KDS: a wrong
product name or an all-zero CHIP_ID answers 404, virtee/snpguest issue 37, go-sev-guest issue
69). UNVERIFIED(kds-malformed-400): a malformed request (an hwid that is not 128 hex digits,
an SPL that is not a decimal 0..255, an SPL given twice or empty) answers 400 Bad Request;
chapter 4.1 lists KDS's status codes, but its text was not at hand, so 400 is RFC 9110's
"client error" reading of it.
Query parameters other than the SPLs are ignored, as HTTP services commonly do (also
UNVERIFIED(kds-malformed-400)).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

from snpemu.psp.tcb import Tcb

CHIP_ID_SIZE = 64  # SPEC: SNP ABI ATTESTATION_REPORT CHIP_ID, 64 bytes
SPLS = ("blSPL", "teeSPL", "snpSPL", "ucodeSPL")  # TCB_VERSION bytes 0, 1, 6, 7
_HEX = re.compile(r"[0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]{1,3}")  # int() also takes " 7", "+7", "7_0", non-ASCII digits
_QUOTE = 24  # characters of caller input an answer repeats


class What(StrEnum):
    CERT_CHAIN = "cert_chain"
    CRL = "crl"
    VCEK = "vcek"


class BadQuery(ValueError):
    """A request KDS refuses: status is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    what: What
    tcb: Tcb | None = None  # VCEK only


def quote(text: str) -> str:
    return repr(text[:_QUOTE] + ("..." if len(text) > _QUOTE else ""))


def parse(target: str, product: str, chip_id: bytes) -> Query:
    """The request line's target (path and query) for this chip's KDS, or BadQuery."""
    url = urllib.parse.urlsplit(target)
    parts = url.path.strip("/").split("/")
    if len(parts) != 4 or parts[:2] != ["vcek", "v1"]:
        raise BadQuery(404, f"not found: this KDS serves /vcek/v1/{product}/...")
    if parts[2] != product:
        raise BadQuery(404, f"unknown product {quote(parts[2])}: this KDS serves {product}")
    if parts[3] == What.CERT_CHAIN:
        return Query(What.CERT_CHAIN)
    if parts[3] == What.CRL:
        return Query(What.CRL)
    hwid = parts[3]
    if len(hwid) != 2 * CHIP_ID_SIZE or not _HEX.fullmatch(hwid):
        raise BadQuery(400, f"hwid {quote(hwid)} is not {CHIP_ID_SIZE} bytes of hex")
    tcb = _tcb(url.query)  # a malformed query is malformed whoever's chip it names
    if bytes.fromhex(hwid) != chip_id:
        raise BadQuery(404, "unknown hwid: no VCEK for that chip here")
    return Query(What.VCEK, tcb)


def _tcb(query: str) -> Tcb:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=16)
    except ValueError as e:
        raise BadQuery(400, f"malformed query string: {str(e)[:80]}") from None
    spl = dict.fromkeys(SPLS, 0)
    seen: set[str] = set()
    for name, value in pairs:
        if name not in spl:
            continue
        if name in seen:
            raise BadQuery(400, f"{name} given more than once")
        seen.add(name)
        if not _DECIMAL.fullmatch(value) or int(value) > 255:
            raise BadQuery(400, f"{name}={quote(value)}: an SPL is a decimal 0..255")
        spl[name] = int(value)
    return Tcb(spl["blSPL"], spl["teeSPL"], spl["snpSPL"], spl["ucodeSPL"])
