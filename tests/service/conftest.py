"""Two real appliances in this process, on 127.0.0.1, with token auth and TLS, plus clients for them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.api.scistream import v1 as api
from appliance.auth import add_token
from appliance.cli.client import ApplianceClient, Target, connect
from appliance.config import load_settings
from appliance.control.channel import Trust
from appliance.control.server import Appliance


def free_port_block(size: int) -> int:
    """The first of `size` consecutive ports that are free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + size > 65535:
            continue
        try:
            for port in range(first, first + size):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free port block")


@dataclass
class Facility:
    appliance: Appliance
    address: str
    ca_file: Path
    tokens: dict[str, str]
    port_range: tuple[int, int]

    def client(self, subject: str | None = "alice") -> AbstractAsyncContextManager[ApplianceClient]:
        token = self.tokens[subject] if subject else None
        return connect(Target(self.address, Trust(ca_file=self.ca_file), token, timeout=15))


async def start_facility(tmp_path: Path, name: str, ports: int = 8, **overrides: Any) -> Facility:
    """An appliance on 127.0.0.1 with its own port block; `overrides` set other Settings fields."""
    base = free_port_block(ports + 1)
    state_dir = tmp_path / name
    tokens_file = tmp_path / f"{name}-tokens.yaml"
    tokens = {
        "alice": add_token(tokens_file, "alice", []),
        "bob": add_token(tokens_file, "bob", []),
        "root": add_token(tokens_file, "root", ["admin"]),
    }
    fields: dict[str, Any] = {
        "listen": f"127.0.0.1:{base}",
        "port_range": f"{base + 1}-{base + ports}",
        "data_bind": "127.0.0.1",
        "state_dir": state_dir,
        "auth": "tokens",
        "tokens_file": tokens_file,
        "peer_timeout": 5.0,
    }
    settings = load_settings(**{**fields, **overrides})
    appliance = Appliance(settings)
    await appliance.start()
    return Facility(
        appliance, f"127.0.0.1:{base}", state_dir / "tls" / "control.crt", tokens, (base + 1, base + ports)
    )


@pytest.fixture
async def facilities(tmp_path: Path) -> AsyncIterator[tuple[Facility, Facility]]:
    """(producer side, consumer side)."""
    a = await start_facility(tmp_path, "a")
    b = await start_facility(tmp_path, "b")
    try:
        yield a, b
    finally:
        await b.appliance.stop()
        await a.appliance.stop()


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    """A producer app: a TCP echo server; yields its destination HOST:PORT."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


async def open_session(
    pair: tuple[Facility, Facility], dest: str, **fields: object
) -> tuple[api.CreateSessionResponse, api.Session]:
    """Inbound at the producer side A, outbound at the consumer side B (subject alice)."""
    a, b = pair
    async with a.client() as producer, b.client() as consumer:
        request = api.CreateSessionRequest(destinations=[dest], **fields)  # type: ignore[arg-type]
        created = await producer.create(request)
        joined = await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
    return created, joined.session


async def echo_through(entry_point: str, payload: bytes) -> bytes:
    """Sends `payload` to an entry point, half-closes, returns all that comes back."""
    host, port = entry_point.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


@contextlib.asynccontextmanager
async def facility_pair(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Facility, Facility]]:
    """Facilities "a" and "b" with the same `overrides`; both appliances stopped on the way out
    (stopping is idempotent, so a test may stop or replace either one itself)."""
    a = await start_facility(tmp_path, "a", **overrides)
    try:
        b = await start_facility(tmp_path, "b", **overrides)
        try:
            yield a, b
        finally:
            await b.appliance.stop()
    finally:
        await a.appliance.stop()
