"""psp's VCEK cache: bounded in memory and on disk, one signature per TCB however many callers
ask at once, files that are whole or absent (issue 19: 1,473 VCEK files in 6 s, and concurrent
first requests that read a half-written DER)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from snpemu.psp.atomic_write import write_atomic
from snpemu.psp.firmware import Firmware
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.local_rmp import LocalRmp
from snpemu.psp.metrics import register
from snpemu.psp.tcb import Tcb
from snpemu.psp.vcek_cache import VcekCache
from snpemu.rmp.machine import RmpMachine

from tests.unit.psp.launch_helpers import identity

STEM = "vcek-Milan-B1"


def tcbs(n: int) -> list[Tcb]:
    return [Tcb(i % 256, i // 256, 1, 2) for i in range(n)]


def files(d: Path) -> list[Path]:
    return sorted(d.glob("vcek-*.der"))


class Counting:
    """A derive that counts its calls and can hold them at a barrier."""

    def __init__(self, ident: ChipIdentity, gate: threading.Event | None = None) -> None:
        self.ident, self.gate, self.calls = ident, gate, 0
        self.lock = threading.Lock()

    def __call__(self, tcb: Tcb) -> bytes:
        with self.lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        return self.ident._sign_vcek(tcb)


def cache(ident: ChipIdentity, d: Path, derive: Callable[[Tcb], bytes], cap: int) -> VcekCache:
    return VcekCache(d, STEM, derive, ident._check_vcek, cap=cap)


@pytest.fixture(scope="module")
def chip(tmp_path_factory: pytest.TempPathFactory) -> ChipIdentity:
    return identity(tmp_path_factory.mktemp("chip"))


def test_many_distinct_tcbs_stay_within_the_cap_in_memory_and_on_disk(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    c = cache(chip, tmp_path, chip._sign_vcek, cap=8)
    for t in tcbs(40):
        der = c.get(t)
        assert x509.load_der_x509_certificate(der).public_key() == chip.vcek_key(t).public_key()
        assert len(c) <= 8 and len(files(tmp_path)) <= 8
    assert len(c) == 8 and c.evictions == 32
    # the files left are the 8 most recently used TCBs'
    assert files(tmp_path) == sorted(c.path(t.raw) for t in tcbs(40)[-8:])


def test_a_recently_used_tcb_stays_and_a_cached_one_is_not_signed_again(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    derive = Counting(chip)
    c = cache(chip, tmp_path, derive, cap=3)
    first, *rest = tcbs(6)
    der = c.get(first)
    for t in rest:
        assert c.get(first) == der  # used again each time: never the least recent
        c.get(t)
    assert derive.calls == 6 and c.path(first.raw).exists()


def test_concurrent_first_requests_for_one_tcb_sign_once_and_get_the_same_bytes(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    gate = threading.Event()
    derive = Counting(chip, gate)
    c = cache(chip, tmp_path, derive, cap=4)
    tcb = Tcb(9, 9, 9, 9)
    got: list[bytes] = []
    start = threading.Barrier(17)
    asking = threading.Semaphore(0)

    def ask() -> None:
        start.wait(10)
        asking.release()
        got.append(c.get(tcb))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for th in threads:
        th.start()
    start.wait(10)
    for _ in threads:  # all 16 are asking while the first signature is held
        assert asking.acquire(timeout=10)
    gate.set()
    for th in threads:
        th.join(10)
    assert len(got) == 16 and len(set(got)) == 1 and derive.calls == 1
    assert c.path(tcb.raw).read_bytes() == got[0]


def test_a_failed_derivation_reaches_every_waiter_and_the_next_call_tries_again(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    calls: list[Tcb] = []

    def broken(tcb: Tcb) -> bytes:
        calls.append(tcb)
        if len(calls) == 1:
            raise OSError("disk full")
        return chip._sign_vcek(tcb)

    c = cache(chip, tmp_path, broken, cap=2)
    with pytest.raises(OSError, match="disk full"):
        c.get(Tcb(1, 1, 1, 1))
    assert len(c) == 0 and files(tmp_path) == []
    assert x509.load_der_x509_certificate(c.get(Tcb(1, 1, 1, 1)))


def test_a_restart_keeps_the_newest_files_within_the_cap_and_rederives_a_cut_short_one(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    """What an unbounded psp left (hundreds of files, a temp file, a half-written DER)."""
    older = cache(chip, tmp_path, chip._sign_vcek, cap=64)
    for t in tcbs(20):
        older.get(t)
    (tmp_path / f".{STEM}-0000000000000001.der.abc123.tmp").write_bytes(b"\x30\x82")
    cut = tcbs(20)[-1]
    cut_path = older.path(cut.raw)
    cut_path.write_bytes(cut_path.read_bytes()[:100])  # as a non-atomic writer left it
    derive = Counting(chip)
    c = cache(chip, tmp_path, derive, cap=5)
    assert len(files(tmp_path)) == 5 and not list(tmp_path.glob(".*.tmp"))
    der = c.get(cut)  # on disk but cut short: signed again
    assert derive.calls == 1 and cut_path.read_bytes() == der
    assert x509.load_der_x509_certificate(der).public_key() == chip.vcek_key(cut).public_key()
    kept = tcbs(20)[-2]
    assert c.get(kept) == older.path(kept.raw).read_bytes() and derive.calls == 1


def test_the_identity_signs_a_tcb_once_and_the_metrics_count_evictions(
    chip: ChipIdentity, tmp_path: Path
) -> None:
    # the shared chip's keys (no RSA-4096 generation), a data directory of its own
    ident = dataclasses.replace(chip, data_dir=tmp_path)
    fw = Firmware(ident, LocalRmp(RmpMachine(16 << 20)))
    reg = CollectorRegistry()
    register(fw, reg)
    tcb = Tcb(3, 0, 8, 115)
    assert ident.vcek_der(tcb) == ident.vcek_der(tcb)
    assert ident.vcek_cert(tcb).public_key() == ident.vcek_key(tcb).public_key()
    cap = ident.vceks.cap
    for t in tcbs(cap + 5):
        ident.vcek_der(t)
    assert len(files(ident.data_dir)) == cap
    assert reg.get_sample_value("snp_psp_vcek_cache_evictions_total") == 6


def test_an_atomic_write_is_never_seen_half_done(tmp_path: Path) -> None:
    path = tmp_path / "blob.der"
    a, b = b"a" * (4 << 20), b"b" * (4 << 20)
    write_atomic(path, a)
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            seen.add(data[:1] + data[-1:] + len(data).to_bytes(4, "big"))

    th = threading.Thread(target=reader)
    th.start()
    for i in range(20):
        write_atomic(path, b if i % 2 == 0 else a)
    stop.set()
    th.join(10)
    whole = {x[:1] + x[-1:] + len(x).to_bytes(4, "big") for x in (a, b)}
    assert seen <= whole, seen - whole
    assert not list(tmp_path.glob(".*.tmp"))
