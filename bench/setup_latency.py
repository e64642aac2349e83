"""Times session setup (inbound at A + outbound at B, over gRPC, no CLI start-up) `--count` times.

Runs inside facility B's namespace (it must reach both appliances); prints a JSON list of seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from appliance.api.scistream import v1 as api
from appliance.cli.client import Target, connect
from appliance.cli.main import MODES
from appliance.control.channel import Trust


async def measure(args: argparse.Namespace) -> list[float]:
    producer = Target(args.producer, Trust(ca_file=Path(args.producer_ca)), args.producer_token)
    consumer = Target(args.consumer, Trust(ca_file=Path(args.consumer_ca)), args.consumer_token)
    request = api.CreateSessionRequest(destinations=[args.dest], mode=MODES[args.mode])
    times: list[float] = []
    async with connect(producer) as a, connect(consumer) as b:
        for _ in range(args.count):
            started = time.perf_counter()
            created = await a.create(request)
            joined = await b.join(api.JoinSessionRequest(ticket=created.ticket))
            times.append(time.perf_counter() - started)
            await b.release(joined.session.session_id)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("producer", "consumer", "producer-ca", "consumer-ca", "producer-token", "consumer-token"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--mode", default="quic")
    parser.add_argument("--count", type=int, default=50)
    print(json.dumps(asyncio.run(measure(parser.parse_args()))))


if __name__ == "__main__":
    main()
