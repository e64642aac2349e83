"""TLS mode across two facilities: iperf3 over TCP and UDP, 1,000 connections in one session, release
and restart leaving nothing behind, and auto mode falling back to TLS when UDP is blocked."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest

from appliance.dataplane.tlsrelay import udp as tlsudp

from .topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    assert_upload_counted,
    drop_arriving,
    run_iperf_client,
    split_address,
    start_iperf_server,
    wait_until,
)

pytestmark = pytest.mark.integration

ECHO_PORT = 7000
CONNECTIONS = 1000
RSS_LIMIT_KIB = 400 * 1024  # all relay processes of one appliance together, with 1,000 connections open


def open_tls_session(a: Appliance, b: Appliance, *inbound: str, outbound: tuple[str, ...] = ()) -> Any:
    producer = a.json("inbound", "--dest", PRODUCER_DEST, "--mode", "tls", *inbound)
    consumer = b.json("outbound", producer["ticket"], *outbound)
    return producer, consumer


def relay_processes(facility: Facility) -> dict[int, int]:
    """pid → resident memory (KiB) of the TLS relay processes in the facility."""
    found: dict[int, int] = {}
    for pid in facility.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"tlsrelay.worker" not in cmdline:
                continue
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        found[pid] = rss
    return found


def test_tls_session_carries_tcp_and_counts_it(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer, consumer = open_tls_session(appliance_a, appliance_b)
    assert producer["mode"] == consumer["mode"] == "tls"
    assert ("tcp", split_address(producer["data_endpoints"][0])[1]) in facility_a.listening_ports()

    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2, streams=2)

    assert report["end"]["sum_received"]["bits_per_second"] > 0

    def counted() -> Any:
        s = appliance_a.status(producer["session_id"])
        return s if s["bytes_in"] > 0 and s["bytes_out"] > 0 else None

    wait_until(counted, 5, interval=0.2, what="producer-side counters")
    assert_upload_counted(appliance_a, producer["session_id"], appliance_b, consumer["session_id"])


def test_tls_udp_session_carries_iperf3_datagrams(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    # iperf3 -u needs its TCP control connection and its UDP data on the same port: two sessions.
    start_iperf_server(facility_a)
    open_tls_session(appliance_a, appliance_b, outbound=("--entry-port", "5110"))
    _, data = open_tls_session(
        appliance_a, appliance_b, "--protocol", "udp", outbound=("--entry-port", "5110")
    )
    assert data["protocol"] == "udp"

    report = run_iperf_client(facility_b, data["entry_points"][0], seconds=2, udp=True, length=1200)

    assert report["end"]["sum_received"]["bytes"] > 0
    # Both relay sockets got their full buffers (the kernel reports twice the size set).
    entry = udp_buffers(facility_b, "sport = :5110")
    flow = udp_buffers(facility_a, f"dport = :{split_address(PRODUCER_DEST)[1]}")
    assert entry and flow
    assert min(entry + flow) >= 2 * tlsudp.SOCKET_BUFFER, (entry, flow)


def udp_buffers(facility: Facility, where: str) -> list[int]:
    """Receive and send buffer sizes (`ss` rb and tb) of the UDP sockets matching the `ss` filter."""
    out = facility.run("ss", "-H", "-uamn", where).stdout
    return [int(size) for size in re.findall(r"\b[rt]b(\d+)", out)]


ECHO_SERVER = f"""
import asyncio
async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", {ECHO_PORT}, backlog=4096)
    await server.serve_forever()
asyncio.run(main())
"""

MANY_CLIENTS = """
import asyncio, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    conns = []
    for i in range(count):  # all open at once before any is used
        conns.append(await asyncio.wait_for(asyncio.open_connection(host, port), 20))
    for i, (reader, writer) in enumerate(conns):
        writer.write(b"%08d" % i)
    ok = 0
    for i, (reader, writer) in enumerate(conns):
        if await asyncio.wait_for(reader.readexactly(8), 60) == b"%08d" % i:
            ok += 1
    print(ok, flush=True)
    sys.stdin.readline()  # hold every connection open until told
    for reader, writer in conns:
        writer.close()
asyncio.run(main())
"""


def test_a_thousand_concurrent_connections_work_through_one_session_in_bounded_memory(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    facility_a.spawn(sys.executable, "-c", ECHO_SERVER)
    facility_a.wait_listening("tcp", ECHO_PORT)
    producer = appliance_a.json("inbound", "--dest", f"127.0.0.1:{ECHO_PORT}", "--mode", "tls")
    consumer = appliance_b.json("outbound", producer["ticket"])
    host, port = split_address(consumer["entry_points"][0])

    import subprocess

    client = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            facility_b.ns,
            sys.executable,
            "-c",
            MANY_CLIENTS,
            host,
            str(port),
            str(CONNECTIONS),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == str(CONNECTIONS)
        # Every connection is still open here: the relay processes hold all of them.
        for facility in (facility_a, facility_b):
            rss = relay_processes(facility)
            assert rss, f"no relay process in {facility.ns}"
            assert sum(rss.values()) < RSS_LIMIT_KIB, rss
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.wait(timeout=60) == 0
    finally:
        client.kill()
        client.wait()


def test_release_frees_every_port_and_a_restart_restores_the_session(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    before_a, before_b = facility_a.listening_ports(), facility_b.listening_ports()
    _, consumer = open_tls_session(appliance_a, appliance_b)
    released_producer, released = open_tls_session(appliance_a, appliance_b)

    appliance_b.json("release", released["session_id"])

    entry = ("tcp", split_address(released["entry_points"][0])[1])
    endpoint = ("tcp", split_address(released_producer["data_endpoints"][0])[1])
    wait_until(lambda: entry not in facility_b.listening_ports(), 5, what="the entry point to close")
    wait_until(lambda: endpoint not in facility_a.listening_ports(), 5, what="the data endpoint to close")

    appliance_a.restart()
    appliance_b.restart()

    assert appliance_b.status(consumer["session_id"])["state"] == "ACTIVE"
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=1)
    assert report["end"]["sum_received"]["bits_per_second"] > 0

    appliance_b.json("release", consumer["session_id"])
    wait_until(lambda: facility_b.listening_ports() == before_b, 5, what="B back to its ports before")
    wait_until(lambda: facility_a.listening_ports() == before_a, 5, what="A back to its ports before")
    assert appliance_b.stop() == 0
    assert relay_processes(facility_b) == {}
    assert facility_b.listening_ports() == set()


def test_auto_mode_falls_back_to_tls_when_udp_is_blocked_and_says_why(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    block_udp(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST, "--mode", "auto")
    assert producer["mode"] == "auto"
    assert len(producer["data_endpoints"]) == 2  # QUIC (UDP) and TLS (TCP)

    consumer = appliance_b.json("outbound", producer["ticket"])

    assert consumer["mode"] == "tls"
    status = appliance_b.status(consumer["session_id"])
    assert status["mode"] == "tls"
    assert "fell back to TLS" in status["reason"] and "QUIC" in status["reason"]
    assert appliance_a.status(producer["session_id"])["mode"] == "auto"  # nothing arrived yet
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=1)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
    # The producer side learns the mode from where the traffic arrives.
    seen = wait_until(lambda: appliance_a.status(producer["session_id"])["mode"] == "tls", 5, what="tls at A")
    assert seen and "TLS" in appliance_a.status(producer["session_id"])["reason"]


def test_auto_mode_uses_quic_when_udp_passes(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST, "--mode", "auto")

    consumer = appliance_b.json("outbound", producer["ticket"])

    assert consumer["mode"] == "quic"
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=1)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
    wait_until(lambda: appliance_a.status(producer["session_id"])["mode"] == "quic", 5, what="quic at A")


def block_udp(facility: Facility) -> None:
    """nftables in `facility` drops every UDP packet arriving over the wan link (a UDP-blocking firewall)."""
    drop_arriving(facility, "scistream_test")
