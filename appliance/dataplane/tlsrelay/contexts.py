"""TLS settings of the relay: TLS 1.3 only, our ALPN, client certificates, trust pinned to one peer.

Each side trusts exactly the peer's self-signed per-session certificate (learnt through Peer.Join),
so a certificate of another session, or any other, fails the handshake; `peer_fingerprint` is checked
again on every connection.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile

from .wire import ALPN


def _base(purpose: ssl.Purpose, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection proves its certificate
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # TLS 1.3 would still send (stateful) tickets after the handshake
    _load_identity(ctx, cert_pem, key_pem)
    return ctx


def _load_identity(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # The ssl module loads keys only from files: a private file that lives for one call.
    fd, path = tempfile.mkstemp(
        prefix="scistream-tls-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    try:
        os.write(fd, cert_pem + b"\n" + key_pem)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """Producer side. Trusts nobody until `trust(ctx, peer_cert_pem)`: every handshake fails before."""
    return _base(ssl.Purpose.CLIENT_AUTH, cert_pem, key_pem)


def client_context(cert_pem: bytes, key_pem: bytes, peer_cert_pem: bytes) -> ssl.SSLContext:
    """Consumer side: presents our certificate, accepts only `peer_cert_pem` (checked with its name)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_pem, key_pem)
    trust(ctx, peer_cert_pem)
    return ctx


def trust(ctx: ssl.SSLContext, peer_cert_pem: bytes) -> None:
    """Admit the holder of `peer_cert_pem` (applies to handshakes that start afterwards)."""
    ctx.load_verify_locations(cadata=peer_cert_pem.decode())


def fingerprint_of_der(der: bytes | None) -> str:
    return hashlib.sha256(der).hexdigest() if der else ""


def fingerprint_of_pem(cert_pem: bytes) -> str:
    return fingerprint_of_der(ssl.PEM_cert_to_DER_cert(cert_pem.decode()))


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """SHA-256 of the certificate the peer presented on this connection ("" if none)."""
    if ssl_object is None:
        return ""
    return fingerprint_of_der(ssl_object.getpeercert(binary_form=True))
