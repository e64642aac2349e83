"""`s2cs` and `s2uc`: SciStream 1.2.1's command lines, served by this appliance.

`s2cs` runs an appliance with 1.2.1's options; `s2uc inbound-request / outbound-request / release`
drive the `scistream.Control` service the way 1.2.1's s2uc does, and print the lines 1.2.1 scripts
parse (the uid line, `Listeners: [...]`). Differences: the uid is random (uuid4, not uuid1), hello
follows req without 1.2.1's 0.5 s sleep (and is sent again while a 1.2.1 s2cs has not registered the
req yet), errors exit non-zero, and a token is never printed (the token column shows `NO_AUTH` or
`REDACTED`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from grpclib.client import Channel

from appliance.api import scistream as legacy_api
from appliance.auth.introspection_rules import GLOBUS_INTROSPECTION_ENDPOINT
from appliance.control.channel import Trust, call, open_channel
from appliance.errors import ApplianceError, InvalidArgument

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"  # 1.2.1's fixed uid for `--mock True`
# 1.2.1's s2cs Globus Auth: its default client id, and the scope its tokens must carry.
LEGACY_CLIENT_ID = "c42c0dac-0a52-408e-a04f-5d31bfe0aef8"
LEGACY_SCOPE = "https://auth.globus.org/scopes/{client_id}/scistream"
SECRET_VARIABLE = "SCISTREAM_INTROSPECTION_CLIENT_SECRET"  # the secret without a flag or a file
DEFAULT_RECEIVER_PORTS = "5074,5075,5076,37000,47000"  # 1.2.1's default destinations
# 1.2.1's data-server types; all of them mean our (encrypted) default data plane here.
LEGACY_TYPES = ("haproxy", "nginx", "stunnel", "stunnelsubprocess", "haproxysubprocess", "s2ds")
MODES = ("quic", "wireguard", "tls", "auto")
# 1.2.1's s2cs answer to a hello (or update) whose req it has not registered yet.
NOT_REGISTERED = "entry not found for uid"
HELLO_RETRY_FIRST, HELLO_RETRY_MAX = 0.05, 1.0  # seconds between hellos, doubling
HELLO_PATIENCE = 30.0  # seconds to keep sending hello while 1.2.1's s2cs has not registered the req


class _Commands(click.Group):
    """Accepts 1.2.1's underscore spellings (`inbound_request`) for our hyphenated commands."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name.replace("_", "-"))


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ApplianceError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        sys.exit(130)
    raise AssertionError("unreachable")


# ---- s2cs ------------------------------------------------------------------------------------


def server_flags(
    *,
    listener_ip: str,
    port: int,
    port_range: str | None,
    server_type: str,
    mode: str | None,
    server_crt: Path | None,
    server_key: Path | None,
    client_secret: str,
    auth: str | None,
    ssl: bool,
    verbose: bool,
    advertise: str | None,
    state_dir: Path | None,
    client_id: str = LEGACY_CLIENT_ID,
    client_secret_file: Path | None = None,
) -> dict[str, Any]:
    """Settings flags (as `load_settings` takes them) for 1.2.1's s2cs options.

    As 1.2.1 does, s2cs listens on every address and hands out `listener_ip` (in listeners and its
    certificate); its state directory is one per control port, so that two s2cs on one host (1.2.1's
    quickstart) never share one. A client secret means 1.2.1's Globus Auth: `--auth introspection`
    (see `globus_flags`).
    """
    from appliance.config import DEFAULT_STATE_DIR, WILDCARDS  # here: s2uc needs none of the settings

    if mode is None:
        kind = server_type.lower()
        if kind not in MODES and kind not in LEGACY_TYPES:
            raise InvalidArgument(
                f"unknown --type {server_type!r} (1.2.1 types, or one of {', '.join(MODES)})"
            )
        mode = kind if kind in MODES else None  # 1.2.1's proxies: the legacy_mode setting (tls)
    if state_dir is None and "SCISTREAM_STATE_DIR" not in os.environ:
        state_dir = DEFAULT_STATE_DIR / f"s2cs-{port}"
    if advertise is None and listener_ip not in WILDCARDS:
        advertise = listener_ip
    if auth is None:
        # 1.2.1 without --client_secret checks no token; with it, Globus Auth checks every token.
        secret_given = client_secret or client_secret_file or SECRET_VARIABLE in os.environ
        auth = "introspection" if secret_given else "none"
    cert, key = server_crt, server_key
    if cert is None and key is None and Path("server.crt").is_file() and Path("server.key").is_file():
        cert, key = Path("server.crt"), Path("server.key")  # 1.2.1's defaults, when they exist
    return {
        "listen": f"[::]:{port}",
        "advertise": advertise,
        "state_dir": state_dir,
        "port_range": port_range,
        "legacy_mode": mode,
        "tls_cert": cert,
        "tls_key": key,
        "auth": auth,
        "insecure": True if not ssl else None,
        "log_level": "debug" if verbose else None,
        **(globus_flags(client_id, client_secret, client_secret_file) if auth == "introspection" else {}),
    }


def globus_flags(client_id: str, client_secret: str, client_secret_file: Path | None) -> dict[str, Any]:
    """`--auth introspection` settings for 1.2.1's Globus Auth options, as its s2cs checks tokens:
    at Globus Auth's introspection endpoint, with the scope `LEGACY_SCOPE` of `client_id`, and the
    client id as the audience. SCISTREAM_INTROSPECTION_* variables still override the endpoint and
    scope (a facility whose authorization server is not Globus)."""
    if not client_id:
        raise InvalidArgument("--client_id must not be empty")
    return {
        "introspection_client_id": client_id,
        "introspection_client_secret": client_secret or None,
        "introspection_client_secret_file": client_secret_file,
        "introspection_endpoint": _unless_in_environment("endpoint", GLOBUS_INTROSPECTION_ENDPOINT),
        "introspection_scope": _unless_in_environment("scope", LEGACY_SCOPE.format(client_id=client_id)),
    }


def _unless_in_environment(setting: str, value: str) -> str | None:
    return None if f"SCISTREAM_INTROSPECTION_{setting.upper()}" in os.environ else value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--listener_ip",
    "--listener-ip",
    default="0.0.0.0",
    show_default=True,
    help="Address handed out in listeners and named by the certificate (s2cs listens on every address).",
)
@click.option("--port", type=int, default=5000, show_default=True, help="Control port.")
@click.option("--port_range", "--port-range", help="Data ports FIRST-LAST [5100-5200].")
@click.option("-t", "--type", "server_type", default="Haproxy", show_default=True, help="1.2.1 type or mode.")
@click.option("--mode", type=click.Choice(MODES), help="Data plane of 1.2.1 sessions [tls].")
@click.option("--server_crt", "--server-crt", type=click.Path(path_type=Path), help="Control certificate.")
@click.option("--server_key", "--server-key", type=click.Path(path_type=Path), help="Key of --server_crt.")
@click.option(
    "--client_id",
    "--client-id",
    default=LEGACY_CLIENT_ID,
    show_default=True,
    help="Globus Auth client id of this s2cs (with --client_secret).",
)
@click.option(
    "--client_secret",
    "--client-secret",
    default="",
    help="Globus Auth client secret: tokens are checked by introspection (visible in ps: prefer the file).",
)
@click.option(
    "--client-secret-file",
    type=click.Path(path_type=Path),
    help="0600 file holding the client secret (or SCISTREAM_INTROSPECTION_CLIENT_SECRET).",
)
@click.option(
    "--auth",
    type=click.Choice(["none", "tokens", "jwt", "introspection"]),
    help="User authentication [none; introspection with a client secret].",
)
@click.option("--introspection-endpoint", help="Introspection endpoint instead of Globus Auth's (RFC 7662).")
@click.option("--introspection-ca", type=click.Path(path_type=Path), help="CA file for that endpoint.")
@click.option("--tokens-file", type=click.Path(path_type=Path), help="YAML file of hashed tokens.")
@click.option("--advertise", help="Host peers and users reach this appliance at.")
@click.option(
    "--state-dir", type=click.Path(path_type=Path), help="State directory [/var/lib/scistream/s2cs-PORT]."
)
@click.option("--peer_cert", "--peer-cert", type=click.Path(path_type=Path), help="CA of peer appliances.")
@click.option("--hello_timeout", "--hello-timeout", type=float, help="Seconds a req waits for hello [180].")
@click.option("--peer_port", "--peer-port", type=int, help="Control port of producer appliances [5000].")
@click.option("--ssl", type=bool, default=True, help="False: plaintext control channel (development only).")
@click.option("-v", "--v", "--verbose", "verbose", is_flag=True, help="Debug logging.")
@click.option("--version", is_flag=True, help="Print the version and exit.")
def s2cs(
    listener_ip: str,
    port: int,
    port_range: str | None,
    server_type: str,
    mode: str | None,
    server_crt: Path | None,
    server_key: Path | None,
    client_id: str,
    client_secret: str,
    client_secret_file: Path | None,
    auth: str | None,
    introspection_endpoint: str | None,
    introspection_ca: Path | None,
    tokens_file: Path | None,
    advertise: str | None,
    state_dir: Path | None,
    peer_cert: Path | None,
    hello_timeout: float | None,
    peer_port: int | None,
    ssl: bool,
    verbose: bool,
    version: bool,
) -> None:
    """SciStream 1.2.1's control server command, running this appliance (1.2.1 and v1 APIs)."""
    from importlib.metadata import version as package_version

    from appliance.config import load_settings
    from appliance.control.server import serve
    from appliance.logging import configure_logging

    if version:
        click.echo(f"s2cs, version: {package_version('scistream')}")
        return
    try:
        flags = server_flags(
            listener_ip=listener_ip,
            port=port,
            port_range=port_range,
            server_type=server_type,
            mode=mode,
            server_crt=server_crt,
            server_key=server_key,
            client_secret=client_secret,
            auth=auth,
            ssl=ssl,
            verbose=verbose,
            advertise=advertise,
            state_dir=state_dir,
            client_id=client_id,
            client_secret_file=client_secret_file,
        )
        if introspection_endpoint is not None:
            flags["introspection_endpoint"] = introspection_endpoint
        settings = load_settings(
            **flags,
            introspection_ca=introspection_ca,
            tokens_file=tokens_file,
            legacy_peer_ca=peer_cert,
            legacy_hello_timeout=hello_timeout,
            legacy_peer_port=peer_port,
        )
    except ApplianceError as exc:
        _fail(exc.message, 2)
        return
    configure_logging(settings.log_format, settings.log_level)
    if client_secret:
        structlog.get_logger(__name__).warning(
            "--client_secret on the command line is visible to every user of this host; "
            "prefer --client-secret-file or SCISTREAM_INTROSPECTION_CLIENT_SECRET"
        )
    _run(serve(settings))


# ---- s2uc ------------------------------------------------------------------------------------


class _Client:
    """The legacy Control stub of one appliance, with the user's token as 1.2.1 sends it."""

    def __init__(self, channel: Channel, address: str, token: str | None, timeout: float) -> None:
        metadata = {"authorization": token} if token else None
        self.timeout = timeout
        self.stub = legacy_api.ControlStub(channel, timeout=timeout, metadata=metadata)
        self.what = f"appliance {address}"


async def _open(s2cs: str, server_cert: Path, insecure: bool, timeout: float) -> Channel:
    if not insecure and not server_cert.is_file():
        raise InvalidArgument(
            f"server certificate {server_cert} not found; pass --server_cert FILE "
            "(the appliance's STATE_DIR/tls/control.crt or its --server_crt)"
        )
    trust = Trust(ca_file=None if insecure else server_cert, insecure=insecure)
    return await call(open_channel(s2cs, trust, timeout), f"appliance {s2cs}")


def _print_uid_line(uid: str, s2cs: str, token: str | None, role: str) -> None:
    click.echo("uid; s2cs; access_token; role")
    click.echo(f"{uid} {s2cs} {'REDACTED' if token else 'NO_AUTH'} {role}")


async def _req_and_hello(
    client: _Client, uid: str, role: str, num_conn: int, rate: int, receivers: list[str]
) -> legacy_api.Response:
    """req, and hello once the appliance has registered the req; req's answer.

    Our appliance takes the two in either order, but SciStream 1.2.1's s2cs registers a uid only when
    it processes the req, and answers a hello that comes first with "hello request invalid, entry not
    found for uid": so hello follows req, and is sent again on that answer, with backoff, until the
    req has been registered (bounded by HELLO_PATIENCE and --timeout).
    """
    request = legacy_api.Request(uid=uid, role=role, num_conn=num_conn, rate=rate)
    hello = legacy_api.Hello(uid=uid, role="PROD", prod_listeners=receivers)
    async with asyncio.TaskGroup() as group:  # a failed hello cancels the waiting req, and back
        answer = group.create_task(call(client.stub.req(request), client.what))
        await asyncio.sleep(0)  # the req's stream opens first
        group.create_task(_hello_once_registered(client, hello, min(client.timeout, HELLO_PATIENCE)))
    return answer.result()


async def _hello_once_registered(client: _Client, hello: legacy_api.Hello, patience: float) -> None:
    loop = asyncio.get_running_loop()
    give_up, delay = loop.time() + patience, HELLO_RETRY_FIRST
    while True:
        try:
            await call(client.stub.hello(hello), client.what)
            return
        except ApplianceError as exc:
            if NOT_REGISTERED not in exc.message or loop.time() + delay > give_up:
                raise
        await asyncio.sleep(delay)
        delay = min(2 * delay, HELLO_RETRY_MAX)


def _receivers(remote_ip: str, receiver_ports: str | None) -> list[str]:
    if not receiver_ports:
        return []
    try:
        return [f"{remote_ip}:{int(p)}" for p in receiver_ports.split(",") if p.strip()]
    except ValueError:
        raise InvalidArgument(
            f"--receiver_ports {receiver_ports!r} is not a comma-separated port list"
        ) from None


def _first_error(exc: BaseExceptionGroup[Any]) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _legacy(coro: Coroutine[Any, Any, T]) -> T:
    """Runs an s2uc coroutine; errors from a TaskGroup surface as their first error."""

    async def unwrap() -> T:
        try:
            return await coro
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    return _run(unwrap())


def common_options(default_s2cs: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for option in reversed(
            [
                click.option("--s2cs", default=default_s2cs, show_default=True, help="Appliance HOST:PORT."),
                click.option(
                    "--server_cert",
                    "--server-cert",
                    type=click.Path(path_type=Path),
                    default=Path("server.crt"),
                    show_default=True,
                    help="Certificate (or CA) of the appliance.",
                ),
                click.option("--scope", default="", help="1.2.1 Globus scope; unused (see --token)."),
                click.option("--token", envvar="SCISTREAM_TOKEN", help="Bearer token (or SCISTREAM_TOKEN)."),
                click.option(
                    "--insecure", is_flag=True, help="Plaintext control channel (development only)."
                ),
                click.option(
                    "--timeout", type=float, default=200.0, show_default=True, help="Seconds per call."
                ),
            ]
        ):
            func = option(func)
        return func

    return decorate


def stream_options(default_receivers: str | None) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for option in reversed(
            [
                click.option("--num_conn", "--num-conn", type=int, default=5, show_default=True),
                click.option("--rate", type=int, default=10000, show_default=True, help="Accepted; unused."),
                click.option("--remote_ip", "--remote-ip", default="localhost", show_default=True),
                click.option(
                    "--receiver_ports",
                    "--receiver-ports",
                    default=default_receivers,
                    show_default=True,
                    help="Comma-separated ports of the app (producer side) or entry ports (consumer side).",
                ),
            ]
        ):
            func = option(func)
        return func

    return decorate


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scistream", prog_name="s2uc")
def s2uc() -> None:
    """SciStream 1.2.1's user client, for this appliance's `scistream.Control` service."""


@s2uc.command(name="inbound-request")
@common_options("localhost:5000")
@stream_options(DEFAULT_RECEIVER_PORTS)
@click.option("--mock", type=bool, default=False, help="True: use 1.2.1's fixed test uid.")
def inbound_request(
    s2cs: str,
    server_cert: Path,
    scope: str,
    token: str | None,
    insecure: bool,
    timeout: float,
    num_conn: int,
    rate: int,
    remote_ip: str,
    receiver_ports: str | None,
    mock: bool,
) -> None:
    """Producer side: register the app at --remote_ip:--receiver_ports; prints uid and listeners."""
    uid = MOCK_UID if mock else str(uuid.uuid4())
    _print_uid_line(uid, s2cs, token, "PROD")

    async def go() -> list[str]:
        receivers = _receivers(remote_ip, receiver_ports)
        channel = await _open(s2cs, server_cert, insecure, timeout)
        try:
            client = _Client(channel, s2cs, token, timeout)
            answer = await _req_and_hello(client, uid, "PROD", num_conn, rate, receivers)
            update = legacy_api.UpdateTargets(uid=uid, remote_listeners=answer.prod_listeners, role="PROD")
            await call(client.stub.update(update), client.what)
            return list(answer.listeners)
        finally:
            channel.close()

    click.echo(f"Listeners: {_legacy(go())}")


@s2uc.command(name="outbound-request")
@common_options("localhost:6000")
@stream_options(None)
@click.argument("uid")
@click.argument("prod_lstn")
def outbound_request(
    s2cs: str,
    server_cert: Path,
    scope: str,
    token: str | None,
    insecure: bool,
    timeout: float,
    num_conn: int,
    rate: int,
    remote_ip: str,
    receiver_ports: str | None,
    uid: str,
    prod_lstn: str,
) -> None:
    """Consumer side: join session UID at the producer appliance's listeners PROD_LSTN (comma-separated)."""
    _print_uid_line(uid, s2cs, token, "CONS")

    async def go() -> list[str]:
        receivers = _receivers(remote_ip, receiver_ports)
        channel = await _open(s2cs, server_cert, insecure, timeout)
        try:
            client = _Client(channel, s2cs, token, timeout)
            answer = await _req_and_hello(client, uid, "CONS", num_conn, rate, receivers)
            targets = [p.strip() for p in prod_lstn.split(",") if p.strip()]
            update = legacy_api.UpdateTargets(uid=uid, remote_listeners=targets, role="CONS")
            await call(client.stub.update(update), client.what)
            return list(answer.listeners)
        finally:
            channel.close()

    click.echo(f"Listeners: {_legacy(go())}")


@s2uc.command()
@common_options("localhost:5000")
@click.argument("uid")
def release(
    s2cs: str, server_cert: Path, scope: str, token: str | None, insecure: bool, timeout: float, uid: str
) -> None:
    """Release session UID at --s2cs (the peer appliance releases its side too)."""

    async def go() -> None:
        channel = await _open(s2cs, server_cert, insecure, timeout)
        try:
            client = _Client(channel, s2cs, token, timeout)
            await call(client.stub.release(legacy_api.Release(uid=uid)), client.what)
        finally:
            channel.close()

    _run(go())
    click.echo("Release completed")


def s2cs_main() -> None:
    s2cs(prog_name="s2cs")


def s2uc_main() -> None:
    s2uc(prog_name="s2uc")
