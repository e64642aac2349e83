"""The fuzz suite's world: two real appliances (producer side A, consumer side B) as processes on
127.0.0.1, a TCP echo app behind them, one QUIC and one TLS session between them, and a background
event loop that keeps gRPC channels open across Hypothesis examples.

Every input sent is counted (`Tally`); the suite prints the totals, the statuses seen and the largest
event-loop lag each appliance measured (its `scistream_event_loop_lag_max_seconds` metric).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.const import Status

from appliance.api.scistream import v1 as api
from appliance.auth import add_token
from appliance.cli.client import ApplianceClient, Target, connect
from appliance.control.channel import Trust
from tests.service.conftest import free_port_block
from tests.service.rawgrpc import Answer, open_raw_channel, raw_call

T = TypeVar("T")

SCISTREAM = Path(sys.executable).parent / "scistream"
FORBIDDEN = {Status.UNKNOWN, Status.INTERNAL}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def examples() -> int:
    """Examples per fuzz test: SCISTREAM_FUZZ_EXAMPLES (default 200; the README says how many a long
    campaign uses)."""
    return int(os.environ.get("SCISTREAM_FUZZ_EXAMPLES", "200"))


class LoopThread:
    """An event loop in a thread, so synchronous Hypothesis tests can await on long-lived channels."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class Tally:
    """What the suite sent and what came back."""

    inputs: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    forbidden: list[str] = field(default_factory=list)

    def count(self, kind: str, n: int = 1) -> None:
        self.inputs[kind] += n

    def answer(self, method: str, answer: Answer) -> None:
        self.statuses[answer.status.name] += 1
        if answer.status in FORBIDDEN:
            self.forbidden.append(f"{method}: {answer.status.name} {answer.message[:200]}")


class ApplianceProcess:
    """`scistream server` on 127.0.0.1 with token auth, TLS, JSON logs and a metrics port."""

    def __init__(self, workdir: Path, name: str, ports: int = 24) -> None:
        base = free_port_block(ports + 2)
        self.name = name
        self.address = f"127.0.0.1:{base}"
        self.metrics_port = base + 1
        self.port_range = f"{base + 2}-{base + 1 + ports}"
        self.state_dir = workdir / name
        self.tokens_file = workdir / f"{name}-tokens.yaml"
        self.token = add_token(self.tokens_file, "alice", ["admin"])
        self.log_file = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "control.crt"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
        # A 1.2.1 `req` waits for its hello: 1 s, not 180, when a fuzzed body happens to be a valid req.
        env["SCISTREAM_LEGACY_HELLO_TIMEOUT"] = "1"
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [SCISTREAM, "server", "--listen", self.address, "--advertise", "127.0.0.1",
                 "--state-dir", self.state_dir, "--auth", "tokens", "--tokens-file", self.tokens_file,
                 "--port-range", self.port_range, "--data-bind", "127.0.0.1",
                 "--metrics-port", str(self.metrics_port), "--log-format", "json", "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.is_file() else ""

    def tracebacks(self) -> list[str]:
        return [line[:300] for line in self.log_text().splitlines() if TRACEBACK.search(line)]

    def stalls(self) -> list[str]:
        """The appliance's `event loop blocked` warnings (lag over 100 ms), as lag/CPU pairs."""
        found = re.findall(r'"lag_ms": (\d+), "loop_cpu_ms": (\d+)', self.log_text())
        return [f"{lag} ms (loop CPU {cpu} ms)" for lag, cpu in found]

    def loop_lag_max(self) -> float:
        """The appliance's own measurement: the largest event-loop lag since it started, in seconds."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        match = re.search(r"^scistream_event_loop_lag_max_seconds (\S+)$", text, re.M)
        assert match, "no scistream_event_loop_lag_max_seconds metric"
        return float(match.group(1))

    def target(self) -> Target:
        return Target(self.address, Trust(ca_file=self.ca_file), self.token, timeout=20)


class EchoServer(socketserver.ThreadingTCPServer):
    """The producer app: echoes every byte until the client half-closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        threading.Thread(target=self.serve_forever, name="echo", daemon=True).start()

    @property
    def destination(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(30)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@dataclass
class Session:
    mode: str
    producer: api.Session
    consumer: api.Session
    ticket: str


@dataclass(repr=False)
class World:
    a: ApplianceProcess
    b: ApplianceProcess
    echo: EchoServer
    loop: LoopThread
    tally: Tally
    channels: dict[str, Channel]
    sessions: dict[str, Session]
    pending_ticket: str  # of a PENDING session at A, for the mutated tickets

    def __repr__(self) -> str:  # Hypothesis prints the fixture with every falsifying example
        return f"World(a={self.a.address}, b={self.b.address})"

    def call(self, appliance: ApplianceProcess, method: str, body: bytes, **kw: Any) -> Answer:
        """One raw gRPC call, counted; the answer's status is recorded."""
        channel = self.channels[appliance.name]
        answer = self.loop.run(raw_call(channel, method, body, token=appliance.token, timeout=20, **kw))
        self.tally.count("grpc")
        self.tally.answer(method, answer)
        return answer

    async def _client_call(self, appliance: ApplianceProcess, what: str, *args: Any) -> Any:
        async with connect(appliance.target()) as client:
            method = getattr(ApplianceClient, what)
            return await method(client, *args)

    def client(self, appliance: ApplianceProcess, what: str, *args: Any) -> Any:
        return self.loop.run(self._client_call(appliance, what, *args))

    def healthy(self, appliance: ApplianceProcess) -> bool:
        return bool(self.client(appliance, "serving"))

    def assert_well(self) -> None:
        """Both appliances alive, serving, with no traceback in their logs."""
        for appliance in (self.a, self.b):
            assert appliance.alive(), f"appliance {appliance.name} died:\n{appliance.log_text()[-3000:]}"
            assert self.healthy(appliance), f"appliance {appliance.name} is not SERVING"
            assert not appliance.tracebacks(), (
                f"traceback in {appliance.name}'s log: {appliance.tracebacks()}"
            )


async def _wait_serving(appliance: ApplianceProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        assert appliance.alive(), appliance.log_text()
        if appliance.ca_file.is_file():
            try:
                async with connect(appliance.target()) as client:
                    if await client.serving():
                        return
            except Exception as exc:  # not up yet
                last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"appliance {appliance.name} not serving: {last}\n{appliance.log_text()}")


async def _open_session(a: ApplianceProcess, b: ApplianceProcess, dest: str, mode: api.Mode) -> Session:
    async with connect(a.target()) as producer, connect(b.target()) as consumer:
        created = await producer.create(api.CreateSessionRequest(destinations=[dest], mode=mode))
        joined = await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
        return Session(mode.name, created.session, joined.session, created.ticket)


def build_world(workdir: Path) -> World:
    a, b = ApplianceProcess(workdir, "a"), ApplianceProcess(workdir, "b")
    loop = LoopThread()
    for appliance in (a, b):
        appliance.start()
    try:
        for appliance in (a, b):
            loop.run(_wait_serving(appliance))
        echo = EchoServer()
        sessions = {
            name: loop.run(_open_session(a, b, echo.destination, mode))
            for name, mode in (("quic", api.Mode.QUIC), ("tls", api.Mode.TLS))
        }

        async def channels() -> dict[str, Channel]:
            return {p.name: open_raw_channel(p.address, p.ca_file) for p in (a, b)}

        async def pending() -> str:
            async with connect(a.target()) as producer:
                request = api.CreateSessionRequest(destinations=[echo.destination], mode=api.Mode.QUIC)
                return (await producer.create(request)).ticket

        return World(a, b, echo, loop, Tally(), loop.run(channels()), sessions, loop.run(pending()))
    except BaseException:
        for appliance in (a, b):
            appliance.stop()
        loop.close()
        raise


def close_world(world: World) -> None:
    async def close_channels() -> None:
        for channel in world.channels.values():
            channel.close()

    world.loop.run(close_channels())
    for appliance in (world.b, world.a):
        appliance.stop()
    world.echo.shutdown()
    world.echo.server_close()
    world.loop.close()


def split_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def echo_through(entry_point: str, payload: bytes, timeout: float = 20) -> bytes:
    """Sends `payload` to an entry point, half-closes, returns everything that comes back."""
    with socket.create_connection(split_address(entry_point), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def assert_sessions_carry_data(world: World) -> None:
    for session in world.sessions.values():
        payload = f"still working: {session.mode}".encode() * 100
        assert echo_through(session.consumer.entry_points[0], payload) == payload, session.mode
