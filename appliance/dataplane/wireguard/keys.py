"""Per-session WireGuard keys: X25519 pairs made here, and the preshared key both sides derive."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import InvalidArgument

KEY_SIZE = 32
_PSK_INFO = b"scistream/v1 wireguard preshared key"


def generate_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes); it never leaves this appliance."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def derive_preshared_key(secret: bytes) -> bytes:
    """The session's WireGuard preshared key, from the session secret (HKDF-SHA256).

    Both appliances know the secret from the ticket, so the key itself never crosses the wire.
    """
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=_PSK_INFO).derive(secret)


def check_public_key(key: bytes) -> bytes:
    """`key` if it is a usable X25519 public key (32 bytes, not all zero), else InvalidArgument."""
    if len(key) != KEY_SIZE or not any(key):
        raise InvalidArgument(f"malformed WireGuard public key ({len(key)} bytes, need {KEY_SIZE} non-zero)")
    return key
