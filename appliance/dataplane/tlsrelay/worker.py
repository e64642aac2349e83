"""A relay process: `python -m appliance.dataplane.tlsrelay.worker FD`.

Serves the commands of the control process on the SOCK_SEQPACKET socket FD, runs the relays of the
sessions it is given on uvloop, and reports their counters. Exits when the control process closes
the socket (or dies), so a relay process never outlives its appliance.

With TLSRELAY_PROFILE=PREFIX in the appliance's environment, each relay process writes a cProfile
profile to PREFIX.PID when it exits (read it with `python -m pstats`): where a relay's time goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

from . import messages
from .relay import Counters
from .sessions import ConsumerRelay, ConsumerSpec, ProducerRelay, ProducerSpec

logger = logging.getLogger("scistream.tlsrelay")
REPORT_INTERVAL = 0.5
PROFILE_VARIABLE = "TLSRELAY_PROFILE"


class Worker:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.relays: dict[str, ProducerRelay | ConsumerRelay] = {}
        self.counters: dict[str, Counters] = {}
        self.done = asyncio.Event()
        self._reported: dict[str, tuple[int, ...]] = {}
        self._seen: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fds: list[int] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._readable)
        reporter = loop.create_task(self._report_loop())
        try:
            await self.done.wait()
        finally:
            reporter.cancel()
            loop.remove_reader(self.channel.fileno())
            for relay in self.relays.values():
                await relay.close()

    def _readable(self) -> None:
        while True:
            try:
                received = messages.receive(self.channel)
            except BlockingIOError:
                return
            except OSError:
                received = None
            if received is None:
                self.done.set()
                return
            message, fds = received
            if message.get("op") == "fds":
                self._fds += fds  # they belong to the next message
                continue
            fds, self._fds = self._fds + fds, []
            task = asyncio.get_running_loop().create_task(self._handle(message, fds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        reply: dict[str, Any] = {"op": "ok", "id": message.get("id")}
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            await self._dispatch(message, socks)
        except Exception as exc:  # reported to the control process, which raises it there
            logger.exception("command %s failed", message.get("op"))
            reply = {"op": "error", "id": message.get("id"), "message": f"{type(exc).__name__}: {exc}"}
            for sock in socks:
                sock.close()
        with contextlib.suppress(OSError):
            messages.send(self.channel, reply)

    async def _dispatch(self, message: dict[str, Any], socks: list[socket.socket]) -> None:
        op, session_id = message["op"], message.get("session", "")
        if op == "producer":
            spec = messages.spec_from_json(ProducerSpec, message["spec"])
            counters = self.counters.setdefault(session_id, Counters())
            relay = ProducerRelay(spec, counters)
            self.relays[session_id] = relay
            await relay.start(socks[0])
        elif op == "consumer":
            cspec = messages.spec_from_json(ConsumerSpec, message["spec"])
            counters = self.counters.setdefault(session_id, Counters())
            consumer = ConsumerRelay(cspec, counters)
            self.relays[session_id] = consumer
            await consumer.start(socks)
        elif op == "authorize":
            relay_ = self.relays.get(session_id)
            if isinstance(relay_, ProducerRelay):
                relay_.authorize(message["peer_cert"].encode())
        elif op == "close":
            closing = self.relays.pop(session_id, None)
            if closing is not None:
                await closing.close()
            self.counters.pop(session_id, None)
            self._reported.pop(session_id, None)
            self._seen.pop(session_id, None)
        elif op == "exit":
            self.done.set()
        else:
            raise ValueError(f"unknown command {op!r}")

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report()

    def report(self) -> None:
        changed: dict[str, list[int]] = {}
        for session_id, c in self.counters.items():
            values = (c.bytes_in, c.bytes_out, c.connections, c.active, c.rejected, c.dropped_datagrams)
            if self._reported.get(session_id) != values:
                self._reported[session_id] = values
                changed[session_id] = list(values)
        seen = self._peers_seen()
        if changed or seen:
            with contextlib.suppress(OSError):
                messages.send(self.channel, {"op": "counters", "sessions": changed, "seen": seen})

    def _peers_seen(self) -> dict[str, float]:
        """Sessions whose peer showed itself since the last report: time.monotonic() it last did (the
        clock is the host's, shared with the control process). An open tunnel connection counts as
        showing itself now."""
        now = time.monotonic()
        changed: dict[str, float] = {}
        for session_id, relay in self.relays.items():
            counters = self.counters.get(session_id)
            seen = now if counters is not None and counters.active > 0 else relay.peer_seen
            if seen > self._seen.get(session_id, 0.0):
                self._seen[session_id] = changed[session_id] = seen
        return changed


def _raise_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    # A signal to the appliance's process group is for the control process, which stops us in order
    # (we exit when it closes our channel, or dies); otherwise it would see us die and restart us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="tlsrelay[%(process)d] %(levelname)s %(message)s")
    _raise_file_limit()
    channel = socket.socket(fileno=int(argv[1]))
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # uvloop is a dependency; this keeps a broken install usable, only slower
        runner = asyncio.run
    profile = os.environ.get(PROFILE_VARIABLE)
    if not profile:
        runner(Worker(channel).run())
        return 0
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        runner(Worker(channel).run())
    finally:
        profiler.disable()
        profiler.dump_stats(f"{profile}.{os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
