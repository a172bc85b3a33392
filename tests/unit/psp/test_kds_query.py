"""What psp's KDS endpoint makes of a request target, and the status a bad one gets.

Expected values: AMD 57230 chapter 4 (the URL forms; SPLs not given are zero, as the IETF RATS
wiki's "AMD Key Distribution Service" page summarises it), the SNP ABI (CHIP_ID is 64 bytes,
TCB_VERSION's SPLs are bytes: 0..255), AMD's KDS as observed (an unknown product or an all-zero
CHIP_ID: 404; virtee/snpguest issue 37, go-sev-guest issue 69); a malformed request is a client
error, 400 (RFC 9110 15.5.1; UNVERIFIED against 57230 4.1's table, see kds_query.py)."""

from __future__ import annotations

import pytest
from snpemu.psp.kds_query import BadQuery, Query, What, parse
from snpemu.psp.tcb import Tcb

CHIP = bytes(range(64))
HWID = CHIP.hex()
BASE = f"/vcek/v1/Milan/{HWID}"


def status(target: str) -> int:
    with pytest.raises(BadQuery) as info:
        parse(target, "Milan", CHIP)
    return info.value.status


def test_the_three_resources() -> None:
    assert parse("/vcek/v1/Milan/cert_chain", "Milan", CHIP) == Query(What.CERT_CHAIN)
    assert parse("/vcek/v1/Milan/crl", "Milan", CHIP) == Query(What.CRL)
    q = parse(f"{BASE}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115", "Milan", CHIP)
    assert q == Query(What.VCEK, Tcb(3, 0, 8, 115))


def test_spls_are_bytes_any_order_upper_case_hwid() -> None:
    q = parse(
        f"/vcek/v1/Milan/{HWID.upper()}?ucodeSPL=255&snpSPL=0&teeSPL=7&blSPL=255", "Milan", CHIP
    )
    assert q.tcb == Tcb(255, 7, 0, 255)


@pytest.mark.parametrize(
    ("query", "tcb"),
    [
        ("", Tcb(0, 0, 0, 0)),
        ("blSPL=3", Tcb(3, 0, 0, 0)),
        ("blSPL=3&teeSPL=1&snpSPL=8", Tcb(3, 1, 8, 0)),
        ("blSPL=3&fmcSPL=9&teeSPL=1&snpSPL=8&ucodeSPL=1", Tcb(3, 1, 8, 1)),  # Turin's: ignored
    ],
)
def test_an_spl_not_given_is_zero(query: str, tcb: Tcb) -> None:
    assert parse(f"{BASE}?{query}" if query else BASE, "Milan", CHIP).tcb == tcb


@pytest.mark.parametrize(
    "query",
    [
        "blSPL=256&teeSPL=0&snpSPL=8&ucodeSPL=115",  # above a byte
        "blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=999",
        "blSPL=-1&teeSPL=0&snpSPL=8&ucodeSPL=115",
        "blSPL=abc&teeSPL=0&snpSPL=8&ucodeSPL=115",  # not numeric
        "blSPL=0x3&teeSPL=0&snpSPL=8&ucodeSPL=115",
        "blSPL=%2B3&teeSPL=0&snpSPL=8&ucodeSPL=115",  # "+3"
        "blSPL=%203&teeSPL=0&snpSPL=8&ucodeSPL=115",  # " 3"
        "blSPL=1_0&teeSPL=0&snpSPL=8&ucodeSPL=115",
        "blSPL=%D9%A3&teeSPL=0&snpSPL=8&ucodeSPL=115",  # ARABIC-INDIC DIGIT THREE
        "blSPL=1.0&teeSPL=0&snpSPL=8&ucodeSPL=115",
        "blSPL=&teeSPL=0&snpSPL=8&ucodeSPL=115",  # given, but empty
        "blSPL=1&blSPL=2&teeSPL=0&snpSPL=8&ucodeSPL=115",  # twice
        "&".join(f"x{i}=1" for i in range(40)),  # more fields than any KDS query has
    ],
)
def test_a_malformed_spl_is_400(query: str) -> None:
    assert status(f"{BASE}?{query}") == 400


@pytest.mark.parametrize(
    "hwid",
    [
        HWID[:-1],  # 127 digits
        HWID[:-2],  # 63 bytes
        HWID + "00",  # 65 bytes
        "zz" + HWID[2:],  # not hex
        HWID[:16],  # a Turin's 8-byte hwid, on a Milan
    ],
)
def test_a_malformed_hwid_is_400(hwid: str) -> None:
    assert status(f"/vcek/v1/Milan/{hwid}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115") == 400


def test_a_malformed_query_is_400_for_another_chip_too() -> None:
    assert status(f"/vcek/v1/Milan/{'00' * 64}?blSPL=300") == 400


@pytest.mark.parametrize(
    "target",
    [
        f"/vcek/v1/Milan/{'00' * 64}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115",  # another chip
        f"/vcek/v1/Genoa/{HWID}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115",  # another product
        "/vcek/v1/Genoa/cert_chain",
        "/vcek/v1/milan/crl",
        "/vcek/v2/Milan/crl",
        "/vlek/v1/Milan/cert_chain",  # no VLEKs here
        "/vcek/v1/Milan",
        "/vcek/v1/Milan/crl/extra",
        "/",
    ],
)
def test_what_this_kds_does_not_have_is_404(target: str) -> None:
    assert status(target) == 404


def test_an_answer_quotes_a_short_prefix_of_the_input() -> None:
    with pytest.raises(BadQuery) as info:
        parse(f"/vcek/v1/{'P' * 10_000}/crl", "Milan", CHIP)
    assert len(str(info.value)) < 100
