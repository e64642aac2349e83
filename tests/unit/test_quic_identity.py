"""Per-session certificates and their fingerprints."""

import hashlib
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quic_relay import fingerprint_of, generate_identity, normalize_fingerprint


def _sans(cert_pem: bytes) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_fingerprint_is_sha256_of_der_in_lowercase_hex() -> None:
    identity = generate_identity("relay.example")
    der = x509.load_pem_x509_certificate(identity.cert_pem).public_bytes(serialization.Encoding.DER)
    assert identity.fingerprint == hashlib.sha256(der).hexdigest()
    assert fingerprint_of(identity.cert_pem) == identity.fingerprint


def test_each_identity_is_distinct() -> None:
    first, second = generate_identity("a"), generate_identity("a")
    assert first.fingerprint != second.fingerprint
    assert first.key_pem != second.key_pem


def test_key_is_ec_p256() -> None:
    key = serialization.load_pem_private_key(generate_identity("a").key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_sans_are_ip_or_dns_and_include_the_common_name() -> None:
    sans = _sans(generate_identity("relay.example", sans=["10.1.0.5", "gw.example", "::1"]).cert_pem)
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example", "gw.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.0.5"),
        ipaddress.ip_address("::1"),
    ]


def test_ip_common_name_is_not_a_dns_san() -> None:
    sans = _sans(generate_identity("192.0.2.1", sans=["192.0.2.1"]).cert_pem)
    assert sans.get_values_for_type(x509.DNSName) == []
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]


def test_repr_does_not_show_the_key() -> None:
    identity = generate_identity("a")
    assert b"PRIVATE" not in repr(identity).encode()


def test_normalize_accepts_colon_separated_uppercase() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == digest
    assert normalize_fingerprint(f" {digest} ") == digest


@pytest.mark.parametrize("text", ["", "abcd", "zz" * 32, "ab" * 33])
def test_normalize_refuses_anything_but_64_hex_digits(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_fingerprint(text)
