"""Self-signed TLS material for test servers and proxies."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsPair:
    """PEM files of one self-signed certificate and its key.

    The certificate is its own CA, so ``cert`` doubles as the trust anchor for clients that
    want to verify instead of skipping verification.
    """

    cert: Path
    key: Path
    domain: str

    @property
    def ca(self) -> Path:
        return self.cert


def make_self_signed(
    directory: Path,
    domain: str = "localhost",
    *,
    extra_names: tuple[str, ...] = (),
    days: int = 30,
    name: str | None = None,
) -> TlsPair:
    """Write ``NAME.crt`` and ``NAME.key`` (EC P-256) for ``domain`` into ``directory``.

    The SAN lists ``domain``, ``localhost``, any ``extra_names`` and 127.0.0.1, because clients
    in tests connect to 127.0.0.1 while naming the XMPP domain. P-256 keeps generation to a
    millisecond; RSA-2048 would cost tens of milliseconds per fixture for nothing.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = name or domain
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])

    dns_names: list[str] = []
    for candidate in (domain, "localhost", *extra_names):
        if candidate not in dns_names:
            dns_names.append(candidate)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))

    # Backdate a little so a clock that runs slightly behind does not reject a fresh cert.
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TlsPair(cert=cert_path, key=key_path, domain=domain)
