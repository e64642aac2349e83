"""Yardsticks run by the harness: stunnel (Debian's stunnel4) between the two facilities.

- `stunnel-tls13`: TLS 1.3 with certificates configured by hand, both sides verified (what a careful
  operator would set up without SciStream).
- `stunnel-enull`: `ciphers = eNULL`, as SciStream 1.2.1 configures it: no encryption, no peer check
  (OpenSSL 3 needs security level 0 to offer NULL ciphers at all, and TLS 1.3 has none).
TCP only: stunnel does not carry UDP.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from bench.paths import IPERF_PORT, BenchPath, Target
from quic_relay import generate_identity
from tests.integration.topology import Facility, Topology

SERVER_PORT = 5300  # stunnel server in A (the producer side)
ENTRY_PORT = 5110  # stunnel client in B (where iperf3 connects)
SERVER_NAME = "producer.bench.scistream"


class Stunnel(BenchPath):
    """stunnel client in B → stunnel server in A → iperf3 -s in A."""

    server_options: ClassVar[list[str]]
    client_options: ClassVar[list[str]]

    def start(self, topology: Topology) -> Target:
        if shutil.which("stunnel4") is None:
            raise RuntimeError("stunnel4 is not installed (scripts/bootstrap installs it)")
        a, b = topology.a, topology.b
        a_cert, a_key = write_identity(a, SERVER_NAME)
        b_cert, b_key = write_identity(b, "consumer.bench.scistream")
        values = {"a_cert": a_cert, "a_key": a_key, "b_cert": b_cert, "b_key": b_key}
        server = [
            f"accept = {a.wan_ip}:{SERVER_PORT}",
            f"connect = 127.0.0.1:{IPERF_PORT}",
            *(line.format(**values) for line in self.server_options),
        ]
        client = [
            "client = yes",
            f"accept = 127.0.0.1:{ENTRY_PORT}",
            f"connect = {a.wan_ip}:{SERVER_PORT}",
            *(line.format(**values) for line in self.client_options),
        ]
        _run(a, "server", server)
        a.wait_listening("tcp", SERVER_PORT)
        _run(b, "client", client)
        b.wait_listening("tcp", ENTRY_PORT)
        return Target("127.0.0.1", ENTRY_PORT, udp=False)


class StunnelTls13(Stunnel):
    name = "stunnel-tls13"
    label = "stunnel TLS 1.3, certificates by hand"
    server_options: ClassVar[list[str]] = [
        "cert = {a_cert}",
        "key = {a_key}",
        "sslVersionMin = TLSv1.3",
        "verifyPeer = yes",
        "CAfile = {b_cert}",
    ]
    client_options: ClassVar[list[str]] = [
        "cert = {b_cert}",
        "key = {b_key}",
        "sslVersionMin = TLSv1.3",
        "verifyPeer = yes",
        "CAfile = {a_cert}",
        f"checkHost = {SERVER_NAME}",
    ]


class StunnelENull(Stunnel):
    name = "stunnel-enull"
    label = "stunnel eNULL (SciStream 1.2.1's data plane)"
    server_options: ClassVar[list[str]] = [
        "cert = {a_cert}",
        "key = {a_key}",
        "ciphers = eNULL",
        "securityLevel = 0",
        "sslVersionMax = TLSv1.2",
    ]
    client_options: ClassVar[list[str]] = ["ciphers = eNULL", "securityLevel = 0", "sslVersionMax = TLSv1.2"]


def write_identity(facility: Facility, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for `name`, written into the facility's work directory."""
    identity = generate_identity(name)
    cert, key = facility.workdir / f"{name}.crt", facility.workdir / f"{name}.key"
    cert.write_bytes(identity.cert_pem)
    key.write_bytes(identity.key_pem)
    key.chmod(0o600)
    return cert, key


def _run(facility: Facility, role: str, service: list[str]) -> None:
    conf = facility.workdir / f"stunnel-{role}.conf"
    lines = [
        "foreground = yes",
        "pid =",
        f"output = {facility.workdir}/stunnel-{role}.log",
        "[bench]",
        *service,
    ]
    conf.write_text("\n".join(lines) + "\n")
    facility.spawn("stunnel4", conf, log=facility.workdir / f"stunnel-{role}.out")


STUNNEL_PATHS: dict[str, type[BenchPath]] = {cls.name: cls for cls in (StunnelTls13, StunnelENull)}
