"""`scistream`: run an appliance (`server`) or drive one (`inbound`, `outbound`, `connect`, ...)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.api.scistream import v1 as api
from appliance.cli import output
from appliance.cli.client import Target, connect
from appliance.cli.units import parse_duration, parse_rate
from appliance.control.channel import Trust
from appliance.errors import ApplianceError, InvalidArgument
from appliance.sessions.model import Address, parse_destinations

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

MODES = {name: api.Mode[name.upper()] for name in ("quic", "wireguard", "tls", "auto")}
PROTOCOLS = {name: api.Protocol[name.upper()] for name in ("tcp", "udp")}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a command's coroutine; our errors become one line on stderr and exit status 1."""
    try:
        return asyncio.run(coro)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def trust_options(func: F) -> F:
    for option in reversed(
        [
            click.option("--token", envvar="SCISTREAM_TOKEN", help="Bearer token (or SCISTREAM_TOKEN)."),
            click.option("--ca", type=click.Path(path_type=Path), help="CA file that signed the appliance."),
            click.option("--fingerprint", help="SHA-256 fingerprint of the appliance's certificate."),
            click.option("--insecure", is_flag=True, help="Plaintext control channel (development only)."),
            click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout."),
            click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per call."),
        ]
    ):
        func = option(func)
    return func


def client_options(func: F) -> F:
    option = click.option(
        "--server",
        default="localhost:5000",
        show_default=True,
        envvar="SCISTREAM_SERVER",
        help="Appliance control address HOST:PORT.",
    )
    return trust_options(option(func))


def stream_options(func: F) -> F:
    for option in reversed(
        [
            click.option(
                "--dest",
                "dest",
                multiple=True,
                required=True,
                help="Destination HOST:PORT where the producer app listens (repeat or comma-separate).",
            ),
            click.option("--mode", type=click.Choice(list(MODES)), default="quic", show_default=True),
            click.option("--protocol", type=click.Choice(list(PROTOCOLS)), default="tcp", show_default=True),
            click.option("--num-conn", type=int, default=1, show_default=True, help="Entry points to bind."),
            click.option("--rate", help="Rate limit in bits/s, e.g. 10G."),
            click.option("--ttl", help="Lease, e.g. 24h (default: the appliance's)."),
        ]
    ):
        func = option(func)
    return func


def _target(
    server: str, token: str | None, ca: Path | None, fingerprint: str | None, insecure: bool, timeout: float
) -> Target:
    return Target(server, Trust(ca_file=ca, fingerprint=fingerprint or "", insecure=insecure), token, timeout)


def _local_target(config_file: Path | None, timeout: float) -> Target:
    """The appliance on this host as its own settings describe it: the listen address (a wildcard means
    loopback), plaintext with --insecure, else its control certificate pinned by fingerprint (which does
    not depend on the names the certificate was issued for)."""
    from appliance.config import load_settings
    from appliance.control.tls import default_cert_files
    from quic_relay import fingerprint_of

    settings = load_settings(config_file)
    listen = settings.listen_address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    server = str(Address(host, listen.port))
    if settings.insecure:
        return Target(server, Trust(insecure=True), None, timeout)
    cert = settings.tls_cert or default_cert_files(settings.state_dir)[0]
    try:
        fingerprint = fingerprint_of(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the appliance's control certificate {cert}: {exc}") from None
    return Target(server, Trust(fingerprint=fingerprint), None, timeout)


def _create_request(
    dest: tuple[str, ...], mode: str, protocol: str, num_conn: int, rate: str | None, ttl: str | None
) -> api.CreateSessionRequest:
    destinations = parse_destinations(list(dest))
    if num_conn < 1:
        raise InvalidArgument("--num-conn must be at least 1")
    return api.CreateSessionRequest(
        destinations=[str(d) for d in destinations],
        mode=MODES[mode],
        protocol=PROTOCOLS[protocol],
        num_conn=num_conn,
        rate_bps=parse_rate(rate) if rate else 0,
        ttl_seconds=int(parse_duration(ttl)) if ttl else 0,
    )


def _validated(builder: Callable[[], T]) -> T:
    """Builds a request, turning bad input into the CLI's one-line error before anything is sent."""
    try:
        return builder()
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scistream")
def cli() -> None:
    """SciStream: session-scoped, encrypted data streams between facilities."""


@cli.command()
@click.option("--listen", help="Control address HOST:PORT [0.0.0.0:5000].")
@click.option("--advertise", help="Host peers and users reach this appliance at (tickets, certificates).")
@click.option("--port-range", help="Data ports FIRST-LAST [5100-5200].")
@click.option("--data-bind", help="Address entry points and data endpoints bind to [0.0.0.0].")
@click.option("--state-dir", type=click.Path(path_type=Path), help="State directory [/var/lib/scistream].")
@click.option(
    "--auth",
    type=click.Choice(["none", "tokens", "jwt", "introspection"]),
    help="User authentication [tokens].",
)
@click.option(
    "--tokens-file", type=click.Path(path_type=Path), help="YAML file of hashed tokens (--auth tokens)."
)
@click.option("--jwks-file", type=click.Path(path_type=Path), help="JWKS file (--auth jwt).")
@click.option("--jwt-issuer", help="Required JWT issuer.")
@click.option("--jwt-audience", help="Required JWT audience.")
@click.option(
    "--introspection-endpoint",
    help="RFC 7662 endpoint (--auth introspection), e.g. https://auth.globus.org/v2/oauth2/token/introspect.",
)
@click.option("--introspection-client-id", help="This appliance's client id at the authorization server.")
@click.option(
    "--introspection-client-secret-file",
    type=click.Path(path_type=Path),
    help="0600 file holding its client secret (or SCISTREAM_INTROSPECTION_CLIENT_SECRET).",
)
@click.option("--introspection-scope", help="Scope every token must carry.")
@click.option("--introspection-audience", help="Audience tokens must name [the client id].")
@click.option(
    "--introspection-identity",
    type=click.Choice(["sub", "username"]),
    help="Claim that names the caller [sub].",
)
@click.option("--introspection-ca", type=click.Path(path_type=Path), help="CA file for the endpoint.")
@click.option(
    "--introspection-cache-ttl",
    type=click.FloatRange(min=0, max=600),
    help="Seconds an answer is reused; a revoked token works that long [60].",
)
@click.option("--insecure", is_flag=True, default=None, help="Plaintext control channel (development only).")
@click.option(
    "--tls-cert", type=click.Path(path_type=Path), help="Control certificate (default: self-signed)."
)
@click.option("--tls-key", type=click.Path(path_type=Path), help="Key of --tls-cert.")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option("--status-port", type=int, help="Serve the status page (a web page of sessions) on this port.")
@click.option(
    "--health-port",
    type=click.IntRange(min=0, max=65535),
    help="Also serve grpc.health.v1 alone, in plaintext, on this port (Kubernetes gRPC probes) [0: off].",
)
@click.option("--workers", type=click.IntRange(min=0), help="TLS mode relay processes [0: one per core].")
@click.option(
    "--quic-max-packet-size",
    type=click.IntRange(min=1200, max=65507),
    help="QUIC mode: cap of path MTU discovery, in bytes of UDP payload [8952; 1200: no discovery].",
)
@click.option(
    "--wireguard-backend",
    type=click.Choice(["auto", "kernel", "userspace"]),
    help="WireGuard mode's backend [auto: kernel if it works, else wireguard-go].",
)
@click.option(
    "--wireguard-pool", help="Tunnel address pool, CIDR[,CIDR] [100.64.0.0/10,fd5c:5157:7e00::/48]."
)
@click.option("--wireguard-go", help="wireguard-go program for the userspace backend [wireguard-go].")
@click.option("--log-format", type=click.Choice(["console", "json"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--default-ttl", help="Default session lease, e.g. 24h.")
@click.option(
    "--peer-grace",
    help="How long an active session may lack a data-plane connection to the peer appliance "
    "before it is FAILED, e.g. 60s [60s].",
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML configuration file.")
def server(config_file: Path | None, default_ttl: str | None, peer_grace: str | None, **flags: Any) -> None:
    """Run an appliance (flags override SCISTREAM_* variables, which override --config)."""
    from appliance.config import load_settings
    from appliance.control.server import serve
    from appliance.logging import configure_logging

    def settings() -> Any:
        ttl = parse_duration(default_ttl) if default_ttl else None
        grace = parse_duration(peer_grace) if peer_grace else None
        return load_settings(config_file, default_ttl=ttl, peer_grace=grace, **flags)

    loaded = _validated(settings)
    configure_logging(loaded.log_format, loaded.log_level)
    run(serve(loaded))


@cli.command()
@client_options
@stream_options
def inbound(
    server: str,
    dest: tuple[str, ...],
    mode: str,
    protocol: str,
    num_conn: int,
    rate: str | None,
    ttl: str | None,
    as_json: bool,
    **trust: Any,
) -> None:
    """Producer side: create a session in front of the app listening at --dest; prints a ticket."""
    request = _validated(lambda: _create_request(dest, mode, protocol, num_conn, rate, ttl))

    async def go() -> api.CreateSessionResponse:
        async with connect(_target(server, **trust)) as client:
            return await client.create(request)

    reply = run(go())
    if as_json:
        output.emit_json(output.inbound_json(reply))
        return
    click.echo("\n".join(output.describe(reply.session)))
    click.echo("Ticket for the consumer side (keep it secret; it can be used once):")
    click.echo(reply.ticket)


@cli.command()
@client_options
@click.argument("ticket")
@click.option(
    "--entry-port", "entry_ports", type=int, multiple=True, help="Port for an entry point (repeat)."
)
@click.option("--bind", "bind_host", default="", help="Address the entry points bind to.")
@click.option("--ttl", help="Lease, e.g. 24h.")
def outbound(
    server: str,
    ticket: str,
    entry_ports: tuple[int, ...],
    bind_host: str,
    ttl: str | None,
    as_json: bool,
    **trust: Any,
) -> None:
    """Consumer side: join the session in TICKET; prints the entry points for the consumer app."""
    request = _validated(
        lambda: api.JoinSessionRequest(
            ticket=ticket,
            entry_ports=list(entry_ports),
            bind_host=bind_host,
            ttl_seconds=int(parse_duration(ttl)) if ttl else 0,
        )
    )

    async def go() -> api.JoinSessionResponse:
        async with connect(_target(server, **trust)) as client:
            return await client.join(request)

    reply = run(go())
    if as_json:
        output.emit_json(output.outbound_json(reply.session))
    else:
        click.echo("\n".join(output.describe(reply.session)))


@cli.command(name="connect")
@trust_options
@click.option("--producer", required=True, help="Producer-side appliance HOST:PORT.")
@click.option("--consumer", required=True, help="Consumer-side appliance HOST:PORT.")
@click.option("--producer-fingerprint", help="Pin for the producer appliance (default: --fingerprint).")
@click.option("--consumer-fingerprint", help="Pin for the consumer appliance (default: --fingerprint).")
@click.option("--producer-token", envvar="SCISTREAM_PRODUCER_TOKEN", help="Token at the producer appliance.")
@click.option("--consumer-token", envvar="SCISTREAM_CONSUMER_TOKEN", help="Token at the consumer appliance.")
@click.option(
    "--entry-port", "entry_ports", type=int, multiple=True, help="Port for an entry point (repeat)."
)
@click.option("--bind", "bind_host", default="", help="Address the entry points bind to.")
@stream_options
def connect_command(
    producer: str,
    consumer: str,
    producer_fingerprint: str | None,
    consumer_fingerprint: str | None,
    producer_token: str | None,
    consumer_token: str | None,
    entry_ports: tuple[int, ...],
    bind_host: str,
    dest: tuple[str, ...],
    mode: str,
    protocol: str,
    num_conn: int,
    rate: str | None,
    ttl: str | None,
    as_json: bool,
    token: str | None,
    ca: Path | None,
    fingerprint: str | None,
    insecure: bool,
    timeout: float,
) -> None:
    """Both sides in one command: inbound at --producer, outbound at --consumer."""
    request = _validated(lambda: _create_request(dest, mode, protocol, num_conn, rate, ttl))
    prod = _target(
        producer, producer_token or token, ca, producer_fingerprint or fingerprint, insecure, timeout
    )
    cons = _target(
        consumer, consumer_token or token, ca, consumer_fingerprint or fingerprint, insecure, timeout
    )

    async def go() -> tuple[api.CreateSessionResponse, api.Session]:
        async with connect(prod) as producer_client:
            created = await producer_client.create(request)
            try:
                async with connect(cons) as consumer_client:
                    joined = await consumer_client.join(
                        api.JoinSessionRequest(
                            ticket=created.ticket,
                            entry_ports=list(entry_ports),
                            bind_host=bind_host,
                            ttl_seconds=request.ttl_seconds,
                        )
                    )
            except BaseException:
                # Never leave a half-created session behind.
                await producer_client.release(created.session.session_id)
                raise
        return created, joined.session

    created, joined = run(go())
    if as_json:
        producer_half = output.inbound_json(created)
        del producer_half["ticket"]  # already redeemed; no reason to print a secret
        output.emit_json({"producer": producer_half, "consumer": output.outbound_json(joined)})
        return
    click.echo("\n".join(output.describe(created.session)))
    click.echo("\n".join(output.describe(joined)))
    click.echo(f"Connect the consumer app to: {', '.join(joined.entry_points)}")


@cli.command()
@client_options
@click.argument("session_id")
def release(server: str, session_id: str, as_json: bool, **trust: Any) -> None:
    """Release a session on this side; the peer appliance releases its side too."""

    async def go() -> api.Session:
        async with connect(_target(server, **trust)) as client:
            return await client.release(session_id)

    session = run(go())
    if as_json:
        output.emit_json(output.session_json(session))
    else:
        click.echo(f"Session {session.session_id} released.")


@cli.command()
@client_options
@click.argument("session_id")
@click.option("--watch", is_flag=True, help="Keep printing on every change until the session ends.")
def status(server: str, session_id: str, watch: bool, as_json: bool, **trust: Any) -> None:
    """Show one session."""

    def show(session: api.Session) -> None:
        if as_json and watch:  # one JSON object per line while watching
            click.echo(json.dumps(output.session_json(session)))
        elif as_json:
            output.emit_json(output.session_json(session))
        else:
            click.echo("\n".join(output.describe(session)))

    async def go() -> None:
        async with connect(_target(server, **trust)) as client:
            if not watch:
                show(await client.get(session_id))
                return
            async for session in client.watch(session_id):
                show(session)

    run(go())


@cli.command(name="ls")
@client_options
def list_sessions(server: str, as_json: bool, **trust: Any) -> None:
    """List sessions (yours, or all for an admin), including recently ended ones."""

    async def go() -> list[api.Session]:
        async with connect(_target(server, **trust)) as client:
            return await client.list()

    sessions = run(go())
    if as_json:
        output.emit_json([output.session_json(s) for s in sessions])
        return
    if not sessions:
        click.echo("No sessions.")
    for s in sessions:
        row = output.session_json(s)
        points = ", ".join(row["entry_points"] or row["data_endpoints"])
        click.echo(f"{row['session_id']}  {row['state']:<8} {row['side']:<8} {row['mode']:<5} {points}")


@cli.command()
@client_options
@click.option(
    "--local",
    is_flag=True,
    help="Check this host's appliance where its configuration (environment and --config) says it listens, "
    "trusting its own control certificate: for container healthchecks.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="With --local: the appliance's YAML configuration file.",
)
def health(server: str, as_json: bool, local: bool, config_file: Path | None, **trust: Any) -> None:
    """Exit 0 if the appliance is SERVING."""
    target = _target(server, **trust)
    if local:
        target = _validated(lambda: _local_target(config_file, trust["timeout"]))

    async def go() -> bool:
        async with connect(target) as client:
            return await client.serving()

    serving = run(go())
    if as_json:
        output.emit_json({"status": "SERVING" if serving else "NOT_SERVING"})
    else:
        click.echo("SERVING" if serving else "NOT_SERVING")
    sys.exit(0 if serving else 1)


@cli.group()
def token() -> None:
    """Manage the tokens file of `--auth tokens`."""


@token.command(name="create")
@click.option("--tokens-file", type=click.Path(path_type=Path), required=True)
@click.option("--subject", required=True, help="Who the token identifies.")
@click.option("--role", "roles", multiple=True, help="Role, e.g. admin (repeat).")
def token_create(tokens_file: Path, subject: str, roles: tuple[str, ...]) -> None:
    """Add a token; prints it once (only its hash is stored)."""
    from appliance.auth import add_token

    try:
        new = add_token(tokens_file, subject, list(roles))
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    click.echo(new)


def main() -> None:
    cli(prog_name="scistream")


__all__ = ["cli", "main"]
