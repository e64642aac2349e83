"""The SciStream 1.2.1 Control service (`scistream.Control`): thin handlers over LegacyCoordinator.

Calls are authenticated like our own Control service (`authorization` metadata, a bare token as
1.2.1 sends it, `INVALID_TOKEN` meaning none); errors map to gRPC status codes the same way.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
from pathlib import Path

import structlog
from grpclib.events import RecvRequest

from appliance.api import scistream as legacy_api
from appliance.control.services import current_principal, grpc_errors
from appliance.control.tls import ca_context, fetch_certificate
from appliance.sessions.legacy import LegacyCoordinator
from appliance.sessions.model import Address

log = structlog.get_logger(__name__)

LEGACY_SERVICE = "/scistream.Control/"
_client: contextvars.ContextVar[str] = contextvars.ContextVar("legacy_client", default="")


async def remember_client(event: RecvRequest) -> None:
    """A RecvRequest listener: the IP address of a 1.2.1 call's client, for the coordinator's
    per-client bound (IPv4 clients of a dual-stack listener come as ::ffff:a.b.c.d)."""
    if event.method_name.startswith(LEGACY_SERVICE):
        _client.set(client_host(event.peer.addr()))


def client_host(peername: object) -> str:
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return ""
    try:
        address = ipaddress.ip_address(peername[0].split("%", 1)[0])
    except ValueError:
        return peername[0]
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class LegacyControlService(legacy_api.ControlBase):
    def __init__(self, coordinator: LegacyCoordinator) -> None:
        self._coordinator = coordinator

    @grpc_errors
    async def req(self, request: legacy_api.Request) -> legacy_api.Response:
        listeners, prod_listeners = await self._coordinator.request(
            current_principal(), request.uid, request.role, request.num_conn, _client.get()
        )
        return legacy_api.Response(listeners=listeners, prod_listeners=prod_listeners)

    @grpc_errors
    async def hello(self, hello: legacy_api.Hello) -> legacy_api.AppResponse:
        message = self._coordinator.hello(
            current_principal(), hello.uid, list(hello.prod_listeners), _client.get()
        )
        return legacy_api.AppResponse(message=message)

    @grpc_errors
    async def update(self, update_targets: legacy_api.UpdateTargets) -> legacy_api.Response:
        listeners, prod_listeners = await self._coordinator.update(
            current_principal(), update_targets.uid, list(update_targets.remote_listeners)
        )
        return legacy_api.Response(listeners=listeners, prod_listeners=prod_listeners)

    @grpc_errors
    async def release(self, release: legacy_api.Release) -> legacy_api.Response:
        await self._coordinator.release(current_principal(), release.uid)
        return legacy_api.Response()


async def pin_peer_certificate(
    address: Address, *, ca_file: Path | None, insecure: bool, timeout: float = 10.0
) -> str:
    """The SHA-256 pin of a producer appliance's control certificate ("" = plaintext control channel).

    With `ca_file` the certificate must verify against it (hostname included). Without one it is
    accepted on first use, as SciStream 1.2.1 accepts its peers, and a warning says so; the session
    then pins it for every later call (Join, Leave).
    """
    if insecure:
        return ""
    verify = ca_context(ca_file) if ca_file is not None else None
    der = await fetch_certificate(address.host, address.port, timeout, verify)
    if verify is None:
        log.warning(
            "accepting the producer appliance's control certificate on first use; "
            "set legacy_peer_ca (s2cs --peer_cert) to verify it",
            peer=str(address),
        )
    return hashlib.sha256(der).hexdigest()
