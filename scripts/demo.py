"""The demo: two facilities as network namespaces, a QUIC session between their appliances, iperf3 through it.

Run by `scripts/demo` (which installs what is missing first). Prints what it measured; removes everything it
made, also on Ctrl-C. It shares the test suite's topology code, so the demo shows what the tests check.
"""

from __future__ import annotations

import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    create_topology,
    destroy_topology,
    have_tools,
    run_iperf_client,
    start_appliances,
    start_iperf_server,
)

MODES = ("quic", "tls", "wireguard")


def timed(appliance: Appliance, command: str, *args: str) -> tuple[Any, float]:
    started = time.perf_counter()
    result = appliance.json(command, *args)
    return result, time.perf_counter() - started


def mbits(report: dict[str, Any]) -> float:
    end = report["end"]
    summary = end.get("sum_received") or end.get("sum")
    return float(summary["bits_per_second"]) / 1e6


def udp_summary(report: dict[str, Any]) -> str:
    s = report["end"]["sum"]
    return f"{s['bits_per_second'] / 1e6:.0f} Mbit/s received, {s['lost_percent']:.2f}% lost"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def open_session(
    a: Appliance, b: Appliance, inbound: tuple[str, ...] = (), outbound: tuple[str, ...] = ()
) -> tuple[str, str, float]:
    """Inbound at A, outbound at B; returns B's session id, its entry point and the setup wall time."""
    created, t_in = timed(a, "inbound", "--dest", PRODUCER_DEST, *inbound)
    joined, t_out = timed(b, "outbound", created["ticket"], *outbound)
    return joined["session_id"], joined["entry_points"][0], t_in + t_out


def main() -> int:
    why_not = have_tools()
    if why_not:
        print(f"demo: {why_not}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="scistream-demo-") as workdir:
        topology = create_topology(Path(workdir))
        try:
            return run(topology.a, topology.b)
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            destroy_topology(topology)
            print("==> cleaned up: appliances stopped, namespaces removed")


def run(fa: Facility, fb: Facility) -> int:
    step(f"facility A ({fa.ns}, {fa.wan_ip}) and facility B ({fb.ns}, {fb.wan_ip}) joined by a veth 'wan'")
    a, b = Appliance(fa), Appliance(fb)
    start_appliances(a, b)
    step(f"appliances serving at {a.address} and {b.address} (TLS, token auth)")
    start_iperf_server(fa)
    step(f"producer app: iperf3 -s at {PRODUCER_DEST} in facility A")

    summary = []
    for mode in MODES:
        try:
            summary += measure_mode(a, b, fb, mode)
        except AssertionError as exc:  # a mode this host cannot run (e.g. no wireguard-go): say why
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            step(f"{mode}: not measured: {why}")
            summary.append(f"  {mode:<9} not measured: {why}")
    producer_states = {s["state"] for s in a.sessions()}

    print()
    print("What the demo measured (this machine):")
    print("\n".join(summary))
    print(f"  producer-side sessions after release: {', '.join(sorted(producer_states))}")
    return 0


def measure_mode(a: Appliance, b: Appliance, fb: Facility, mode: str) -> list[str]:
    """Setup time, iperf3 TCP and UDP through `mode` sessions; lines for the summary."""
    options = ("--mode", mode)
    setups = []
    for _ in range(5):
        session_id, _, setup = open_session(a, b, options)
        setups.append(setup)
        b.json("release", session_id)
    step(
        f"{mode}: session setup (scistream inbound + outbound, wall clock incl. CLI start), 5 runs: "
        f"median {statistics.median(setups):.2f} s, min {min(setups):.2f} s, max {max(setups):.2f} s"
    )

    tcp_id, entry, _ = open_session(a, b, options)
    step(f"{mode}: TCP session {tcp_id}: consumer app connects to entry point {entry}")
    tcp = run_iperf_client(fb, entry, seconds=5, timeout=60)

    # iperf3 -u needs its TCP control connection and its UDP data on the same port: a UDP session whose
    # entry point takes the TCP session's port number (TCP and UDP ports are separate spaces).
    udp_args = ("--entry-port", entry.rsplit(":", 1)[1])
    udp_id, udp_entry, _ = open_session(a, b, (*options, "--protocol", "udp"), udp_args)
    step(f"{mode}: UDP session {udp_id}: entry point {udp_entry}")
    udp = run_iperf_client(fb, entry, seconds=5, udp=True, bitrate="50M", timeout=60)

    traffic = b.status(tcp_id)
    for session_id in (tcp_id, udp_id):
        b.json("release", session_id)
    return [
        f"  {mode:<9} session setup, inbound + outbound   {statistics.median(setups):.2f} s (median of 5)",
        f"  {mode:<9} iperf3 TCP, 5 s, one stream          {mbits(tcp):.0f} Mbit/s",
        f"  {mode:<9} iperf3 UDP, 5 s, offered 50 Mbit/s   {udp_summary(udp)}",
        f"  {mode:<9} TCP session counters at B           {traffic['bytes_in']} bytes in, "
        f"{traffic['bytes_out']} out",
    ]


if __name__ == "__main__":
    sys.exit(main())
