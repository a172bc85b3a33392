"""The emulated chip's identity: CHIP_ID, chip secret, the VCEK per TCB, and the emulated AMD
key chain (ARK -> ASK -> VCEK) with AMD's certificate formats. Persisted in the data directory
so a restart keeps the same chip, keys and certificates, as fused secrets do.

Formats follow what AMD KDS serves (docs/abi.md#kds): ARK and ASK are RSA-4096 and sign with
RSASSA-PSS/SHA-384 (MGF1 SHA-384, salt 48); the VCEK is ECDSA P-384 and its certificate carries
the 1.3.6.1.4.1.3704.1 extensions (struct version, product name, SPLs, hwID = CHIP_ID as raw
bytes). SPEC: go-sev-guest kds/kds.go
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from snpemu.psp.atomic_write import write_atomic
from snpemu.psp.tcb import PRODUCTS, Product, Tcb
from snpemu.psp.vcek_cache import VcekCache

AMD_OID = "1.3.6.1.4.1.3704.1"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)
_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_VALID = datetime.timedelta(days=25 * 365)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return b"\x02" + bytes([len(body)]) + body


def _der_ia5(text: str) -> bytes:
    data = text.encode("ascii")
    return b"\x16" + bytes([len(data)]) + data


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD_OID}.{oid}"), value)


def _ca_cert(
    subject: str, issuer: str, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey, serial: int
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_EPOCH)
        .not_valid_after(_EPOCH + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(signer, hashes.SHA384(), rsa_padding=PSS)
    )


@functools.lru_cache(maxsize=16)
def _vcek_key(chip_secret: bytes, tcb: Tcb) -> ec.EllipticCurvePrivateKey:
    okm = HKDF(hashes.SHA384(), 64, salt=b"snpemu VCEK", info=tcb.raw.to_bytes(8, "little")).derive(
        chip_secret
    )
    scalar = int.from_bytes(okm, "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


@dataclass
class ChipIdentity:
    product: Product
    chip_id: bytes
    chip_secret: bytes
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    ark_cert: x509.Certificate
    ask_cert: x509.Certificate
    data_dir: Path
    vceks: VcekCache = field(init=False, repr=False, compare=False)
    _crl_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _crl_der: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # named for the product too: its productName extension names the stepping
        self.vceks = VcekCache(
            self.data_dir, f"vcek-{self.product.stepping_name}", self._sign_vcek, self._check_vcek
        )

    # --- creation and persistence -----------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, data_dir: Path, product_name: str, stepping: int | None = None
    ) -> ChipIdentity:
        product = PRODUCTS[product_name]
        if stepping is not None:
            product = product.at_stepping(stepping)
        data_dir.mkdir(parents=True, exist_ok=True)
        meta_path = data_dir / "chip.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            # a chip keeps its stepping; a directory from before steppings were recorded
            # takes the one asked for
            held = meta["product"], meta.get("stepping", product.stepping)
            if held != (product.name, product.stepping):
                raise ValueError(
                    f"{data_dir} holds a {meta['product']} chip at stepping {held[1]}, not "
                    f"{product.stepping_name}: use another SNPEMU_DATA_DIR"
                )

            def key(name: str) -> rsa.RSAPrivateKey:
                k = serialization.load_pem_private_key((data_dir / name).read_bytes(), None)
                assert isinstance(k, rsa.RSAPrivateKey)
                return k

            return cls(
                product=product,
                chip_id=bytes.fromhex(meta["chip_id"]),
                chip_secret=bytes.fromhex(meta["chip_secret"]),
                ark_key=key("ark.key"),
                ask_key=key("ask.key"),
                ark_cert=x509.load_pem_x509_certificate((data_dir / "ark.pem").read_bytes()),
                ask_cert=x509.load_pem_x509_certificate((data_dir / "ask.pem").read_bytes()),
                data_dir=data_dir,
            )
        ark_key = rsa.generate_private_key(65537, 4096)
        ask_key = rsa.generate_private_key(65537, 4096)
        ark = _ca_cert(f"ARK-{product.name}", f"ARK-{product.name}", ark_key, ark_key, 1)
        ask = _ca_cert(f"SEV-{product.name}", f"ARK-{product.name}", ask_key, ark_key, 2)
        ident = cls(
            product,
            secrets.token_bytes(64),
            secrets.token_bytes(32),
            ark_key,
            ask_key,
            ark,
            ask,
            data_dir,
        )
        ident._save(meta_path)
        return ident

    def _save(self, meta_path: Path) -> None:
        pem = serialization.Encoding.PEM
        for name, k in (("ark.key", self.ark_key), ("ask.key", self.ask_key)):
            path = self.data_dir / name
            path.write_bytes(
                k.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            os.chmod(path, 0o600)
        (self.data_dir / "ark.pem").write_bytes(self.ark_cert.public_bytes(pem))
        (self.data_dir / "ask.pem").write_bytes(self.ask_cert.public_bytes(pem))
        meta = {
            "product": self.product.name,
            "stepping": self.product.stepping,
            "chip_id": self.chip_id.hex(),
            "chip_secret": self.chip_secret.hex(),
        }
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.chmod(tmp, 0o600)
        tmp.replace(meta_path)

    # --- the VCEK --------------------------------------------------------------------------

    def vcek_key(self, tcb: Tcb) -> ec.EllipticCurvePrivateKey:
        """Derived from the chip secret and the TCB, as the AMD-SP derives it: the same chip
        and TCB always give the same key; another TCB gives another."""
        return _vcek_key(self.chip_secret, tcb)

    def vcek_der(self, tcb: Tcb) -> bytes:
        """The VCEK certificate for tcb, DER: signed once, then the same bytes while cached."""
        return self.vceks.get(tcb)

    def vcek_cert(self, tcb: Tcb) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.vcek_der(tcb))

    def _check_vcek(self, tcb: Tcb, der: bytes) -> None:
        """ValueError unless der is this chip's certificate of tcb's VCEK (a file from a crash
        mid-write, or another chip's, is not)."""
        cert = x509.load_der_x509_certificate(der)  # ValueError for a cut-short DER
        if cert.public_key() != self.vcek_key(tcb).public_key():
            raise ValueError("certifies another key than this chip's VCEK at that TCB")

    def _sign_vcek(self, tcb: Tcb) -> bytes:
        exts = [
            _ext("1", _der_int(1)),
            _ext("2", _der_ia5(self.product.stepping_name)),
            _ext("3.1", _der_int(tcb.boot_loader)),
            _ext("3.2", _der_int(tcb.tee)),
            _ext("3.3", _der_int(tcb.snp)),
            *(_ext(f"3.{i}", _der_int(0)) for i in range(4, 8)),
            _ext("3.8", _der_int(tcb.microcode)),
            # hwID: the 64-byte CHIP_ID as raw bytes (KDS omits the OCTET STRING tag)
            _ext("4", self.chip_id),
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK"))
            .issuer_name(self.ask_cert.subject)
            .public_key(self.vcek_key(tcb).public_key())
            .serial_number(int.from_bytes(self.chip_id[:8], "big") ^ tcb.raw | 1)
            .not_valid_before(_EPOCH)
            .not_valid_after(_EPOCH + _VALID)
        )
        for ext in exts:
            builder = builder.add_extension(ext, critical=False)
        cert = builder.sign(self.ask_key, hashes.SHA384(), rsa_padding=PSS)
        return cert.public_bytes(serialization.Encoding.DER)

    def crl(self) -> x509.CertificateRevocationList:
        """An empty CRL signed by the ARK (nothing revoked)."""
        return x509.load_der_x509_crl(self.crl_der())

    def crl_der(self) -> bytes:
        """Signed once (concurrent first callers wait for it) and kept, in memory and on disk."""
        with self._crl_lock:
            if self._crl_der is None:
                self._crl_der = self._load_or_sign_crl()
            return self._crl_der

    def _load_or_sign_crl(self) -> bytes:
        path = self.data_dir / "crl.der"
        if path.exists():
            der = path.read_bytes()
            try:
                crl = x509.load_der_x509_crl(der)
                if crl.is_signature_valid(self.ark_key.public_key()):
                    return der
            except ValueError:
                pass  # cut short by a crash mid-write (before writes were atomic): sign again
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark_cert.subject)
            .last_update(_EPOCH)
            .next_update(_EPOCH + _VALID)
            .sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)
        )
        der = crl.public_bytes(serialization.Encoding.DER)
        write_atomic(path, der)
        return der
