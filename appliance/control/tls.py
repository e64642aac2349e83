"""TLS for the control channel: the appliance's own certificate, and clients that pin it.

Clients verify an appliance by a CA file (hostname checked) or by its SHA-256 fingerprint. Pinning
works with public `ssl` APIs only: the certificate is fetched once, compared with the pin, and then
used as the sole trust anchor of the real connection, so a different certificate fails the handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog

from appliance.errors import InvalidArgument, Unavailable
from quic_relay import fingerprint_of, generate_identity, normalize_fingerprint

log = structlog.get_logger(__name__)

ALPN = ["h2"]


@dataclass(frozen=True)
class ControlCertificate:
    cert_file: Path
    key_file: Path
    fingerprint: str


def default_cert_files(state_dir: Path) -> tuple[Path, Path]:
    """Where the appliance keeps the control certificate and key it creates itself."""
    tls_dir = state_dir / "tls"
    return tls_dir / "control.crt", tls_dir / "control.key"


def ensure_certificate(
    state_dir: Path, hosts: list[str], cert_file: Path | None = None, key_file: Path | None = None
) -> ControlCertificate:
    """The configured certificate, or the one in `state_dir/tls`, created on first start (key 0600)."""
    if cert_file or key_file:
        if not (cert_file and key_file and cert_file.is_file() and key_file.is_file()):
            raise InvalidArgument("--tls-cert and --tls-key must both name existing files")
        return ControlCertificate(cert_file, key_file, fingerprint_of(cert_file.read_bytes()))
    cert_file, key_file = default_cert_files(state_dir)
    if not (cert_file.is_file() and key_file.is_file()):
        cert_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1", "::1"]))
        # A unique subject: clients may trust several appliances' certificates from one CA file, and
        # OpenSSL picks the trust anchor by subject name.
        identity = generate_identity(f"scistream-appliance-{secrets.token_hex(4)}", sans=names)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(identity.key_pem)
        cert_file.write_bytes(identity.cert_pem)
        log.info("created the control certificate", cert=str(cert_file), names=names)
    return ControlCertificate(cert_file, key_file, fingerprint_of(cert_file.read_bytes()))


def server_context(cert: ControlCertificate) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def ca_context(ca_file: Path) -> ssl.SSLContext:
    """Verifies the server against `ca_file`, hostname included."""
    if not ca_file.is_file():
        raise InvalidArgument(f"CA file {ca_file} does not exist")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


async def fetch_certificate(
    host: str, port: int, timeout: float = 10.0, verify: ssl.SSLContext | None = None
) -> bytes:
    """The DER certificate a TLS server presents: checked by `verify` if given, else unverified
    (the caller compares it with a pin)."""
    probe = verify
    if probe is None:
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        probe.set_alpn_protocols(ALPN)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=probe), timeout)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise Unavailable(f"cannot reach appliance at {host}:{port}: {exc or 'timed out'}") from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    finally:
        writer.close()
    if not der:
        raise Unavailable(f"appliance at {host}:{port} presented no certificate")
    return der


async def pinned_context(host: str, port: int, fingerprint: str, timeout: float = 10.0) -> ssl.SSLContext:
    """A context that accepts only the certificate whose SHA-256 fingerprint is `fingerprint`."""
    try:
        pin = normalize_fingerprint(fingerprint)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    der = await fetch_certificate(host, port, timeout)
    if hashlib.sha256(der).hexdigest() != pin:
        raise Unavailable(f"appliance at {host}:{port} presented a certificate that does not match the pin")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ssl.DER_cert_to_PEM_cert(der))
    ctx.check_hostname = False  # the pin identifies the server; its names need not match how we reach it
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx
