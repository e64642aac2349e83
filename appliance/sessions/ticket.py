"""Tickets, and the proofs appliances exchange to show they know a session's secret.

A ticket is one copy-pasteable string: `sst1.<base64url(JSON)>.<base64url(check)>`. The check only
catches copy-paste damage; security comes from the secret inside (never sent again) and from the
producer appliance's pinned certificate fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from appliance.errors import InvalidArgument

PREFIX = "sst1"
SECRET_BYTES = 32  # 256-bit session secrets
NONCE_BYTES = 16
_CHECK_BYTES = 6


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Ticket:
    producer_address: str
    producer_fingerprint: str
    session_id: str
    secret: bytes
    mode: str
    protocol: str

    def encode(self) -> str:
        payload = json.dumps(
            {
                "a": self.producer_address,
                "f": self.producer_fingerprint,
                "i": self.session_id,
                "s": _b64encode(self.secret),
                "m": self.mode,
                "p": self.protocol,
            },
            separators=(",", ":"),
        ).encode()
        check = hashlib.sha256(payload).digest()[:_CHECK_BYTES]
        return f"{PREFIX}.{_b64encode(payload)}.{_b64encode(check)}"

    @classmethod
    def decode(cls, text: str) -> Ticket:
        """Parses a ticket; InvalidArgument says what is wrong without echoing the secret."""
        parts = text.strip().split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise InvalidArgument("ticket is malformed: expected sst1.<payload>.<check>; copy it again")
        try:
            payload, check = _b64decode(parts[1]), _b64decode(parts[2])
        except ValueError:
            raise InvalidArgument("ticket is malformed: not base64url; copy it again") from None
        if not hmac.compare_digest(hashlib.sha256(payload).digest()[:_CHECK_BYTES], check):
            raise InvalidArgument("ticket is damaged (check mismatch); copy it again")
        try:
            fields = json.loads(payload)
            ticket = cls(
                producer_address=str(fields["a"]),
                producer_fingerprint=str(fields["f"]),
                session_id=str(fields["i"]),
                secret=_b64decode(str(fields["s"])),
                mode=str(fields["m"]),
                protocol=str(fields["p"]),
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("ticket is malformed: missing or bad fields") from None
        if len(ticket.secret) < SECRET_BYTES:
            raise InvalidArgument("ticket is malformed: secret too short")
        return ticket


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _transcript(label: str, *items: bytes | str | int) -> bytes:
    """Length-prefixed encoding, so no two different transcripts collide."""
    out = bytearray(label.encode())
    for item in items:
        raw = item if isinstance(item, bytes) else str(item).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def mac(secret: bytes, label: str, *items: bytes | str | int) -> bytes:
    """HMAC-SHA256 of a labelled transcript under the session secret."""
    return hmac.new(secret, _transcript(label, *items), hashlib.sha256).digest()


def verify(secret: bytes, proof: bytes, label: str, *items: bytes | str | int) -> bool:
    return hmac.compare_digest(mac(secret, label, *items), proof)


JOIN_LABEL = "scistream-join-v1"
ACCEPT_LABEL = "scistream-accept-v1"
LEAVE_LABEL = "scistream-leave-v1"


@dataclass
class NonceBook:
    """Single-use, short-lived server nonces per session, so a captured Join cannot be replayed."""

    ttl: float = 60.0
    per_session: int = 8
    _issued: dict[str, dict[bytes, float]] = field(default_factory=dict)

    def issue(self, session_id: str, now: float | None = None) -> bytes:
        now = time.monotonic() if now is None else now
        book = {n: t for n, t in self._issued.get(session_id, {}).items() if t > now}
        while len(book) >= self.per_session:  # bound memory under a flood of challenges
            book.pop(next(iter(book)))
        nonce = new_nonce()
        book[nonce] = now + self.ttl
        self._issued[session_id] = book
        return nonce

    def consume(self, session_id: str, nonce: bytes, now: float | None = None) -> bool:
        """True once for a nonce issued for `session_id` and not yet expired."""
        now = time.monotonic() if now is None else now
        expires = self._issued.get(session_id, {}).pop(nonce, None)
        return expires is not None and expires > now

    def forget(self, session_id: str) -> None:
        self._issued.pop(session_id, None)
