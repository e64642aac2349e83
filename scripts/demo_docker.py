"""The Docker demo: compose.yaml's `demo` profile, sessions opened with `scistream connect`, iperf3.

Run by `scripts/demo` (which installs Docker and the project first). Builds the image (cached on
re-runs), starts facility A (producer side, `iperf3 -s` behind it) and facility B (consumer side, the
consumer container behind it), measures session setup and throughput, prints them, and removes every
container, network and volume it made, also on Ctrl-C. Shares tests/e2e/topology.py with the tests.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.topology import Demo, build_image, docker_problem, entry_port, received_mbits

SETUP_RUNS = 5
SECONDS = 5


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def timed_connect(demo: Demo, *options: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    session = demo.connect(*options)
    return session, time.perf_counter() - started


def measure_mode(demo: Demo, mode: str) -> list[str]:
    """Setup time, iperf3 TCP and UDP through `mode` sessions; lines for the summary."""
    setups = []
    for _ in range(SETUP_RUNS):
        session, seconds = timed_connect(demo, "--mode", mode)
        setups.append(seconds)
        demo.release("facility-b", session["consumer"]["session_id"])
    setup = statistics.median(setups)
    step(f"{mode}: session setup (scistream connect, wall clock), {SETUP_RUNS} runs: median {setup:.2f} s")

    tcp, _ = timed_connect(demo, "--mode", mode)
    port = entry_port(tcp)
    step(f"{mode}: TCP session; consumer runs iperf3 -c {demo.b_site} -p {port} (facility B's entry point)")
    tcp_report = demo.iperf(port, seconds=SECONDS)
    # iperf3 -u wants its TCP control connection and its UDP data on one port number: a UDP session
    # whose entry point takes the TCP session's port (TCP and UDP ports are separate spaces).
    udp, _ = timed_connect(demo, "--mode", mode, "--protocol", "udp", "--entry-port", str(port))
    step(f"{mode}: UDP session on the same port; iperf3 -u at 50 Mbit/s")
    udp_report = demo.iperf(port, seconds=SECONDS, udp=True, bitrate="50M")
    counters = demo.status("facility-b", tcp["consumer"]["session_id"])
    for session in (tcp, udp):
        demo.release("facility-b", session["consumer"]["session_id"])
    udp_sum = udp_report["end"]["sum"]
    return [
        f"  {mode:<9} session setup (connect)   {setup:.2f} s (median of {SETUP_RUNS})",
        f"  {mode:<9} iperf3 TCP, {SECONDS} s           {received_mbits(tcp_report):.0f} Mbit/s",
        f"  {mode:<9} iperf3 UDP, {SECONDS} s, 50M      {udp_sum['bits_per_second'] / 1e6:.0f} Mbit/s "
        f"received, {udp_sum['lost_percent']:.2f}% lost",
        f"  {mode:<9} TCP session counters at B {counters['bytes_in']} bytes in, {counters['bytes_out']} out",
    ]


def mode_available(demo: Demo, mode: str) -> str | None:
    """None if the appliances offer `mode`, else why not."""
    try:
        session = demo.connect("--mode", mode)
    except RuntimeError as exc:
        return str(exc).split(": ", 1)[-1]
    demo.release("facility-b", session["consumer"]["session_id"])
    return None


def run(demo: Demo, started: float) -> int:
    step("building the appliance image (images/build: base image, wheelhouse, docker build)")
    build = build_image()
    print(build, flush=True)
    image = demo.client.images.get(os.environ.get("SCISTREAM_IMAGE", "scistream/appliance:latest"))
    step("docker compose --profile demo up: facility-a, facility-b, producer (iperf3 -s), consumer")
    up_started = time.perf_counter()
    demo.up()
    step(
        f"both appliances healthy (scistream health = SERVING) {time.perf_counter() - up_started:.1f} s "
        f"after up; A at {demo.a_wan}, B at {demo.b_wan} on the wan network"
    )
    summary = [
        f"  image                          {image.tags[0]}, {image.attrs['Size'] / 1e6:.0f} MB",
        f"  compose up until both healthy  {time.perf_counter() - up_started:.1f} s",
    ]
    summary += measure_mode(demo, "quic")
    summary += measure_mode(demo, "tls")
    why_not = mode_available(demo, "wireguard")
    if why_not is None:
        summary += measure_mode(demo, "wireguard")
    else:
        summary.append(f"  wireguard  not measured: {why_not}")
    print()
    print("What the demo measured (containers on this machine):")
    print("\n".join(summary))
    print(f"  demo wall time so far          {time.time() - started:.0f} s (install, build, up, measure)")
    return 0


def main() -> int:
    why_not = docker_problem()
    if why_not:
        print(f"demo: {why_not}", file=sys.stderr)
        return 1
    started_ns = os.environ.get("SCISTREAM_DEMO_STARTED")
    started = int(started_ns) / 1e9 if started_ns else time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    demo = Demo()
    demo.down()  # leftovers of an interrupted run
    try:
        return run(demo, started)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        demo.down()
        print(
            f"==> cleaned up: containers, networks and volumes removed ({time.time() - started:.0f} s in all)"
        )


if __name__ == "__main__":
    sys.exit(main())
