"""A QUIC mode relay process: `python -m appliance.dataplane.quicworker FD`.

Runs `quic_relay` servers and clients for the sessions the control process hands it, on asyncio's own
loop (aioquic's sub-millisecond timers run 8x slower on uvloop's millisecond clock). Producer side:
one RelayServer per UDP socket it is given, every socket on the session's one data endpoint port,
steered by lane (quic_relay/lanes.py). Consumer side: one RelayClient in lane N for relay process N,
serving the entry point sockets it is given.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import sys
from typing import Any

from appliance.dataplane.tlsrelay.worker import RelayProcess, main
from quic_relay import Identity, RelayClient, RelayConfig, RelayServer


def _bytes(spec: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(spec[key])


def _config(spec: dict[str, Any], **changes: Any) -> RelayConfig:
    return dataclasses.replace(RelayConfig(**spec["config"]), **changes)


class _Producer:
    def __init__(self, servers: list[RelayServer]) -> None:
        self.servers = servers

    async def close(self) -> None:
        for server in self.servers:
            await server.close()


class QuicProcess(RelayProcess):
    def __init__(self, channel: socket.socket) -> None:
        super().__init__(channel)
        self.producers: dict[str, _Producer] = {}
        self.consumers: dict[str, RelayClient] = {}

    async def _open(
        self, op: str, session_id: str, message: dict[str, Any], socks: list[socket.socket]
    ) -> None:
        spec = message["spec"]
        identity = Identity(_bytes(spec, "cert_pem"), _bytes(spec, "key_pem"))
        if op == "producer":
            producer = _Producer([])
            self.relays[session_id] = self.producers[session_id] = producer
            for sock in socks:
                server = await RelayServer.start(
                    host="",
                    port=0,
                    identity=identity,
                    server_name=spec["server_name"],
                    destinations=[(str(h), int(p)) for h, p in spec["destinations"]],
                    config=_config(spec),
                    sock=sock,
                )
                server.counters.on_closed = self.report_soon
                producer.servers.append(server)
                if "peer_cert_pem" in spec:  # restarted after the session was authorized
                    server.authorize(_bytes(spec, "peer_cert_pem"))
            return
        index: int = message["worker"]
        host, port = spec["endpoint"]
        client = await RelayClient.start(
            server=(str(host), int(port)),
            server_name=spec["server_name"],
            identity=identity,
            server_cert_pem=_bytes(spec, "peer_cert_pem"),
            config=_config(spec, lane=index),
            wait=not (spec["restoring"] or message.get("replay")),
        )
        client.counters.on_closed = self.report_soon
        self.relays[session_id] = self.consumers[session_id] = client
        for sock, dest_index in zip(socks, _entries(spec, index), strict=True):
            if spec["kind"] == "udp":
                await client.add_udp_entry("", 0, dest_index, sock=sock)
            else:
                await client.add_tcp_entry("", 0, dest_index, sock=sock)

    def _authorize(self, session_id: str, peer_cert_pem: bytes) -> None:
        producer = self.producers.get(session_id)
        for server in producer.servers if producer is not None else ():
            server.authorize(peer_cert_pem)

    def _forget(self, session_id: str) -> None:
        self.producers.pop(session_id, None)
        self.consumers.pop(session_id, None)

    def _values(self, session_id: str) -> tuple[int, ...] | None:
        counters = (
            [s.counters for s in self.producers[session_id].servers] if session_id in self.producers else []
        )
        if session_id in self.consumers:
            counters.append(self.consumers[session_id].counters)
        totals = [0] * 6
        for c in counters:
            values = (c.bytes_in, c.bytes_out, c.connections, c.active, 0, c.dropped_datagrams)
            totals = [a + b for a, b in zip(totals, values, strict=True)]
        return tuple(totals)

    def _peer_seen(self, session_id: str, now: float) -> float:
        absent: list[float | None] = [c.peer_absent_since for c in self._relays_of(session_id)]
        if any(a is None for a in absent):
            return now
        return max((a for a in absent if a is not None), default=0.0)

    def _gauges(self) -> dict[str, int]:
        return {s: max((r.packet_size or 0 for r in self._relays_of(s)), default=0) for s in self.relays}

    def _relays_of(self, session_id: str) -> list[RelayServer | RelayClient]:
        producer = self.producers.get(session_id)
        if producer is not None:
            return list(producer.servers)
        client = self.consumers.get(session_id)
        return [client] if client is not None else []


def _entries(spec: dict[str, Any], index: int) -> list[int]:
    """The destination index of each entry point socket relay process `index` serves, in order: every
    TCP entry point (each has a listening socket in every process), every `workers`th UDP one."""
    dest_indexes: list[int] = spec["dest_indexes"]
    if spec["kind"] == "udp":
        return dest_indexes[index :: spec["workers"]]
    return dest_indexes


if __name__ == "__main__":
    sys.exit(main(sys.argv, QuicProcess, fast_loop=False, name="quicrelay"))
