"""Opening grpclib channels to an appliance, and turning their errors into ours."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError

from appliance.control.tls import ca_context, pinned_context
from appliance.errors import ApplianceError, DeadlineExceeded, Unavailable, from_status
from appliance.sessions.model import Address

T = TypeVar("T")


@dataclass(frozen=True)
class Trust:
    """How a client verifies the appliance it talks to."""

    ca_file: Path | None = None
    fingerprint: str = ""
    insecure: bool = False  # plaintext control channel (development only)


async def open_channel(
    address: str, trust: Trust, timeout: float = 10.0, codec: CodecBase | None = None
) -> Channel:
    target = Address.parse(address, what="appliance address")
    context: ssl.SSLContext | None = None
    if trust.insecure:
        context = None
    elif trust.fingerprint:
        context = await pinned_context(target.host, target.port, trust.fingerprint, timeout)
    elif trust.ca_file:
        context = ca_context(trust.ca_file)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.set_alpn_protocols(["h2"])
    return Channel(target.host, target.port, ssl=context, codec=codec)


@asynccontextmanager
async def channel(address: str, trust: Trust, timeout: float = 10.0) -> AsyncIterator[Channel]:
    ch = await open_channel(address, trust, timeout)
    try:
        yield ch
    finally:
        ch.close()


async def call(awaitable: Awaitable[T], what: str = "appliance") -> T:
    """Awaits a stub call, mapping transport and gRPC failures to ApplianceError."""
    try:
        return await awaitable
    except GRPCError as exc:
        raise from_status(exc.status, exc.message or exc.status.name) from None
    except TimeoutError:
        raise DeadlineExceeded(f"{what} did not answer in time") from None
    except ssl.SSLError as exc:
        hint = " (is it running with --insecure?)" if exc.reason == "WRONG_VERSION_NUMBER" else ""
        raise Unavailable(f"TLS with {what} failed: {exc.reason or exc}{hint}") from None
    except (OSError, StreamTerminatedError) as exc:
        raise Unavailable(f"cannot reach {what}: {exc}") from None
    except ApplianceError:
        raise
