"""QUIC relay alone on loopback: throughput and relay CPU per GB, against the aioquic-defaults yardstick.

Needs no namespaces, iperf3 or root, so it runs on any quiet machine with the project's Python
dependencies. Each configuration starts `python -m quic_relay server` and `client` (or the yardstick)
as two processes on 127.0.0.1 and pushes one TCP stream through for `--seconds`; configurations are
interleaved over `--rounds`. `--old DIR` adds the relay found in DIR (a directory holding an older
`quic_relay` package, e.g. from `git archive`) for before/after comparisons.

    python -m bench.quic_loopback --rounds 3 --seconds 5 --old /tmp/old-relay
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
SERVER_NAME = "producer.bench.scistream"
CONFIGS = [
    ("yardstick", ()),
    ("new", ("--max-packet-size", "1452")),
    ("new", ("--max-packet-size", "1452", "--no-gso", "--no-gro")),
    ("new", ("--max-packet-size", "8952")),
]


@dataclass
class Pids:
    server: int
    client: int


@dataclass
class Run:
    relay: str
    options: str
    mbits: float
    cpu_per_gb: float
    client_cpu: float
    server_cpu: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def start_sink(port: int, counter: list[int]) -> None:
    server = socket.create_server(("127.0.0.1", port))

    def read(conn: socket.socket) -> None:
        while data := conn.recv(1 << 20):
            counter[0] += len(data)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=read, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def push(port: int, seconds: float) -> None:
    chunk = b"x" * (1 << 20)
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while time.monotonic() < deadline:
            conn.sendall(chunk)


def udp_sink(port: int, counter: list[int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: the sink must not be what drops
    sock.bind(("127.0.0.1", port))

    def read() -> None:
        while True:
            sock.recv(65536)
            counter[0] += 1

    threading.Thread(target=read, daemon=True).start()


def udp_push(port: int, seconds: float, mbits: float, length: int) -> int:
    """Sends `length`-byte datagrams at `mbits` for `seconds`; returns how many."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    interval = length * 8 / (mbits * 1e6)
    payload, sent = b"u" * length, 0
    start = time.perf_counter()
    while (now := time.perf_counter()) < start + seconds:
        due = int((now - start) / interval) + 1
        while sent < due:
            sock.sendto(payload, ("127.0.0.1", port))
            sent += 1
    return sent


@contextlib.contextmanager
def relay_processes(
    server_cmd: list[str], client_cmd: list[str], env: dict[str, str], work: Path
) -> Iterator[Pids]:
    """Both relay processes, started in order and stopped on the way out."""
    with open(work / "relay.log", "ab") as log:
        server = subprocess.Popen(server_cmd, env=env, cwd=work, stderr=log)
        time.sleep(1.5)
        client = subprocess.Popen(client_cmd, env=env, cwd=work, stderr=log)
        time.sleep(1.5)
        try:
            yield Pids(server.pid, client.pid)
        finally:
            for process in (server, client):
                process.terminate()
                process.wait()


def measure_udp(work: Path, port: int, seconds: float, mbits: float, length: int) -> tuple[int, int]:
    """(sent, received) through the relay at 1,452-byte packets: a 1,500-byte path."""
    server_cmd, client_cmd = commands("new", ("--max-packet-size", "1452"), work, port)
    client_cmd = [c.replace("--tcp-entry", "--udp-entry") for c in client_cmd]
    received = [0]
    udp_sink(port + 2, received)
    with relay_processes(server_cmd, client_cmd, dict(os.environ, PYTHONPATH=str(ROOT)), work):
        udp_push(port + 1, 0.5, 10, length)  # opens the flow; packet size discovery
        time.sleep(0.5)
        before = received[0]
        sent = udp_push(port + 1, seconds, mbits, length)
        time.sleep(0.5)
    return sent, received[0] - before


def commands(relay: str, options: tuple[str, ...], work: Path, port: int) -> tuple[list[str], list[str]]:
    server, entry, dest = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}", f"127.0.0.1:{port + 2}"
    files = {n: (str(work / f"{n}.crt"), str(work / f"{n}.key")) for n in ("s", "c")}
    if relay == "yardstick":
        run = [sys.executable, "-m", "bench.aioquic_defaults"]
        return (
            [*run, "server", "--listen", server, "--dest", dest, "--cert", files["s"][0],
             "--key", files["s"][1], "--peer-cert", files["c"][0]],
            [*run, "client", "--connect", server, "--entry", entry, "--cert", files["c"][0],
             "--key", files["c"][1], "--peer-cert", files["s"][0]],
        )  # fmt: skip
    run = [sys.executable, "-m", "quic_relay", "--log-level", "WARNING"]
    return (
        [*run, "server", "--listen", server, "--dest", dest, "--peer-cert", files["c"][0],
         "--server-name", SERVER_NAME, "--cert", files["s"][0], "--key", files["s"][1], *options],
        [*run, "client", "--connect", server, "--server-cert", files["s"][0], "--server-name", SERVER_NAME,
         "--cert", files["c"][0], "--key", files["c"][1], "--tcp-entry", entry, *options],
    )  # fmt: skip


def measure(
    relay: str, options: tuple[str, ...], work: Path, port: int, seconds: float, old: Path | None
) -> Run:
    path = f"{old}:{ROOT}" if relay == "old" else str(ROOT)
    env = dict(os.environ, PYTHONPATH=path)
    server_cmd, client_cmd = commands(relay, options, work, port)
    received = [0]
    start_sink(port + 2, received)
    with relay_processes(server_cmd, client_cmd, env, work) as pids:
        c0, s0, t0 = cpu_seconds(pids.client), cpu_seconds(pids.server), time.monotonic()
        push(port + 1, seconds)
        time.sleep(0.3)
        c1, s1, t1 = cpu_seconds(pids.client), cpu_seconds(pids.server), time.monotonic()
    gb = received[0] / 1e9
    used = (c1 - c0) + (s1 - s0)
    return Run(
        relay,
        " ".join(options),
        received[0] * 8 / (t1 - t0) / 1e6,
        used / gb if gb else 0.0,
        c1 - c0,
        s1 - s0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quic_loopback", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--old", type=Path, help="directory with an older quic_relay package to compare")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--udp", type=float, default=200, help="UDP runs at this many Mbit/s (0: none)")
    parser.add_argument("--udp-length", type=int, default=1200)
    args = parser.parse_args()
    configs = CONFIGS + ([("old", ("--max-packet-size", "1452")), ("old", ("--max-packet-size", "8952"))]
                         if args.old else [])  # fmt: skip
    runs: list[Run] = []
    losses: list[float] = []
    with tempfile.TemporaryDirectory(prefix="quic-loopback-") as tmp:
        work = Path(tmp)
        for name, key in (("s", SERVER_NAME), ("c", "consumer.bench.scistream")):
            subprocess.run(
                [sys.executable, "-m", "quic_relay", "gen-identity", "--out-cert", str(work / f"{name}.crt"),
                 "--out-key", str(work / f"{name}.key"), "--name", key, "--san", "127.0.0.1"],
                check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )  # fmt: skip
        port = 7100
        for _ in range(args.rounds):
            for relay, options in configs:
                port += 10
                runs.append(measure(relay, options, work, port, args.seconds, args.old))
                print(json.dumps(asdict(runs[-1])), flush=True)
            if args.udp:
                port += 10
                sent, got = measure_udp(work, port, args.seconds, args.udp, args.udp_length)
                losses.append(100 * (sent - got) / sent)
                print(
                    json.dumps(
                        {"udp_mbits": args.udp, "sent": sent, "received": got, "loss_percent": losses[-1]}
                    )
                )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    print("\n| relay | options | Mbit/s | relay CPU, s per GB |\n|---|---|---|---|")
    for relay, options in configs:
        mine = [r for r in runs if r.relay == relay and r.options == " ".join(options)]
        mbits, cost = [r.mbits for r in mine], [r.cpu_per_gb for r in mine]
        rate = f"{statistics.median(mbits):,.0f} ({min(mbits):,.0f}-{max(mbits):,.0f})"
        spent = f"{statistics.median(cost):.1f} ({min(cost):.1f}-{max(cost):.1f})"
        print(f"| {relay} | {' '.join(options)} | {rate} | {spent} |")
    if losses:
        print(f"\nUDP {args.udp:g} Mbit/s offered ({args.udp_length} B), 1,452-byte packets: loss "
              f"{statistics.median(losses):.2f} % ({min(losses):.2f}-{max(losses):.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
