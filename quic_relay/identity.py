"""Per-session certificates: generation and SHA-256 fingerprints used for pinning."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, both PEM encoded."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never show key material in logs or tracebacks
        return f"Identity(fingerprint={self.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, lowercase hex without colons."""
        return fingerprint_of(self.cert_pem)


def fingerprint_of(cert_pem: bytes) -> str:
    """SHA-256 fingerprint (lowercase hex) of the first certificate in `cert_pem`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept "AB:CD:..." or "abcd...", return 64 lowercase hex digits; ValueError otherwise."""
    cleaned = text.strip().replace(":", "").lower()
    if not _HEX64.fullmatch(cleaned):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return cleaned


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def generate_identity(common_name: str, *, sans: Sequence[str] = (), days: int = 825) -> Identity:
    """Make a self-signed EC P-256 certificate.

    Each SAN becomes an IPAddress entry when it parses as an IP, else a DNSName; `common_name`
    is always a DNS SAN too unless it is an IP address.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    if not _is_ip(common_name):
        names.append(x509.DNSName(common_name))
    for san in sans:
        general = _general_name(san)
        if general not in names:
            names.append(general)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(159) | 1)  # positive, at most 20 bytes (RFC 5280)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return Identity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
