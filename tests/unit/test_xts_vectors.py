"""The memory encryption engine (snpemu.rmp.crypto, AES-256-XTS) against the IEEE 1619-2007
test vectors, and the tweak rule the RMP machine applies checked with an XTS written here.

SPEC: IEEE Std 1619-2007, "XTS-AES": a key is Key1 || Key2 (Key2 encrypts the tweak); the
tweak is the 128-bit data unit sequence number, little-endian (5.1); block j of a data unit
is encrypted under T * alpha^j in GF(2^128) (5.2); Annex B lists the vectors used below.
The rule snpemu states (rmp/crypto.py, rmp/machine.py): one AES-256-XTS key per ASID, each
4 KiB page one data unit, its tweak the page's system physical address (pfn << 12).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi.rmp import Placement
from snpemu.errors import InvalidArgument
from snpemu.rmp.crypto import MemoryKeys
from snpemu.rmp.machine import RmpMachine

from tests.conftest import examples

# SPEC: IEEE 1619-2007 Annex B, XTS-AES-256 vector 10 (data unit 512 bytes)
V10_KEY1 = bytes.fromhex("2718281828459045235360287471352662497757247093699959574966967627")
V10_KEY2 = bytes.fromhex("3141592653589793238462643383279502884197169399375105820974944592")
V10_DUSN = 0xFF
V10_PTX = bytes(range(256)) * 2
V10_CTX = bytes.fromhex(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
)
assert len(V10_CTX) == 512

# SPEC: IEEE 1619-2007 Annex B, XTS-AES-128 vectors 2 and 4 (vector 4: the first 64 of its
# 512 bytes; XTS without ciphertext stealing encrypts each block on its own, so a prefix of
# whole blocks is a vector too)
V2 = (
    bytes.fromhex("11" * 16 + "22" * 16),
    0x3333333333,
    bytes.fromhex("44" * 32),
    bytes.fromhex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
)
V4 = (
    bytes.fromhex("2718281828459045235360287471352631415926535897932384626433832795"),
    0,
    bytes(range(64)),
    bytes.fromhex(
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
        "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    ),
)


def xts_encrypt(key: bytes, dusn: int, data: bytes) -> bytes:
    """XTS-AES from IEEE 1619-2007 5.2 on cryptography's plain AES block cipher (ECB, one
    block at a time): no XTS mode object, so not the code under test. Whole blocks only."""
    assert len(data) % 16 == 0
    half = len(key) // 2
    k1 = Cipher(algorithms.AES(key[:half]), modes.ECB()).encryptor()
    k2 = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor()
    t = int.from_bytes(k2.update(dusn.to_bytes(16, "little")), "little")
    out = bytearray()
    for j in range(0, len(data), 16):
        tb = t.to_bytes(16, "little")
        x = bytes(a ^ b for a, b in zip(data[j : j + 16], tb, strict=True))
        out += bytes(a ^ b for a, b in zip(k1.update(x), tb, strict=True))
        t <<= 1  # multiply by alpha: shift, fold the carry with x^7 + x^2 + x + 1
        if t >> 128:
            t = (t & (2**128 - 1)) ^ 0x87
    return bytes(out)


@pytest.mark.parametrize("vector", [V2, V4], ids=["vector-2", "vector-4-prefix"])
def test_the_test_xts_meets_the_aes128_vectors(vector: tuple[bytes, int, bytes, bytes]) -> None:
    key, dusn, ptx, ctx = vector
    assert xts_encrypt(key, dusn, ptx) == ctx


def test_the_test_xts_meets_vector_10() -> None:
    assert xts_encrypt(V10_KEY1 + V10_KEY2, V10_DUSN, V10_PTX) == V10_CTX


def test_the_engine_meets_vector_10() -> None:
    """The tweak the engine takes is the data unit sequence number as the spec encodes it:
    passing 0xFF as the address gives vector 10's ciphertext."""
    keys = MemoryKeys()
    keys.install(7, V10_KEY1 + V10_KEY2)
    assert keys.encrypt(7, V10_DUSN, V10_PTX) == V10_CTX
    assert keys.decrypt(7, V10_DUSN, V10_CTX) == V10_PTX


def test_a_page_is_one_data_unit() -> None:
    """A 4 KiB page is one data unit: its first 512 bytes are vector 10's when its tweak is
    vector 10's DUSN (blocks 0..31 use T * alpha^0..31 whatever the unit's length)."""
    keys = MemoryKeys()
    keys.install(7, V10_KEY1 + V10_KEY2)
    page = V10_PTX * 8
    assert keys.encrypt(7, V10_DUSN, page)[:512] == V10_CTX
    assert keys.encrypt(7, V10_DUSN, page) == xts_encrypt(V10_KEY1 + V10_KEY2, V10_DUSN, page)


def test_the_engine_takes_only_aes256_xts_keys() -> None:
    """The engine is AES-256-XTS only (64-byte keys): an XTS-AES-128 key (vector 4's) is
    refused, as is a key whose two halves are equal (IEEE 1619-2007 5.1 requires Key1 and
    Key2 to differ in use; cryptography refuses it too)."""
    keys = MemoryKeys()
    with pytest.raises(InvalidArgument):
        keys.install(7, V4[0])
    with pytest.raises(InvalidArgument):
        keys.install(7, V10_KEY1 * 2)


@settings(max_examples=examples(20), deadline=None)
@given(
    st.binary(min_size=4096, max_size=4096),
    st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
    st.integers(0, 63),
)
def test_the_machine_tweaks_each_page_by_its_physical_address(
    page: bytes, key: bytes, which: int
) -> None:
    """What lands in the frame of a guest-private page is XTS(key, pfn << 12, plaintext),
    computed here: the tweak is the page's system physical address, so the same plaintext
    in two frames gives two ciphertexts."""
    m = RmpMachine(16 << 20)
    m.keys.install(5, key)
    pfns = m.allocate(64, Placement.ANY)
    pfn = pfns[which]
    m.fw_write(pfn << 12, page, asid=5)
    stored = m.frames.read(pfn)
    assert stored == xts_encrypt(key, pfn << 12, page)
    assert m.fw_read(pfn << 12, 4096, asid=5) == page
    other = pfns[(which + 1) % 64]
    m.fw_write(other << 12, page, asid=5)
    assert m.frames.read(other) == xts_encrypt(key, other << 12, page) != stored
