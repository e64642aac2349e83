"""The control process's side of the relay processes: starts them on first use, hands each session's
sockets and settings to them, collects counters, and restarts a process that dies (replaying its
sessions from the sockets the control process keeps)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from . import messages

logger = logging.getLogger("scistream.tlsrelay")
REPLY_TIMEOUT = 15.0


class WorkerError(Exception):
    """A relay process refused or failed a command, or did not answer."""


@dataclass
class _Registration:
    """What it takes to (re)start one session in a relay process."""

    op: str
    spec: dict[str, Any]
    socks: dict[int, list[socket.socket]]  # relay process index → the sockets it serves

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(self.socks)

    peer_cert: str = ""


@dataclass
class _Worker:
    index: int
    channel: socket.socket
    process: subprocess.Popen[bytes]
    waiters: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    counters: dict[str, list[int]] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # session → peer last seen (monotonic)
    gauges: dict[str, int] = field(default_factory=dict)  # session → QUIC packet size in use


class WorkerPool:
    """`size` relay processes (0: one per core), each `python -m MODULE FD`."""

    def __init__(self, size: int = 0, module: str = "appliance.dataplane.tlsrelay.worker") -> None:
        self.size = size if size > 0 else (os.cpu_count() or 1)
        self._module = module
        self._workers: list[_Worker | None] = [None] * self.size
        self._sessions: dict[str, _Registration] = {}
        self._retired: dict[str, list[int]] = {}  # counters of relay processes that died
        self._ids = itertools.count(1)
        self._closing = False
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[None]] = set()

    # ---- sessions --------------------------------------------------------------------------

    async def open(
        self, session_id: str, op: str, spec: dict[str, Any], socks: dict[int, list[socket.socket]]
    ) -> None:
        """Starts the session in the relay processes `socks` names, each with its sockets. The pool
        keeps the sockets (and closes them with the session), to restart a relay process that dies."""
        await self._ensure_started()
        registration = _Registration(op, spec, socks)
        self._sessions[session_id] = registration
        try:
            await asyncio.gather(*(self._start_session(i, session_id, registration) for i in socks))
        except BaseException:
            await self.close_session(session_id)
            raise

    def authorize(self, session_id: str, peer_cert_pem: bytes) -> None:
        """Admits the session's consumer side. Sent at once (no wait for replies): each relay process
        applies it before any connection it accepts afterwards."""
        registration = self._sessions[session_id]
        registration.peer_cert = peer_cert_pem.decode()
        message = {"op": "authorize", "session": session_id, "peer_cert": registration.peer_cert}
        for index in registration.workers:
            worker = self._workers[index]
            if worker is not None:
                with contextlib.suppress(OSError):
                    messages.send(worker.channel, {**message, "id": next(self._ids)})

    async def close_session(self, session_id: str) -> None:
        """Stops the session everywhere and closes the control process's copies of its sockets."""
        registration = self._sessions.pop(session_id, None)
        self._retired.pop(session_id, None)
        if registration is None:
            return
        with contextlib.suppress(WorkerError):
            await asyncio.gather(
                *(self._call(i, {"op": "close", "session": session_id}) for i in registration.workers)
            )
        for worker in self._workers:
            if worker is not None:
                worker.counters.pop(session_id, None)
                worker.seen.pop(session_id, None)
                worker.gauges.pop(session_id, None)
        for socks in registration.socks.values():
            for sock in socks:
                sock.close()

    def counters(self, session_id: str) -> list[int]:
        """bytes_in, bytes_out, connections, active, rejected, dropped datagrams (all processes)."""
        total = list(self._retired.get(session_id, [0] * 6))
        for worker in self._workers:
            if worker is not None:
                values = worker.counters.get(session_id)
                if values:
                    total = [a + b for a, b in zip(total, values, strict=True)]
        return total

    def peer_seen(self, session_id: str) -> float:
        """time.monotonic() when a relay process last saw the session's peer side (0: never)."""
        return max((w.seen.get(session_id, 0.0) for w in self._workers if w is not None), default=0.0)

    def counters_by_process(self, session_id: str) -> dict[int, list[int]]:
        """The session's counters in each running relay process that reported some (by index)."""
        return {
            w.index: list(w.counters[session_id])
            for w in self._workers
            if w is not None and session_id in w.counters
        }

    def gauge(self, session_id: str) -> int:
        """The smallest value other than 0 the session's relay processes report for it (QUIC: the
        packet size; a connection that met a black hole shows, though the others may be idle)."""
        values = [w.gauges.get(session_id, 0) for w in self._workers if w is not None]
        return min((v for v in values if v), default=0)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w is not None]

    async def close(self) -> None:
        """Stops every relay process (their sessions end with them)."""
        self._closing = True
        for session_id in list(self._sessions):
            await self.close_session(session_id)
        for index, worker in enumerate(self._workers):
            if worker is not None:
                self._workers[index] = None
                await self._stop(worker)

    # ---- processes -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the relay processes now rather than at the first session, and waits until each
        answers: the first session then finds them ready."""
        await self._ensure_started()
        try:
            await asyncio.gather(*(self._call(i, {"op": "ping"}) for i in range(self.size)))
        except WorkerError as exc:
            raise WorkerError(f"a relay process did not start: {exc}") from None

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            for index in range(self.size):
                if self._workers[index] is None:
                    self._workers[index] = self._spawn(index)

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", self._module, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(index, ours, process)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, worker)
        logger.info("relay process %d started (pid %d)", index, process.pid)
        return worker

    def _readable(self, worker: _Worker) -> None:
        while True:
            try:
                received = messages.receive(worker.channel)
            except BlockingIOError:
                return
            except OSError:
                received = None
            if received is None:
                asyncio.get_running_loop().remove_reader(worker.channel.fileno())
                task = asyncio.ensure_future(self._lost(worker))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            message, fds = received
            for fd in fds:
                os.close(fd)
            if message.get("op") == "counters":
                worker.counters.update(message["sessions"])
                worker.seen.update(message.get("seen", {}))
                worker.gauges.update(message.get("gauges", {}))
            else:
                waiter = worker.waiters.pop(message.get("id", 0), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)

    async def _lost(self, worker: _Worker) -> None:
        """A relay process exited: fail its pending calls; unless closing, restart it and its sessions."""
        for waiter in worker.waiters.values():
            if not waiter.done():
                waiter.set_exception(WorkerError(f"relay process {worker.index} exited"))
        worker.channel.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(worker.process.wait, 5)
        if self._closing or self._workers[worker.index] is not worker:
            return
        logger.warning("relay process %d exited (%s); restarting it", worker.index, worker.process.returncode)
        for session_id, values in worker.counters.items():
            old = self._retired.get(session_id, [0] * 6)
            self._retired[session_id] = [a + b for a, b in zip(old, values, strict=True)]
            self._retired[session_id][3] = 0  # its connections are gone
        replacement = self._workers[worker.index] = self._spawn(worker.index)
        for session_id, registration in list(self._sessions.items()):
            if replacement.index in registration.workers:
                with contextlib.suppress(WorkerError):
                    await self._start_session(replacement.index, session_id, registration, replay=True)

    async def _start_session(
        self, index: int, session_id: str, registration: _Registration, *, replay: bool = False
    ) -> None:
        """`replay`: the relay process restarts a session it ran before it died, without waiting
        for the peer side."""
        message: dict[str, Any] = {
            "op": registration.op,
            "session": session_id,
            "spec": registration.spec,
            "worker": index,
            "replay": replay,
        }
        if registration.peer_cert:
            message["spec"] = {**registration.spec, "peer_cert_pem": _b64(registration.peer_cert)}
        await self._call(index, message, [s.fileno() for s in registration.socks[index]])

    async def _call(self, index: int, message: dict[str, Any], fds: list[int] | None = None) -> None:
        worker = self._workers[index]
        if worker is None:
            raise WorkerError(f"relay process {index} is not running")
        request_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.waiters[request_id] = waiter
        try:
            messages.send(worker.channel, {**message, "id": request_id}, fds or [])
            reply = await asyncio.wait_for(waiter, REPLY_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise WorkerError(f"relay process {index} did not answer: {exc}") from None
        finally:
            worker.waiters.pop(request_id, None)
        if reply.get("op") != "ok":
            raise WorkerError(reply.get("message", "relay process failed"))

    async def _stop(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.channel.shutdown(socket.SHUT_RDWR)  # EOF: the process exits
        try:
            await asyncio.to_thread(worker.process.wait, 5)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            await asyncio.to_thread(worker.process.wait, 5)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
