"""Measures how long a consumer-side appliance takes from start to SERVING with N sessions whose
producer side is gone (issue 12, defect 6). Not a test: a measurement.

    .venv/bin/python -m tests.chaos.restart_time [N]          in-process appliances on 127.0.0.1
    .venv/bin/python -m tests.chaos.restart_time N --netns    `scistream server` processes in network
                                                              namespaces (root), start to `scistream health`
    .venv/bin/python -m tests.chaos.restart_time 0 --carry    per mode: producer side SIGKILLed and
                                                              restarted; healthy to the first connection
                                                              the consumer side's entry point carries
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from appliance.api.scistream import v1 as api
from appliance.control.server import Appliance
from tests.integration import topology as topo
from tests.service.conftest import start_facility


async def in_process(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        echo = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        dest = f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"
        a = await start_facility(Path(tmp), "a", ports=count + 4)
        b = await start_facility(Path(tmp), "b", ports=count + 4)
        async with a.client() as producer, b.client() as consumer:
            for _ in range(count):
                created = await producer.create(api.CreateSessionRequest(destinations=[dest]))
                await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
        await a.appliance.stop()
        await b.appliance.stop()
        b.appliance = Appliance(b.appliance.settings)
        began = time.monotonic()
        await b.appliance.start()
        async with b.client() as client:
            serving = await client.serving()
            listed = await client.list()
        took = time.monotonic() - began
        active = sum(1 for s in listed if s.state == api.State.ACTIVE)
        print(
            f"in-process: {count} sessions with their producer side gone: SERVING={serving} after "
            f"{took:.2f} s; {active} still ACTIVE (retried until --peer-grace)"
        )
        await b.appliance.stop()
        echo.close()


def in_namespaces(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        topology = topo.create_topology(Path(tmp))
        try:
            span = f"5100-{5100 + count + 10}"
            a, b = topo.Appliance(topology.a, port_range=span), topo.Appliance(topology.b, port_range=span)
            topo.start_appliances(a, b)
            for _ in range(count):
                producer = a.json("inbound", "--dest", "127.0.0.1:7000")
                b.json("outbound", producer["ticket"])
            a.stop()
            b.stop()
            began = time.monotonic()
            b.start(timeout=120)  # spawn, then `scistream health` until SERVING
            took = time.monotonic() - began
            states = [s["state"] for s in b.sessions()]
            print(
                f"processes in namespaces: {count} sessions with their producer side gone: healthy "
                f"{took:.2f} s after spawn (interpreter start and health polling included); "
                f"{states.count('ACTIVE')} still ACTIVE"
            )
            b.stop()
        finally:
            topo.destroy_topology(topology)
            topo.sweep()


def carry_after_sigkill() -> None:
    echo = (
        "import socket\ns=socket.create_server(('127.0.0.1',7000))\n"
        "while True:\n c,_=s.accept(); c.sendall(c.recv(99)); c.close()\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        topology = topo.create_topology(Path(tmp))
        try:
            a, b = topo.Appliance(topology.a), topo.Appliance(topology.b)
            topo.start_appliances(a, b)
            topology.a.spawn(sys.executable, "-c", echo)
            topology.a.wait_listening("tcp", 7000)
            for mode in ("quic", "tls", "wireguard"):
                producer = a.json("inbound", "--dest", "127.0.0.1:7000", "--mode", mode)
                entry = b.json("outbound", producer["ticket"])["entry_points"][0]
                assert a.process is not None
                os.kill(a.process.pid, signal.SIGKILL)
                a.process.wait()
                a.start()
                healthy = time.monotonic()
                tries = 1
                while topo.tcp_exchange(topology.b, entry, 5) != "CONNECTED\nDATA 6":
                    tries += 1
                took = time.monotonic() - healthy
                print(f"{mode}: first connection carried {took:.2f} s after healthy ({tries} tries)")
                a.json("release", producer["session_id"])
            a.stop()
            b.stop()
        finally:
            topo.destroy_topology(topology)
            topo.sweep()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    if "--carry" in sys.argv:
        carry_after_sigkill()
    elif "--netns" in sys.argv:
        in_namespaces(n)
    else:
        asyncio.run(in_process(n))
