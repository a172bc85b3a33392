"""The memory encryption engine: one AES-256-XTS key per ASID, tweaked by physical address.

A guest-private page is stored encrypted with its ASID's key and a tweak of its system
physical address, so the host reads ciphertext and the same plaintext at two addresses
encrypts differently, as on hardware (which also tweaks by address).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from snpemu.errors import InvalidArgument, WrongState
from snpemu.rmp.entry import MAX_ASID
from snpemu.rmp.reasons import RmpReason

KEY_BYTES = 64  # AES-256-XTS takes two 256-bit keys


class MemoryKeys:
    def __init__(self) -> None:
        self._keys: dict[int, algorithms.AES] = {}

    def install(self, asid: int, key: bytes) -> None:
        if not 1 <= asid <= MAX_ASID:
            raise InvalidArgument(
                f"ASID {asid} is outside 1..{MAX_ASID}", reason=RmpReason.OUT_OF_RANGE
            )
        if len(key) != KEY_BYTES or key[:32] == key[32:]:
            raise InvalidArgument(
                "an AES-256-XTS key is 64 bytes with two different halves",
                reason=RmpReason.INVALID_ARGUMENT,
            )
        self._keys[asid] = algorithms.AES(key)

    def remove(self, asid: int) -> None:
        if self._keys.pop(asid, None) is None:
            raise WrongState(f"ASID {asid} has no key installed", reason=RmpReason.NO_KEY)

    def has(self, asid: int) -> bool:
        return asid in self._keys

    def _cipher(self, asid: int, spa: int) -> Cipher[modes.XTS]:
        key = self._keys.get(asid)
        if key is None:
            raise WrongState(f"ASID {asid} has no key installed", reason=RmpReason.NO_KEY)
        return Cipher(key, modes.XTS(spa.to_bytes(16, "little")))

    def encrypt(self, asid: int, spa: int, page: bytes) -> bytes:
        enc = self._cipher(asid, spa).encryptor()
        return enc.update(page) + enc.finalize()

    def decrypt(self, asid: int, spa: int, page: bytes) -> bytes:
        dec = self._cipher(asid, spa).decryptor()
        return dec.update(page) + dec.finalize()
