"""SciStream 1.2.1 as its users run it, rebuilt for tests from its published behaviour.

The original is not installable here, so this module re-creates, with grpcio as the original uses,
what matters on the wire (written from reading scistream-proto 1.2.1, not copied from it):

- `client`: 1.2.1's `s2uc`. `req` runs in a thread; 0.5 s later `hello` (role always "PROD", the
  app's `remote_ip:port` list); the req's answer must come within 5 s; then `update`. Metadata is
  `authorization: INVALID_TOKEN` when there is no token, else the bare Globus access token (no
  "Bearer " prefix). It prints 1.2.1's lines (the uid line and
  `Listeners: [...]`); unlike 1.2.1 it exits 1 on an error, so tests can tell.
- `StandIn`: 1.2.1's `s2cs` as a client sees it. `req` registers its uid only once it is processed
  (`register_delay` stands for what runs first, e.g. 1.2.1's Globus token check) and waits up to 180 s
  for the hello; `hello`, `update` and `release` of a uid that is not registered fail with grpcio's
  UNKNOWN and 1.2.1's message `<call> request invalid, entry not found for uid '<uid>'`.

Run `python tests/legacy121.py inbound_request|outbound_request|release ...` for the client.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from appliance.api import scistream as legacy

SERVICE = "scistream.Control"
NO_TOKEN = "INVALID_TOKEN"  # what 1.2.1's s2uc sends without a Globus login


# ---- the client (1.2.1's s2uc) -----------------------------------------------------------------


class Client:
    """Unary calls of `scistream.Control` over a grpcio channel, with 1.2.1's metadata."""

    def __init__(self, s2cs: str, server_cert: Path | None, token: str | None = None) -> None:
        if server_cert is None:
            self.channel = grpc.insecure_channel(s2cs)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=server_cert.read_bytes())
            self.channel = grpc.secure_channel(s2cs, creds)
        self.metadata = (("authorization", token or NO_TOKEN),)

    def _call(self, method: str, request: Any, reply: type[Any]) -> Any:
        stub = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=bytes,
            response_deserializer=lambda data: reply().parse(data),
        )
        return stub(request, metadata=self.metadata)

    def req(self, uid: str, role: str, num_conn: int, rate: int) -> legacy.Response:
        request = legacy.Request(uid=uid, role=role, num_conn=num_conn, rate=rate)
        result: legacy.Response = self._call("req", request, legacy.Response)
        return result

    def hello(self, uid: str, listeners: list[str]) -> legacy.AppResponse:
        result: legacy.AppResponse = self._call(
            "hello", legacy.Hello(uid=uid, prod_listeners=listeners, role="PROD"), legacy.AppResponse
        )
        return result

    def update(self, uid: str, remote_listeners: list[str], role: str) -> legacy.Response:
        request = legacy.UpdateTargets(uid=uid, remote_listeners=remote_listeners, role=role)
        result: legacy.Response = self._call("update", request, legacy.Response)
        return result

    def release(self, uid: str) -> None:
        self._call("release", legacy.Release(uid=uid), legacy.Response)

    def close(self) -> None:
        self.channel.close()


def request_and_hello(
    client: Client, uid: str, role: str, num_conn: int, rate: int, receivers: list[str]
) -> legacy.Response:
    """1.2.1's sequence: req in a thread, hello 0.5 s later, the req's answer within 5 s."""
    with futures.ThreadPoolExecutor(max_workers=3) as pool:
        answer = pool.submit(client.req, uid, role, num_conn, rate)
        time.sleep(0.5)
        hello = pool.submit(client.hello, uid, receivers)
        response = answer.result(timeout=5)
        hello.result(timeout=5)
    return response


def inbound_request(
    s2cs: str,
    cert: Path | None,
    uid: str,
    remote_ip: str,
    receiver_ports: str,
    num_conn: int = 5,
    token: str | None = None,
) -> list[str]:
    """`s2uc inbound_request`: the producer appliance's listeners (`token`: a Globus login's)."""
    client = Client(s2cs, cert, token)
    try:
        receivers = [f"{remote_ip}:{port}" for port in receiver_ports.split(",")]
        answer = request_and_hello(client, uid, "PROD", num_conn, 10000, receivers)
        client.update(uid, list(answer.prod_listeners), "PROD")
        return list(answer.listeners)
    finally:
        client.close()


def outbound_request(
    s2cs: str,
    cert: Path | None,
    uid: str,
    prod_lstn: str,
    remote_ip: str,
    receiver_ports: str,
    num_conn: int = 5,
) -> list[str]:
    """`s2uc outbound_request UID PROD_LSTN`: the consumer appliance's listeners (entry points)."""
    client = Client(s2cs, cert)
    try:
        receivers = [f"{remote_ip}:{port}" for port in receiver_ports.split(",")]
        answer = request_and_hello(client, uid, "CONS", num_conn, 10000, receivers)
        client.update(uid, prod_lstn.split(","), "CONS")
        return list(answer.listeners)
    finally:
        client.close()


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="s2uc (1.2.1 stand-in)")
    parser.add_argument("command", choices=["inbound_request", "outbound_request", "release"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--s2cs", default="localhost:5000")
    parser.add_argument("--server_cert", default="server.crt")
    parser.add_argument("--remote_ip", default="localhost")
    parser.add_argument("--receiver_ports", default="5074,5075,5076,37000,47000")
    parser.add_argument("--num_conn", type=int, default=5)
    parser.add_argument("--uid", help="The uid (1.2.1 makes a uuid1).")
    options = parser.parse_intermixed_args(argv)
    cert = Path(options.server_cert)
    try:
        if options.command == "release":
            client = Client(options.s2cs, cert)
            client.release(options.args[0])
            client.close()
            print("Release completed")
            return 0
        role = "PROD" if options.command == "inbound_request" else "CONS"
        uid = options.uid or (options.args[0] if options.args else str(__import__("uuid").uuid1()))
        print("uid; s2cs; access_token; role")
        print(f"{uid} {options.s2cs} {NO_TOKEN} {role}")
        if role == "PROD":
            found = inbound_request(
                options.s2cs, cert, uid, options.remote_ip, options.receiver_ports, options.num_conn
            )
        else:
            found = outbound_request(
                options.s2cs,
                cert,
                uid,
                options.args[1],
                options.remote_ip,
                options.receiver_ports,
                options.num_conn,
            )
    except (grpc.RpcError, futures.TimeoutError) as exc:
        details = exc.details() if isinstance(exc, grpc.RpcError) else "timed out"  # type: ignore[attr-defined]
        print(f"Error: {details}", file=sys.stderr)
        return 1
    print(f"Listeners: {found}")
    return 0


# ---- the stand-in server (1.2.1's s2cs) ---------------------------------------------------------


@dataclass
class _Entry:
    listeners: list[str]
    hello: threading.Event = field(default_factory=threading.Event)
    prod_listeners: list[str] = field(default_factory=list)


class NotRegistered(Exception):
    """1.2.1's answer for a call about a uid its req has not registered (grpcio: UNKNOWN)."""


class StandIn:
    """1.2.1's s2cs behaviour, on 127.0.0.1 (TLS with `cert`/`key` PEM, else plaintext)."""

    def __init__(
        self, listener_ip: str = "127.0.0.1", *, register_delay: float = 0.0, first_port: int = 5100
    ) -> None:
        self.listener_ip = listener_ip
        self.register_delay = register_delay
        self.first_port = first_port
        self.entries: dict[str, _Entry] = {}
        self.events: list[str] = []  # "req registered u", "hello refused u", "hello u", ...
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()

    def start(self, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> int:
        handlers = {
            "req": self._handler(self._req, legacy.Request),
            "hello": self._handler(self._hello, legacy.Hello),
            "update": self._handler(self._update, legacy.UpdateTargets),
            "release": self._handler(self._release, legacy.Release),
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if cert_pem is not None and key_pem is not None:
            creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
            port = server.add_secure_port("127.0.0.1:0", creds)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return port

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            for entry in self.entries.values():
                entry.hello.set()
            self._server.stop(grace=None)

    @staticmethod
    def _handler(method: Callable[[Any], Any], request: type[Any]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            lambda message, _context: method(message),
            request_deserializer=lambda data: request().parse(data),
            response_serializer=bytes,
        )

    def _note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def _entry(self, call: str, uid: str) -> _Entry:
        entry = self.entries.get(uid)
        if entry is None:
            self._note(f"{call} refused {uid}")
            raise NotRegistered(f"{call} request invalid, entry not found for uid '{uid}'")
        return entry

    def _req(self, request: legacy.Request) -> legacy.Response:
        if self._stopping.wait(self.register_delay):
            raise NotRegistered("the server is stopping")
        with self._lock:
            if request.uid in self.entries:
                raise NotRegistered("Entry already found for uid")
            first = self.first_port + 10 * len(self.entries)
            ports = range(first, first + max(request.num_conn, 1))
            entry = _Entry([f"{self.listener_ip}:{p}" for p in ports])
            self.entries[request.uid] = entry
            self.events.append(f"req registered {request.uid}")
        if not entry.hello.wait(180):
            raise NotRegistered("Hello not received within the timeout period")
        return legacy.Response(listeners=entry.listeners, prod_listeners=entry.prod_listeners)

    def _hello(self, hello: legacy.Hello) -> legacy.AppResponse:
        entry = self._entry("hello", hello.uid)
        entry.prod_listeners = list(hello.prod_listeners)
        self._note(f"hello {hello.uid}")
        entry.hello.set()
        return legacy.AppResponse(message="Sending Prod listeners...")

    def _update(self, update: legacy.UpdateTargets) -> legacy.Response:
        entry = self._entry("update", update.uid)
        self._note(f"update {update.uid}")
        return legacy.Response(listeners=entry.listeners, prod_listeners=list(update.remote_listeners))

    def _release(self, release: legacy.Release) -> legacy.Response:
        self._entry("release", release.uid)
        with self._lock:
            self.entries.pop(release.uid, None)
        self._note(f"release {release.uid}")
        return legacy.Response()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
