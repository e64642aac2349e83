"""Yardstick `aioquic-defaults`: the smallest TCP-over-QUIC-stream relay on aioquic at its defaults.

What anyone would write from aioquic's documentation: `serve()` and `connect()` with a default
`QuicConfiguration` (1,200-byte packets, aioquic's default congestion control, asyncio's datagram
transport), one QUIC stream per TCP connection, both certificates checked. Every `scripts/bench` run
puts our QUIC mode next to it on the same path. It only adds the backpressure aioquic lacks (a
writer waits while more than `HIGH_WATER` bytes of its stream are unsent), without which a fast TCP
sender fills memory. Run as `python -m bench.aioquic_defaults server|client ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import ClassVar

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration

from bench.paths import IPERF_PORT, BenchPath, Target
from bench.stunnel import write_identity
from tests.integration.topology import Topology

ALPN = "bench-aioquic"
HIGH_WATER = 1024 * 1024
SERVER_PORT = 5400  # in A
ENTRY_PORT = 5111  # in B, where iperf3 connects
SERVER_NAME = "producer.bench.scistream"


class _Protocol(QuicConnectionProtocol):
    """Wakes writers waiting for their stream's send buffer after every received packet (ACKs)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.acked = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: object) -> None:
        super().datagram_received(data, addr)  # type: ignore[arg-type]
        self.acked.set()

    async def wait_buffer(self, stream_id: int) -> None:
        while (stream := self._quic._streams.get(stream_id)) is not None and len(
            stream.sender._buffer
        ) > HIGH_WATER:
            self.acked.clear()
            await self.acked.wait()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, quic: _Protocol | None) -> None:
    stream_id = writer.get_extra_info("stream_id") if quic is not None else None
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            if quic is not None and stream_id is not None:
                await quic.wait_buffer(stream_id)
            else:
                await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, RuntimeError, asyncio.CancelledError):  # RuntimeError: the stream ended
        writer.close()


async def _splice(
    tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    quic_stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    protocol: _Protocol,
) -> None:
    await asyncio.gather(_pump(tcp[0], quic_stream[1], protocol), _pump(quic_stream[0], tcp[1], None))
    tcp[1].close()


def _configuration(args: argparse.Namespace, *, is_client: bool) -> QuicConfiguration:
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], server_name=SERVER_NAME)
    config.load_cert_chain(args.cert, args.key)
    config.load_verify_locations(args.peer_cert)
    config.verify_mode = ssl.CERT_REQUIRED
    return config


async def run_server(args: argparse.Namespace) -> None:
    dest_host, dest_port = args.dest.rsplit(":", 1)
    protocols: list[_Protocol] = []
    tasks: set[asyncio.Task[None]] = set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def handle() -> None:
            tcp = await asyncio.open_connection(dest_host, int(dest_port))
            await _splice(tcp, (reader, writer), protocols[-1])

        task = asyncio.ensure_future(handle())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def make(*a: object, **kw: object) -> _Protocol:
        protocols.append(_Protocol(*a, **kw))
        return protocols[-1]

    host, port = args.listen.rsplit(":", 1)
    await serve(host, int(port), configuration=_configuration(args, is_client=False),
                create_protocol=make, stream_handler=on_stream)  # fmt: skip
    await asyncio.Event().wait()


async def run_client(args: argparse.Namespace) -> None:
    host, port = args.connect.rsplit(":", 1)
    async with connect(host, int(port), configuration=_configuration(args, is_client=True),
                       create_protocol=_Protocol) as protocol:  # fmt: skip
        assert isinstance(protocol, _Protocol)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _splice((reader, writer), await protocol.create_stream(), protocol)

        entry_host, entry_port = args.entry.rsplit(":", 1)
        server = await asyncio.start_server(accept, entry_host, int(entry_port))
        async with server:
            await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aioquic_defaults")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("--listen", required=True)
    server.add_argument("--dest", required=True)
    client = commands.add_parser("client")
    client.add_argument("--connect", required=True)
    client.add_argument("--entry", required=True)
    for sub in (server, client):
        sub.add_argument("--cert", required=True)
        sub.add_argument("--key", required=True)
        sub.add_argument("--peer-cert", required=True)
    args = parser.parse_args()
    asyncio.run(run_server(args) if args.command == "server" else run_client(args))
    return 0


class AioquicDefaults(BenchPath):
    """client in B → QUIC → server in A → iperf3 -s in A; TCP only."""

    name = "aioquic-defaults"
    label = "aioquic at its defaults (minimal relay, yardstick)"
    identities: ClassVar[dict[str, str]] = {"a": SERVER_NAME, "b": "consumer.bench.scistream"}

    def start(self, topology: Topology) -> Target:
        a, b = topology.a, topology.b
        files = {f.name: write_identity(f, self.identities[f.name]) for f in (a, b)}
        run = [sys.executable, "-m", "bench.aioquic_defaults"]
        a.spawn(*run, "server", "--listen", f"{a.wan_ip}:{SERVER_PORT}", "--dest", f"127.0.0.1:{IPERF_PORT}",
                "--cert", files["a"][0], "--key", files["a"][1], "--peer-cert", files["b"][0],
                log=a.workdir / "aioquic-server.log")  # fmt: skip
        a.wait_listening("udp", SERVER_PORT)
        entry = f"127.0.0.1:{ENTRY_PORT}"
        b.spawn(*run, "client", "--connect", f"{a.wan_ip}:{SERVER_PORT}", "--entry", entry,
                "--cert", files["b"][0], "--key", files["b"][1], "--peer-cert", files["a"][0],
                log=b.workdir / "aioquic-client.log")  # fmt: skip
        b.wait_listening("tcp", ENTRY_PORT)
        # one stream is the comparison that matters; with four, iperf3's control connection through
        # this minimal relay is closed early (not investigated: the relay is a yardstick)
        return Target("127.0.0.1", ENTRY_PORT, udp=False, streams4=False)


AIOQUIC_PATHS: dict[str, type[BenchPath]] = {AioquicDefaults.name: AioquicDefaults}

if __name__ == "__main__":
    sys.exit(main())
