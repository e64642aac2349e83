"""QUIC mode's relay processes on loopback: throughput of 1..N parallel TCP streams by `--workers`.

Runs the appliance's QUIC driver (producer and consumer side in this process, their relay processes
as children) on 127.0.0.1 with no namespaces, iperf3 or root, so it runs on any quiet many-core
machine. Senders and the sink are processes of their own, so they do not share a core with a relay.
Each side has `--workers` relay processes of its own, as two appliances would. For each
(workers, streams) it prints Mbit/s delivered and the relay processes' CPU seconds per GB.

    python -m bench.quic_workers --workers 1,2,4 --streams 1,4 --seconds 5 --max-packet-size 1452
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import threading
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from appliance.dataplane.base import ConsumerPlan, Credentials, ProducerPlan
from appliance.dataplane.quic import QuicDriver
from appliance.sessions.model import Address, Protocol
from appliance.sessions.ports import PortAllocator, PortRange
from quic_relay import RelayConfig, generate_identity

HOST = "127.0.0.1"
HZ = os.sysconf("SC_CLK_TCK")
CHUNK = 1 << 20
RECEIVED: Synchronized = multiprocessing.Value("q", 0)  # type: ignore[assignment]  # bytes the sink read


def _sink(port: Synchronized, received: Synchronized) -> None:
    """The producer app: accepts connections and counts what it reads, one thread per connection."""
    listener = socket.create_server((HOST, 0), backlog=256)
    port.value = listener.getsockname()[1]

    def drain(conn: socket.socket) -> None:
        buffer = bytearray(CHUNK)
        while n := conn.recv_into(buffer):
            with received.get_lock():
                received.value += n
        conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def _sender(port: int, seconds: float) -> None:
    """The consumer app: writes as fast as it may for `seconds`."""
    sock = socket.create_connection((HOST, port))
    data = bytes(CHUNK)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.sendall(data)
    sock.close()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def _credentials(name: str) -> Credentials:
    identity = generate_identity(name)
    return Credentials(identity.cert_pem, identity.key_pem, name)


async def measure(workers: int, streams: int, seconds: float, packet: int, dest: Address) -> dict[str, float]:
    # Two drivers, as two appliances would have: each side its own `workers` relay processes.
    config = RelayConfig(max_datagram_size=packet)
    a, b = QuicDriver(config, workers=workers), QuicDriver(config, workers=workers)
    ports = PortAllocator(PortRange(22000, 22999), HOST)
    pc, cc = _credentials("p.bench"), _credentials("c.bench")
    try:
        producer = await a.open_producer(ProducerPlan("p", Protocol.TCP, (dest,), pc), ports, HOST)
        producer.authorize(cc.cert_pem)
        plan = ConsumerPlan("c", Protocol.TCP, cc, pc.cert_pem, pc.server_name, producer.addresses, 1, 1)
        consumer = await b.open_consumer(plan, ports, HOST)
        await asyncio.sleep(1.0)  # path MTU discovery settles
        entry = consumer.addresses[0]
        pids = a.pool.pids + b.pool.pids
        senders = [
            multiprocessing.Process(target=_sender, args=(entry.port, seconds + 1.0)) for _ in range(streams)
        ]
        for p in senders:
            p.start()
        await asyncio.sleep(1.0)  # warm-up: connections open, windows grow
        start_bytes, start_cpu, start = RECEIVED.value, sum(_cpu(p) for p in pids), time.monotonic()
        await asyncio.sleep(seconds)
        moved, cpu = RECEIVED.value - start_bytes, sum(_cpu(p) for p in pids) - start_cpu
        elapsed = time.monotonic() - start
        for p in senders:
            await asyncio.to_thread(p.join)
        await consumer.close()
        await producer.close()
    finally:
        await b.close()
        await a.close()
    return {
        "workers": workers,
        "streams": streams,
        "packet": packet,
        "mbits": round(moved * 8 / elapsed / 1e6, 1),
        "cpu_s_per_gb": round(cpu / (moved / 1e9), 2) if moved else float("inf"),
        "relay_cores_busy": round(cpu / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-packet-size", type=int, default=1452)
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args()
    port: Synchronized = multiprocessing.Value("i", 0)  # type: ignore[assignment]
    sink = multiprocessing.Process(target=_sink, args=(port, RECEIVED), daemon=True)
    sink.start()
    while not port.value:
        time.sleep(0.01)
    dest = Address(HOST, port.value)
    print(f"{os.cpu_count()} cores; packets of {args.max_packet_size} bytes; {args.seconds} s per run")
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            for streams in (int(s) for s in args.streams.split(",")):
                row = asyncio.run(measure(workers, streams, args.seconds, args.max_packet_size, dest))
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(
                        f"workers {workers:>2}  streams {streams:>2}  {row['mbits']:>8.1f} Mbit/s  "
                        f"{row['cpu_s_per_gb']:>6.2f} relay CPU s/GB  "
                        f"{row['relay_cores_busy']:.2f} cores busy",
                        flush=True,
                    )
    finally:
        sink.terminate()


if __name__ == "__main__":
    main()
