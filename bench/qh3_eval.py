"""qh3 against aioquic as the QUIC relay's engine: mutual TLS, the hooks the relay uses, bulk throughput.

Standalone on purpose (stdlib, cryptography, and whichever of aioquic / qh3 is installed; nothing from
the appliance), so that it runs on any machine from a bare virtualenv:

    python3 -m venv v && v/bin/pip install --no-index /path/to/wheels/*.whl
    v/bin/python bench/qh3_eval.py --rounds 3 --seconds 4

Three parts, each selectable with --only:
- `tls`: mutual TLS as the relay needs it. The server pins the client's per-session certificate (ECDSA
  P-256, self-signed) by SHA-256 fingerprint and must refuse any other certificate, or none, before it
  acts on anything the client sent. Every engine pairing is tried with the server configured through
  the public API only (verify_mode=CERT_REQUIRED and the client certificate as its only CA) and with
  the private hook `quic_relay/connection.py` uses on aioquic (`tls._request_client_certificate`), for
  the pinned P-256 certificate, another P-256 certificate, Ed25519 ones, and none. Reported per case:
  whether the client received a CertificateRequest, which certificate the server saw, the verdict,
  what the client observed, and how many stream bytes reached the server before its verdict.
- `hooks`: which aioquic internals used by `quic_relay/connection.py` exist on each engine's
  QuicConnection (checked on live objects after an in-memory handshake), plus qh3's public calls that
  might replace some of them.
- `bench`: one bidirectional stream, the client writing as fast as flow control allows to a server
  that discards, on 127.0.0.1, client and server in separate processes; Mbit/s at the server and CPU
  seconds per GB of both processes (/proc/PID/stat utime+stime), for each packet size (both sides'
  max_datagram_size). Engines and sizes are interleaved over --rounds. Both engines run the same code
  through their public asyncio API (`serve`/`connect`, stream reader/writer) at their defaults except
  packet size and flow-control windows, which are set the same on both. Neither engine's stream writer
  applies backpressure, so the writer waits while more than HIGH_WATER bytes of its stream are still
  unsent (qh3: `get_send_buffer_size`, public; aioquic: the stream sender's offsets, private).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import importlib
import json
import os
import platform
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

ALPN = "qh3-eval"
SERVER_NAME = "producer.qh3-eval.scistream"
HZ = os.sysconf("SC_CLK_TCK")
MAX_STREAM_DATA = 4 * 1024 * 1024  # the relay's per-stream window (quic_relay.config.max_stream_buffer)
MAX_DATA = 4 * MAX_STREAM_DATA  # the relay's connection window
HIGH_WATER = 1024 * 1024  # unsent bytes a writer leaves queued before it waits
CHUNK = 64 * 1024
UNAUTHORIZED = 0x1  # application close code, as the relay's CONNECTION_UNAUTHORIZED
CASE_TIMEOUT = 5.0
ENGINES = ("aioquic", "qh3")


# engines


@dataclass
class Engine:
    """The parts of aioquic or qh3 this script uses; both spell them the same way."""

    name: str
    version: str
    connect: Any
    serve: Any
    protocol: Any  # QuicConnectionProtocol
    configuration: Any  # QuicConfiguration
    connection: Any  # QuicConnection
    events: ModuleType
    tls: ModuleType


def load_engine(name: str) -> Engine:
    from importlib.metadata import version

    asyncio_api = importlib.import_module(f"{name}.asyncio")
    return Engine(
        name=name,
        version=version(name),
        connect=asyncio_api.connect,
        serve=asyncio_api.serve,
        protocol=asyncio_api.QuicConnectionProtocol,
        configuration=importlib.import_module(f"{name}.quic.configuration").QuicConfiguration,
        connection=importlib.import_module(f"{name}.quic.connection").QuicConnection,
        events=importlib.import_module(f"{name}.quic.events"),
        tls=importlib.import_module(f"{name}.tls"),
    )


def available_engines(names: list[str]) -> list[Engine]:
    engines = []
    for name in names:
        try:
            engines.append(load_engine(name))
        except ImportError as exc:
            print(f"engine {name} not available: {exc}", file=sys.stderr)
    return engines


def peer_certificate_der(engine: Engine, quic: Any) -> bytes | None:
    """DER of the certificate the peer presented, through the engine's own accessor."""
    if engine.name == "qh3":
        cert = quic.get_peercert()  # public in qh3
        return None if cert is None else bytes(cert.public_bytes())
    context = quic.tls
    cert = None if context is None else context._peer_certificate  # private in aioquic
    return None if cert is None else cert.public_bytes(serialization.Encoding.DER)


def unsent_bytes(engine: Engine, quic: Any, stream_id: int) -> int:
    """Bytes written to the stream and not yet sent once."""
    if engine.name == "qh3":
        return int(quic.get_send_buffer_size(stream_id))
    stream = quic._streams.get(stream_id)
    return 0 if stream is None else stream.sender._buffer_stop - stream.sender.highest_offset


def request_client_certificate(engine: Engine, quic: Any, record: dict[str, Any]) -> None:
    """The relay's aioquic hook: set `tls._request_client_certificate` on the server's TLS context
    as soon as the engine creates it (aioquic: `_initialize`; qh3: `_create_tls`)."""
    name = "_initialize" if engine.name == "aioquic" else "_create_tls"
    original = getattr(quic, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        record["hook_attribute_existed"] = hasattr(quic.tls, "_request_client_certificate")
        quic.tls._request_client_certificate = True
        return result

    setattr(quic, name, wrapped)


def fingerprint(der: bytes | None) -> str | None:
    return None if der is None else hashlib.sha256(der).hexdigest()


# certificates


@dataclass
class Identity:
    name: str
    cert: Path
    key: Path
    pem: bytes
    fingerprint: str


def make_identity(directory: Path, name: str, common_name: str, kind: str) -> Identity:
    """A self-signed certificate like the relay's per-session ones (identity.py); kind p256 or ed25519."""
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "p256" else ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256() if kind == "p256" else None)
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return Identity(name, cert_path, key_path, pem, hashlib.sha256(der).hexdigest())


def make_identities(directory: Path) -> dict[str, Identity]:
    return {
        "server": make_identity(directory, "server", SERVER_NAME, "p256"),
        "p256-pinned": make_identity(directory, "p256-pinned", "consumer.qh3-eval.scistream", "p256"),
        "p256-other": make_identity(directory, "p256-other", "consumer.qh3-eval.scistream", "p256"),
        "ed25519-pinned": make_identity(
            directory, "ed25519-pinned", "consumer.qh3-eval.scistream", "ed25519"
        ),
        "ed25519-other": make_identity(directory, "ed25519-other", "consumer.qh3-eval.scistream", "ed25519"),
    }


def configuration(
    engine: Engine,
    *,
    is_client: bool,
    own: Identity | None,
    peer_pem: bytes | None,
    size: int | None = None,
) -> Any:
    """The same settings on both engines: ALPN, server name, flow-control windows, packet size;
    `own` is loaded as this side's certificate, `peer_pem` is the only CA and verification required."""
    config = engine.configuration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        server_name=SERVER_NAME if is_client else None,
        max_stream_data=MAX_STREAM_DATA,
        max_data=MAX_DATA,
    )
    if size is not None:
        config.max_datagram_size = size
    if own is not None:
        config.load_cert_chain(str(own.cert), str(own.key))
    if peer_pem is not None:
        config.load_verify_locations(cadata=peer_pem)
        config.verify_mode = ssl.CERT_REQUIRED
    return config


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# part 1: mutual TLS


@dataclass
class TlsCase:
    server: str
    client: str
    server_mode: str  # "public" or "public+hook"
    client_cert: str  # identity name, or "none"
    pinned: str  # identity name the server pins
    certificate_request: bool | None = None  # the client received a CertificateRequest
    hook_attribute_existed: bool | None = None
    server_saw: str = "-"  # "pinned", "other", "none", "-" (no handshake)
    verdict: str = "-"  # server: accepted / refused / no handshake
    client_outcome: str = "-"
    bytes_before_verdict: int = 0
    echo_ok: bool = False
    loop_errors: list[str] = field(default_factory=list)  # exceptions the engines raised into the loop

    @property
    def holds(self) -> bool:
        """Whether this case behaved as the relay requires."""
        if self.client_cert == self.pinned:
            return bool(self.certificate_request) and self.server_saw == "pinned" and self.echo_ok
        return not self.echo_ok and self.verdict != "accepted" and self.bytes_before_verdict == 0


def server_protocol_class(engine: Engine, case: TlsCase, pin: str, hook: bool) -> Callable[..., Any]:
    events = engine.events

    class PinningServer(engine.protocol):  # type: ignore[name-defined,misc]
        """Checks the client certificate against the pin at HandshakeCompleted, as the relay does;
        echoes stream data only for the pinned client."""

        def __init__(self, quic: Any, stream_handler: Any = None) -> None:
            super().__init__(quic)
            self.authenticated = False
            self.verdict_given = False
            record: dict[str, Any] = {}
            self.hook_record = record
            if hook:
                request_client_certificate(engine, quic, record)

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.HandshakeCompleted):
                seen = fingerprint(peer_certificate_der(engine, self._quic))
                case.server_saw = "none" if seen is None else "pinned" if seen == pin else "other"
                case.hook_attribute_existed = self.hook_record.get("hook_attribute_existed")
                self.verdict_given = True
                if seen == pin:
                    self.authenticated = True
                    case.verdict = "accepted"
                else:
                    case.verdict = "refused"
                    self._quic.close(error_code=UNAUTHORIZED, reason_phrase="peer certificate not authorized")
            elif isinstance(event, events.StreamDataReceived):
                if not self.verdict_given:
                    case.bytes_before_verdict += len(event.data)
                if self.authenticated:
                    self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)

    return PinningServer


def client_protocol_class(engine: Engine) -> Callable[..., Any]:
    class Client(engine.protocol):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.terminated: Any = None

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, engine.events.ConnectionTerminated):
                self.terminated = event
            super().quic_event_received(event)

    return Client


def describe_close(event: Any) -> str:
    code = event.error_code
    kind = f"TLS alert {code - 0x100}" if 0x100 <= code <= 0x1FF else f"error 0x{code:x}"
    return f"closed by server: {kind} {event.reason_phrase!r}"


async def run_tls_case(
    server_engine: Engine, client_engine: Engine, case: TlsCase, ids: dict[str, Identity]
) -> None:
    pin = ids[case.pinned]
    server_config = configuration(server_engine, is_client=False, own=ids["server"], peer_pem=pin.pem)
    client_id = None if case.client_cert == "none" else ids[case.client_cert]
    client_config = configuration(client_engine, is_client=True, own=client_id, peer_pem=ids["server"].pem)
    port = free_udp_port()
    server = await server_engine.serve(
        "127.0.0.1",
        port,
        configuration=server_config,
        create_protocol=server_protocol_class(
            server_engine, case, pin.fingerprint, hook=case.server_mode == "public+hook"
        ),
    )
    try:
        async with client_engine.connect(
            "127.0.0.1",
            port,
            configuration=client_config,
            create_protocol=client_protocol_class(client_engine),
        ) as client:
            context = client._quic.tls
            case.certificate_request = getattr(context, "_certificate_request", None) is not None
            reader, writer = await client.create_stream()
            writer.write(b"ping from the client")
            writer.write_eof()
            echo = await asyncio.wait_for(reader.read(), CASE_TIMEOUT)
            case.echo_ok = echo == b"ping from the client"
            if case.echo_ok:
                case.client_outcome = "echo received"
            elif client.terminated is not None:
                case.client_outcome = describe_close(client.terminated)
            else:
                case.client_outcome = f"no echo ({len(echo)} bytes)"
    except TimeoutError:
        case.client_outcome = "timed out waiting for the echo"
    except ConnectionError as exc:
        case.client_outcome = f"handshake failed ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
    finally:
        server.close()
    if case.verdict == "-":
        case.verdict = "no handshake"


async def check_tls(engines: list[Engine], ids: dict[str, Identity]) -> list[TlsCase]:
    by_name = {e.name: e for e in engines}
    pairs = [(e.name, e.name) for e in engines]
    if "aioquic" in by_name and "qh3" in by_name:
        pairs += [("aioquic", "qh3"), ("qh3", "aioquic")]
    cases: list[TlsCase] = []
    loop = asyncio.get_running_loop()

    def record(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if cases:  # whatever the engines raise from their callbacks, counted against the case running
            cases[-1].loop_errors.append(f"{type(exc).__name__}: {exc}" if exc else str(context["message"]))

    loop.set_exception_handler(record)
    for server_name, client_name in pairs:
        for mode in ("public", "public+hook"):
            for client_cert, pinned in (
                ("p256-pinned", "p256-pinned"),
                ("p256-other", "p256-pinned"),
                ("none", "p256-pinned"),
                ("ed25519-pinned", "ed25519-pinned"),
                ("ed25519-other", "ed25519-pinned"),
            ):
                case = TlsCase(server_name, client_name, mode, client_cert, pinned)
                cases.append(case)
                try:
                    await asyncio.wait_for(
                        run_tls_case(by_name[server_name], by_name[client_name], case, ids), 3 * CASE_TIMEOUT
                    )
                except Exception as exc:  # a case that crashes is a finding, not the end of the run
                    case.client_outcome = f"error: {type(exc).__name__}: {exc}"[:120]
                await asyncio.sleep(0.3)  # late timer callbacks land on this case
    loop.set_exception_handler(None)
    return cases


def print_tls(cases: list[TlsCase]) -> None:
    print("\n## Mutual TLS (server pins the client certificate's SHA-256)\n")
    print("| server | client | server mode | client cert | pin | CertRequest | server saw | verdict "
          "| client outcome | bytes before verdict | as required | engine errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c.server} | {c.client} | {c.server_mode} | {c.client_cert} | {c.pinned} "
            f"| {_yes(c.certificate_request)} | {c.server_saw} | {c.verdict} | {c.client_outcome} "
            f"| {c.bytes_before_verdict} | {'yes' if c.holds else 'NO'} | {_errors(c.loop_errors)} |"
        )
    print()
    for server in dict.fromkeys(c.server for c in cases):
        for mode in ("public", "public+hook"):
            group = [c for c in cases if c.server == server and c.client == server and c.server_mode == mode]
            if not group:
                continue
            p256 = [c for c in group if c.pinned == "p256-pinned"]
            ed = [c for c in group if c.pinned == "ed25519-pinned"]
            existed = {c.hook_attribute_existed for c in group if c.hook_attribute_existed is not None}
            hook_note = (
                f" (hook attribute existed before it was set: {_yes(existed.pop())})" if existed else ""
            )
            print(
                f"{server} server, {mode}{hook_note}: mutual TLS with a pinned P-256 client certificate "
                f"{'HOLDS' if all(c.holds for c in p256) else 'DOES NOT HOLD'}; "
                f"with Ed25519 {'holds' if all(c.holds for c in ed) else 'does not hold'}"
            )


def _errors(errors: list[str]) -> str:
    return "; ".join(f"{n}x {e}" for e, n in Counter(errors).items()) or "-"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


# part 2: hooks


# (path on a live QuicConnection, side it is checked on, what quic_relay/connection.py uses it for)
HOOKS: list[tuple[str, str, str]] = [
    ("_initialize", "server", "overridden: set the client-certificate request flag once TLS exists"),
    ("tls._request_client_certificate", "server", "make the server send CertificateRequest"),
    ("tls._peer_certificate", "server", "client certificate, checked against the pinned fingerprint"),
    ("_streams[0].sender._buffer", "client", "stream_buffered(): pacing/backpressure on unsent+unacked"),
    ("_datagrams_pending", "client", "pending_datagrams(): DATAGRAM queue bound; shrink on black hole"),
    ("_write_stream_limits", "client", "overridden: fixed sliding receive window, frozen while paused"),
    ("_on_max_stream_data_delivery", "client", "MAX_STREAM_DATA frame delivery handler"),
    ("_streams[0].receiver.highest_offset", "client", "receive window position"),
    ("_streams[0].max_stream_data_local", "client", "receive window limit"),
    ("_streams[0].max_stream_data_local_sent", "client", "receive window limit sent"),
    ("_host_cids[0].stateless_reset_token", "server", "stateless reset tokens from a restart-proof key"),
    ("_host_cids[0].was_sent", "server", "only re-key connection ids not yet announced"),
    ("_replenish_connection_ids", "server", "overridden: tokens for new connection ids"),
    ("_peer_cid.stateless_reset_token", "client", "recognize the server's stateless reset"),
    ("_peer_cid_available", "client", "recognize the server's stateless reset (other cids)"),
    ("_close_event", "client", "reset_by_peer(): end the connection on a stateless reset"),
    ("_close_begin", "client", "reset_by_peer(): enter draining"),
    ("_network_paths[0].addr", "client", "peer address, for the route MTU"),
    ("_max_datagram_size", "client", "packet size in use; raised by path MTU discovery"),
    ("_handshake_confirmed", "client", "MTU probes only after confirmation"),
    ("_state", "client", "MTU probes only while not closing"),
    ("_loss._pto_count", "client", "black-hole detection (two PTOs in a row)"),
    ("_loss._on_packets_lost", "client", "wrapped: count lost large packets; requeue stranded data"),
    ("_loss._cc.on_packet_acked", "client", "wrapped: note acknowledged large packets"),
    ("_loss._cc._max_datagram_size", "client", "congestion controller follows the packet size"),
    ("_loss._pacer.update_rate", "client", "wrapped: burst allowance covering the loop's 1 ms timers"),
    ("_loss._pacer.bucket_max", "client", "pacer burst allowance"),
    ("_loss._pacer._max_datagram_size", "client", "pacer follows the packet size"),
    ("_loss.on_packet_sent", "client", "register an MTU probe as sent (not in flight)"),
    ("_spaces[ONE_RTT].sent_packets", "client", "stranded large packets on a black hole"),
    ("_spaces[ONE_RTT].ack_at", "client", "acknowledge_now(): one ACK per received batch"),
    ("_cryptos[ONE_RTT].send", "client", "MTU probe: 1-RTT keys ready"),
    ("_version", "client", "MTU probe packet builder"),
    ("host_cid", "client", "MTU probe packet builder"),
    ("_is_client", "client", "MTU probe packet builder"),
    ("_packet_number", "client", "MTU probe packet builder"),
    ("_peer_cid.cid", "client", "MTU probe packet builder"),
    ("_quic_logger", "client", "MTU probe packet builder"),
    ("_spin_bit", "client", "MTU probe packet builder"),
    ("_configuration", "client", "base packet size"),
    ("datagrams_to_send", "client", "overridden (public): append MTU probes"),
    ("handle_timer", "client", "overridden (public): black-hole check after timers"),
]
# module-level names connection.py imports besides QuicConnection and QuicConfiguration
MODULE_NAMES: list[tuple[str, str]] = [
    ("quic.connection", "END_STATES"),
    ("quic.connection", "MAX_STREAM_DATA_FRAME_CAPACITY"),
    ("quic.connection", "NetworkAddress"),
    ("quic.packet", "QuicErrorCode"),
    ("quic.packet", "QuicFrameType"),
    ("quic.packet", "QuicPacketType"),
    ("quic.packet_builder", "QuicPacketBuilder"),
    ("quic.packet_builder", "QuicDeliveryState"),
    ("quic.recovery", "QuicPacketSpace"),
    ("quic.stream", "QuicStream"),
]
# the TLS server side of mutual TLS (RFC 8446 §4.3.2, §4.4.2): sending a CertificateRequest, and
# states in which the server reads the client's Certificate and CertificateVerify
TLS_SERVER_NAMES: list[tuple[str, str]] = [
    ("tls", "push_certificate_request"),
    ("tls", "State.SERVER_EXPECT_CERTIFICATE"),
    ("tls", "State.SERVER_EXPECT_CERTIFICATE_VERIFY"),
]
# qh3 public calls that could stand in for some hooks
QH3_PUBLIC = [
    "get_peercert",
    "get_send_buffer_size",
    "receive_many_datagrams",
    "receive_gro_buffer",
    "should_wait_for_ack",
]


def resolve(engine: Engine, obj: Any, path: str) -> tuple[bool, str]:
    """Follows `a.b[key].c` on `obj`; (found, type of the value or where it stopped)."""
    for part in path.split("."):
        name, _, index = part.partition("[")
        if not hasattr(obj, name):
            return False, f"no {name!r} on {type(obj).__name__}"
        obj = getattr(obj, name)
        if index:
            key_text = index.rstrip("]")
            key: Any = int(key_text) if key_text.isdigit() else getattr(engine.tls.Epoch, key_text)
            try:
                obj = obj[key]
            except (KeyError, IndexError, TypeError) as exc:
                return False, f"{name}[{key_text}]: {type(exc).__name__}"
    return True, type(obj).__name__


def handshake_in_memory(engine: Engine, ids: dict[str, Identity]) -> tuple[Any, Any]:
    """A client and a server QuicConnection that completed a handshake by handing datagrams over
    directly, with stream 0 opened by the client: live objects to look for attributes on."""
    client = engine.connection(
        configuration=configuration(
            engine, is_client=True, own=ids["p256-pinned"], peer_pem=ids["server"].pem
        )
    )
    server = engine.connection(
        configuration=configuration(engine, is_client=False, own=ids["server"], peer_pem=None),
        original_destination_connection_id=os.urandom(8),
    )
    client_addr, server_addr = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
    now = time.monotonic()
    client.connect(server_addr, now=now)
    for _ in range(20):
        now += 0.001
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, client_addr, now=now)
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, server_addr, now=now)
    client.send_stream_data(0, b"x")
    now += 0.001
    for data, _addr in client.datagrams_to_send(now=now):
        server.receive_datagram(data, client_addr, now=now)
    return client, server


@dataclass
class HookRow:
    hook: str
    side: str
    purpose: str
    module: str | None = None  # for module-level names: the engine's module they are looked up in
    found: dict[str, str] = field(default_factory=dict)


def check_hooks(engines: list[Engine], ids: dict[str, Identity]) -> list[HookRow]:
    rows = [HookRow(path, side, purpose) for path, side, purpose in HOOKS]
    rows += [HookRow(name, "module", "imported by connection.py", module)
             for module, name in MODULE_NAMES]  # fmt: skip
    rows += [HookRow(name, "module", "TLS server side of client authentication", module)
             for module, name in TLS_SERVER_NAMES]  # fmt: skip
    rows += [HookRow(name, "client", "qh3 public call") for name in QH3_PUBLIC]
    for engine in engines:
        try:
            live = dict(zip(("client", "server"), handshake_in_memory(engine, ids), strict=True))
        except Exception as exc:
            for row in rows:
                row.found[engine.name] = f"no live connection: {exc}"
            continue
        for row in rows:
            if row.module is not None:
                try:
                    module = importlib.import_module(f"{engine.name}.{row.module}")
                except ImportError:
                    row.found[engine.name] = f"no module {engine.name}.{row.module}"
                    continue
                found, detail = resolve(engine, module, row.hook)
                row.found[engine.name] = "yes" if found else f"no ({detail})"
                continue
            found, detail = resolve(engine, live[row.side], row.hook)
            row.found[engine.name] = "yes" if found else f"no ({detail})"
    return rows


def print_hooks(rows: list[HookRow], engines: list[Engine]) -> None:
    print("\n## aioquic internals used by quic_relay/connection.py, looked up on each engine\n")
    names = [e.name for e in engines]
    print("| attribute | side | used for | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for row in rows:
        name = row.hook if row.module is None else f"{row.module}.{row.hook}"
        print(f"| `{name}` | {row.side} | {row.purpose} | "
              + " | ".join(row.found.get(n, "-") for n in names) + " |")  # fmt: skip
    print()
    for engine_name in names:
        for kind in dict.fromkeys(map(_kind, rows)):
            group = [r for r in rows if _kind(r) == kind]
            present = sum(r.found.get(engine_name) == "yes" for r in group)
            print(f"{engine_name}: {present} of {len(group)} present: {kind}")


def _kind(row: HookRow) -> str:
    if row.module is not None or row.purpose == "qh3 public call":
        return row.purpose
    return "QuicConnection internals used by connection.py"


# part 3: throughput


@dataclass
class Run:
    engine: str
    size: int
    round: int
    seconds: float
    mbits: float
    cpu_per_gb: float
    client_cpu: float
    server_cpu: float
    kernel_share: float  # of both processes' CPU time, the part spent in the kernel (stime)
    largest_datagram: int


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far: utime and stime of /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / HZ, int(fields[12]) / HZ


def read_line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{what} did not answer within {timeout} s (exit {process.poll()})")
    return line.strip()


def query_server(server: subprocess.Popen[str]) -> tuple[int, int]:
    """(bytes received, largest datagram seen) from the sink."""
    assert server.stdin is not None
    server.stdin.write("\n")
    server.stdin.flush()
    received, largest = read_line(server, 5, "server").split()
    return int(received), int(largest)


@contextlib.contextmanager
def started(command: list[str], log: Path) -> Iterator[subprocess.Popen[str]]:
    with open(log, "a") as errors:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measure(engine: str, size: int, round_: int, seconds: float, warmup: float, work: Path) -> Run:
    port = free_udp_port()
    common = ["--engine", engine, "--port", str(port), "--size", str(size), "--dir", str(work)]
    script = [sys.executable, str(Path(__file__).resolve())]
    log = work / "processes.log"
    with started([*script, "_server", *common], log) as server:
        read_line(server, 20, f"{engine} server")  # "ready"
        client_cmd = [*script, "_client", *common, "--duration", str(warmup + seconds + 30)]
        with started(client_cmd, log) as client:
            read_line(client, 20, f"{engine} client")  # "connected"
            time.sleep(warmup)
            b0, _ = query_server(server)
            c0, s0, t0 = cpu_times(client.pid), cpu_times(server.pid), time.monotonic()
            time.sleep(seconds)
            b1, largest = query_server(server)
            c1, s1, t1 = cpu_times(client.pid), cpu_times(server.pid), time.monotonic()
            if client.poll() is not None:
                raise RuntimeError(f"{engine} client exited early ({client.returncode}); see {log}")
    moved = b1 - b0
    client_cpu, server_cpu = sum(c1) - sum(c0), sum(s1) - sum(s0)
    used = client_cpu + server_cpu
    kernel = (c1[1] - c0[1]) + (s1[1] - s0[1])
    return Run(
        engine=engine,
        size=size,
        round=round_,
        seconds=t1 - t0,
        mbits=moved * 8 / (t1 - t0) / 1e6,
        cpu_per_gb=used / (moved / 1e9) if moved else float("inf"),
        client_cpu=client_cpu,
        server_cpu=server_cpu,
        kernel_share=kernel / used if used else 0.0,
        largest_datagram=largest,
    )


def bench(engines: list[Engine], sizes: list[int], rounds: int, seconds: float, work: Path) -> list[Run]:
    runs = []
    names = [e.name for e in engines]
    for round_ in range(1, rounds + 1):
        order = names[round_ - 1 :] + names[: round_ - 1]  # who goes first rotates
        for size in sizes:
            for name in order:
                try:
                    run = measure(name, size, round_, seconds, 1.0, work)
                except RuntimeError as exc:
                    print(f"round {round_} {name} {size}: FAILED: {exc}", flush=True)
                    continue
                print(
                    f"round {round_} {name:8} {size:5} B: {run.mbits:8.0f} Mbit/s "
                    f"{run.cpu_per_gb:7.2f} CPU s/GB "
                    f"(client {run.client_cpu:.2f} s, server {run.server_cpu:.2f} s, "
                    f"{run.kernel_share:.0%} in the kernel, "
                    f"largest datagram {run.largest_datagram})",
                    flush=True,
                )
                runs.append(run)
    return runs


def print_bench(runs: list[Run], engines: list[Engine], sizes: list[int]) -> None:
    print("\n## Bulk throughput, one stream, 127.0.0.1, separate processes (median of rounds, min-max)\n")
    print("| engine | packet size | Mbit/s | CPU s per GB | in the kernel | runs | largest datagram seen |")
    print("|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], tuple[float, float]] = {}
    for size in sizes:
        for engine in engines:
            these = [r for r in runs if r.engine == engine.name and r.size == size]
            if not these:
                continue
            mb = [r.mbits for r in these]
            cpu = [r.cpu_per_gb for r in these]
            medians[engine.name, size] = (statistics.median(mb), statistics.median(cpu))
            print(
                f"| {engine.name} {engine.version} | {size} | {statistics.median(mb):.0f} "
                f"({min(mb):.0f}-{max(mb):.0f}) | {statistics.median(cpu):.2f} "
                f"({min(cpu):.2f}-{max(cpu):.2f}) | {statistics.median(r.kernel_share for r in these):.0%} "
                f"| {len(these)} | {max(r.largest_datagram for r in these)} |"
            )
    print()
    for size in sizes:
        if ("aioquic", size) in medians and ("qh3", size) in medians:
            a, q = medians["aioquic", size], medians["qh3", size]
            print(
                f"{size} B: qh3 moves {q[0] / a[0]:.1f}x aioquic's Mbit/s "
                f"at {q[1] / a[1]:.2f}x its CPU per GB"
            )
    base = ("aioquic", min(sizes))
    if base in medians:
        for (name, size), (mbits, _cpu) in sorted(medians.items()):
            print(f"{name} at {size} B: {mbits / medians[base][0]:.1f}x aioquic at {base[1]} B")


# subprocess roles


async def serve_sink(engine: Engine, port: int, size: int, work: Path) -> None:
    ids = {n: _identity_from(work, n) for n in ("server", "p256-pinned")}
    received, largest = [0], [0]
    tasks: set[asyncio.Task[None]] = set()
    base = engine.protocol

    class Sink(base):  # type: ignore[valid-type,misc]
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if len(data) > largest[0]:
                largest[0] = len(data)
            super().datagram_received(data, addr)

    if hasattr(base, "datagrams_received"):  # qh3's transport hands over batches

        def datagrams_received(self: Any, data: list[bytes], addr: Any) -> None:
            top = max(map(len, data), default=0)
            if top > largest[0]:
                largest[0] = top
            base.datagrams_received(self, data, addr)

        Sink.datagrams_received = datagrams_received

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def discard() -> None:
            while chunk := await reader.read(1 << 20):
                received[0] += len(chunk)

        task = asyncio.ensure_future(discard())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    config = configuration(
        engine, is_client=False, own=ids["server"], peer_pem=ids["p256-pinned"].pem, size=size
    )
    await engine.serve(
        "127.0.0.1", port, configuration=config, create_protocol=Sink, stream_handler=on_stream
    )
    loop = asyncio.get_running_loop()

    def answer() -> None:  # one line on stdin: report the counters
        if not sys.stdin.readline():
            loop.stop()
            return
        print(received[0], largest[0], flush=True)

    loop.add_reader(sys.stdin.fileno(), answer)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def run_source(engine: Engine, port: int, size: int, work: Path, duration: float) -> None:
    ids = {n: _identity_from(work, n) for n in ("server", "p256-pinned")}
    base = engine.protocol

    class Source(base):  # type: ignore[valid-type,misc]
        """Wakes the writer after every received datagram (ACKs free the send queue)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.wake = asyncio.Event()

        def datagram_received(self, data: bytes, addr: Any) -> None:
            super().datagram_received(data, addr)
            self.wake.set()

    if hasattr(base, "datagrams_received"):

        def datagrams_received(self: Any, data: list[bytes], addr: Any) -> None:
            base.datagrams_received(self, data, addr)
            self.wake.set()

        Source.datagrams_received = datagrams_received

    config = configuration(
        engine, is_client=True, own=ids["p256-pinned"], peer_pem=ids["server"].pem, size=size
    )
    async with engine.connect("127.0.0.1", port, configuration=config, create_protocol=Source) as protocol:
        _reader, writer = await protocol.create_stream()
        stream_id = writer.get_extra_info("stream_id")
        quic = protocol._quic
        chunk = bytes(CHUNK)
        print("connected", flush=True)
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            writer.write(chunk)
            while unsent_bytes(engine, quic, stream_id) > HIGH_WATER:
                protocol.wake.clear()
                await protocol.wake.wait()


def _identity_from(work: Path, name: str) -> Identity:
    cert, key = work / f"{name}.crt", work / f"{name}.key"
    pem = cert.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return Identity(name, cert, key, pem, hashlib.sha256(der).hexdigest())


# main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", nargs="?", default="eval", choices=["eval", "_server", "_client"],
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--only", choices=["tls", "hooks", "bench"], action="append",
                        help="run only these parts (repeatable); default all")  # fmt: skip
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--sizes", default="1452,8952", help="max_datagram_size values, both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "_server":
        with contextlib.suppress(KeyboardInterrupt, RuntimeError):
            asyncio.run(serve_sink(load_engine(args.engine), args.port, args.size, args.dir))
        return 0
    if args.role == "_client":
        asyncio.run(run_source(load_engine(args.engine), args.port, args.size, args.dir, args.duration))
        return 0

    engines = available_engines([n for n in args.engines.split(",") if n])
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.only or ["tls", "hooks", "bench"]
    print(f"# qh3_eval {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          + ", ".join(f"{e.name} {e.version}" for e in engines))  # fmt: skip
    print(f"# {' '.join(sys.argv)}")
    results: dict[str, Any] = {"engines": {e.name: e.version for e in engines}}
    with tempfile.TemporaryDirectory(prefix="qh3-eval-") as tmp:
        work = Path(tmp)
        ids = make_identities(work)
        if "tls" in parts:
            cases = asyncio.run(check_tls(engines, ids))
            print_tls(cases)
            results["tls"] = [dict(asdict(c), holds=c.holds) for c in cases]
        if "hooks" in parts:
            rows = check_hooks(engines, ids)
            print_hooks(rows, engines)
            results["hooks"] = [asdict(r) for r in rows]
        if "bench" in parts:
            print(
                f"\n## Throughput runs: {args.rounds} rounds x {args.seconds} s, sizes {sizes}\n", flush=True
            )
            runs = bench(engines, sizes, args.rounds, args.seconds, work)
            print_bench(runs, engines, sizes)
            results["bench"] = [asdict(r) for r in runs]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
