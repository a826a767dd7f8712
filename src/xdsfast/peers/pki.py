"""A throw-away PKI: a CA and the leaf certificates it signs, made at run time.

The tests' TLS peers and the relay benchmark's TLS rows share it.  It needs the
``cryptography`` package, which only the ``test`` and ``bench`` extras install, so
import it where those run (tests, benchmarks), never from the agent or the demo.

The CA carries a subject key identifier and each leaf the matching authority key
identifier: OpenSSL's strict verification (Python 3.13's default contexts) and Go's
crypto/x509 (the stock pilot-agent) then both accept the chain.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "Issued"]


@dataclass(frozen=True)
class Issued:
    """A leaf's private key (PKCS#8) and certificate, both PEM."""

    key: bytes
    cert: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``stem-key.pem`` (mode 0600, as a real key would be) and ``stem-cert.pem``."""
        key, cert = directory / f"{stem}-key.pem", directory / f"{stem}-cert.pem"
        key.touch(mode=0o600)
        key.write_bytes(self.key)
        cert.write_bytes(self.cert)
        return key, cert


class Authority:
    """A self-signed CA that signs server and client certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._key_id = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(self._key_id, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM: what a peer trusts."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
    ) -> Issued:
        """A leaf for ``common_name`` with ``dns``/``ips`` as its SANs.

        Server authentication unless ``client``; ``expired`` makes one whose validity
        ended yesterday (to test that peers refuse it).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        start, end = (
            (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=10))
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._key_id),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert.public_bytes(serialization.Encoding.PEM),
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
