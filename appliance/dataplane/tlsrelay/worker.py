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
from typing import Any, Protocol

from . import messages
from .relay import Counters
from .sessions import ConsumerRelay, ConsumerSpec, ProducerRelay, ProducerSpec

logger = logging.getLogger("scistream.tlsrelay")


class Closable(Protocol):
    async def close(self) -> None: ...


REPORT_INTERVAL = 0.5
PROFILE_VARIABLE = "TLSRELAY_PROFILE"


class RelayProcess:
    """What every relay process does: serve the control process's commands, close what it is told
    to, and report counters and when each session's peer side was last seen. Subclasses start and
    authorize the sessions (`_open`, `_authorize`) and read their counters (`_values`, `_peer_seen`)."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.relays: dict[str, Closable] = {}
        self.done = asyncio.Event()
        self._reported: dict[str, tuple[int, ...]] = {}
        self._seen: dict[str, float] = {}
        self._gauged: dict[str, int] = {}
        self._report_pending = False
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
        if op in ("producer", "consumer"):
            await self._open(op, session_id, message, socks)
        elif op == "authorize":
            self._authorize(session_id, message["peer_cert"].encode())
        elif op == "close":
            closing = self.relays.pop(session_id, None)
            if closing is not None:
                await closing.close()
            self._forget(session_id)
            self._reported.pop(session_id, None)
            self._seen.pop(session_id, None)
            self._gauged.pop(session_id, None)
        elif op == "ping":
            pass  # the reply says this process is up and reading
        elif op == "exit":
            self.done.set()
        else:
            raise ValueError(f"unknown command {op!r}")

    async def _open(
        self, op: str, session_id: str, message: dict[str, Any], socks: list[socket.socket]
    ) -> None:
        raise NotImplementedError

    def _authorize(self, session_id: str, peer_cert_pem: bytes) -> None:
        raise NotImplementedError

    def _forget(self, session_id: str) -> None:
        """The session is closed: drop what the subclass keeps for it."""

    def _sessions(self) -> list[str]:
        return list(self.relays)

    def _values(self, session_id: str) -> tuple[int, ...] | None:
        """bytes_in, bytes_out, connections, active, rejected, dropped datagrams."""
        raise NotImplementedError

    def _peer_seen(self, session_id: str, now: float) -> float:
        """time.monotonic() the session's peer side last showed itself."""
        raise NotImplementedError

    def _gauges(self) -> dict[str, int]:
        return {}

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report()

    def report_soon(self) -> None:
        """Reports once the current callbacks are done (several closes in a row: one report)."""
        if not self._report_pending:
            self._report_pending = True
            asyncio.get_running_loop().call_soon(self.report)

    def report(self) -> None:
        self._report_pending = False
        changed: dict[str, list[int]] = {}
        for session_id in self._sessions():
            values = self._values(session_id)
            if values is not None and self._reported.get(session_id) != values:
                self._reported[session_id] = values
                changed[session_id] = list(values)
        seen = self._peers_seen()
        gauges = {k: v for k, v in self._gauges().items() if self._gauged.get(k) != v}
        self._gauged.update(gauges)
        if changed or seen or gauges:
            message = {"op": "counters", "sessions": changed, "seen": seen, "gauges": gauges}
            with contextlib.suppress(OSError):
                messages.send(self.channel, message)

    def _peers_seen(self) -> dict[str, float]:
        """Sessions whose peer showed itself since the last report: time.monotonic() it last did (the
        clock is the host's, shared with the control process)."""
        now = time.monotonic()
        changed: dict[str, float] = {}
        for session_id in self.relays:
            seen = self._peer_seen(session_id, now)
            if seen > self._seen.get(session_id, 0.0):
                self._seen[session_id] = changed[session_id] = seen
        return changed


class Worker(RelayProcess):
    """The TLS mode's relay process, on uvloop."""

    def __init__(self, channel: socket.socket) -> None:
        super().__init__(channel)
        self.counters: dict[str, Counters] = {}

    async def _open(
        self, op: str, session_id: str, message: dict[str, Any], socks: list[socket.socket]
    ) -> None:
        counters = self.counters.setdefault(session_id, Counters())
        if op == "producer":
            spec = messages.spec_from_json(ProducerSpec, message["spec"])
            relay = ProducerRelay(spec, counters)
            self.relays[session_id] = relay
            await relay.start(socks[0])
        else:
            cspec = messages.spec_from_json(ConsumerSpec, message["spec"])
            consumer = ConsumerRelay(cspec, counters)
            self.relays[session_id] = consumer
            await consumer.start(socks)

    def _authorize(self, session_id: str, peer_cert_pem: bytes) -> None:
        relay = self.relays.get(session_id)
        if isinstance(relay, ProducerRelay):
            relay.authorize(peer_cert_pem)

    def _forget(self, session_id: str) -> None:
        self.counters.pop(session_id, None)

    def _sessions(self) -> list[str]:
        return list(self.counters)

    def _values(self, session_id: str) -> tuple[int, ...] | None:
        c = self.counters.get(session_id)
        if c is None:
            return None
        return (c.bytes_in, c.bytes_out, c.connections, c.active, c.rejected, c.dropped_datagrams)

    def _peer_seen(self, session_id: str, now: float) -> float:
        """An open tunnel connection counts as showing itself now."""
        counters = self.counters.get(session_id)
        if counters is not None and counters.active > 0:
            return now
        relay = self.relays[session_id]
        assert isinstance(relay, ProducerRelay | ConsumerRelay)
        return relay.peer_seen


def _raise_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(
    argv: list[str], process: type[RelayProcess] = Worker, *, fast_loop: bool = True, name: str = "tlsrelay"
) -> int:
    """Runs `process` on the channel FD argv[1]: on uvloop with `fast_loop`, else asyncio's loop."""
    # A signal to the appliance's process group is for the control process, which stops us in order
    # (we exit when it closes our channel, or dies); otherwise it would see us die and restart us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"{name}[%(process)d] %(levelname)s %(message)s")
    _raise_file_limit()
    channel = socket.socket(fileno=int(argv[1]))
    runner: Any = asyncio.run
    if fast_loop:
        with contextlib.suppress(ImportError):  # uvloop is a dependency; a broken install runs slower
            import uvloop

            runner = uvloop.run
    profile = os.environ.get(PROFILE_VARIABLE)
    if not profile:
        runner(process(channel).run())
        return 0
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        runner(process(channel).run())
    finally:
        profiler.disable()
        profiler.dump_stats(f"{profile}.{os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
