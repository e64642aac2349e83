"""Command line: `python -m quic_relay server|client|gen-identity ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .client import RelayClient
from .config import RelayConfig
from .errors import RelayError
from .identity import Identity, generate_identity
from .server import RelayServer

logger = logging.getLogger("quic_relay")


def parse_address(text: str) -> tuple[str, int]:
    """Parse "HOST:PORT" or "[V6]:PORT" to (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_entry(text: str) -> tuple[str, int, int]:
    """Parse "HOST:PORT[=INDEX]" to (host, port, dest_index); the index defaults to 0."""
    address, sep, index = text.partition("=")
    if sep and not index.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT[=INDEX], got {text!r}")
    host, port = parse_address(address)
    return host, port, int(index) if sep else 0


def parse_destinations(text: str) -> list[tuple[str, int]]:
    return [parse_address(item) for item in text.split(",") if item]


def relay_config(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(max_datagram_size=args.max_packet_size, gso=not args.no_gso, gro=not args.no_gro)


def load_identity(cert: Path, key: Path) -> Identity:
    return Identity(cert_pem=cert.read_bytes(), key_pem=key.read_bytes())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quic_relay", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="producer side: accept one client, connect to destinations")
    server.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT")
    server.add_argument("--dest", type=parse_destinations, required=True, metavar="HOST:PORT[,...]")
    server.add_argument("--peer-cert", type=Path, required=True, help="the only client certificate accepted")
    server.add_argument("--server-name", required=True)

    client = commands.add_parser("client", help="consumer side: entry points relayed to the server")
    client.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    client.add_argument("--server-cert", type=Path, required=True, help="pinned server certificate")
    client.add_argument("--server-name", required=True)
    client.add_argument(
        "--tcp-entry", type=parse_entry, action="append", default=[], metavar="HOST:PORT[=INDEX]"
    )
    client.add_argument(
        "--udp-entry", type=parse_entry, action="append", default=[], metavar="HOST:PORT[=INDEX]"
    )

    for sub in (server, client):
        sub.add_argument("--cert", type=Path, required=True)
        sub.add_argument("--key", type=Path, required=True)
        sub.add_argument(
            "--max-packet-size",
            type=int,
            default=RelayConfig.max_datagram_size,
            help="cap of path MTU discovery (UDP payload bytes); 1200 turns it off",
        )
        sub.add_argument("--no-gso", action="store_true", help="send one datagram per system call")
        sub.add_argument("--no-gro", action="store_true", help="receive without UDP_GRO")

    gen = commands.add_parser("gen-identity", help="write a self-signed EC P-256 certificate and key")
    gen.add_argument("--out-cert", type=Path, required=True)
    gen.add_argument("--out-key", type=Path, required=True)
    gen.add_argument("--name", required=True)
    gen.add_argument("--san", action="append", default=[], help="extra DNS name or IP (repeatable)")
    return parser


def write_identity(args: argparse.Namespace) -> None:
    identity = generate_identity(args.name, sans=args.san)
    fd = os.open(args.out_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        os.fchmod(key_file.fileno(), 0o600)  # also when the file existed with wider permissions
        key_file.write(identity.key_pem)
    args.out_cert.write_bytes(identity.cert_pem)
    print(identity.fingerprint)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def run_server(args: argparse.Namespace) -> None:
    host, port = args.listen
    server = await RelayServer.start(
        host=host,
        port=port,
        identity=load_identity(args.cert, args.key),
        server_name=args.server_name,
        destinations=args.dest,
        config=relay_config(args),
    )
    server.authorize(args.peer_cert.read_bytes())
    try:
        await wait_for_signal()
    finally:
        await server.close()


async def run_client(args: argparse.Namespace) -> None:
    client = await RelayClient.start(
        server=args.connect,
        server_name=args.server_name,
        identity=load_identity(args.cert, args.key),
        server_cert_pem=args.server_cert.read_bytes(),
        config=relay_config(args),
    )
    try:
        for host, port, index in args.tcp_entry:
            logger.info(
                "TCP entry %s:%d -> destination %d", *await client.add_tcp_entry(host, port, index), index
            )
        for host, port, index in args.udp_entry:
            logger.info(
                "UDP entry %s:%d -> destination %d", *await client.add_udp_entry(host, port, index), index
            )
        await wait_for_signal()
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "gen-identity":
            write_identity(args)
        elif args.command == "server":
            asyncio.run(run_server(args))
        else:
            asyncio.run(run_client(args))
    except (RelayError, OSError, ValueError) as exc:
        print(f"quic_relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
