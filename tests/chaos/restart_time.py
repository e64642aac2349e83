"""Measures how long a consumer-side appliance takes from start to SERVING with N sessions whose
producer side is gone (issue 12, defect 6): `.venv/bin/python -m tests.chaos.restart_time [N]`.

Two appliances in this process on 127.0.0.1; N QUIC sessions; the producer side stops; the consumer
side restarts and the time until `health` answers SERVING is printed. Not a test: a measurement."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from appliance.api.scistream import v1 as api
from appliance.control.server import Appliance
from tests.service.conftest import start_facility


async def main(count: int) -> None:
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
            f"{count} sessions with their producer side gone: SERVING={serving} after {took:.2f} s; "
            f"{active} still ACTIVE (retried until --peer-grace)"
        )
        await b.appliance.stop()
        echo.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
