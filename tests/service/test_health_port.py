"""`--health-port`: grpc.health.v1 alone, in plaintext, for Kubernetes' native gRPC probes (which speak no
TLS); the control services stay on the TLS control port only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from appliance.api.scistream import v1 as api
from appliance.errors import Unavailable

from .conftest import free_port_block, start_facility


async def _check(port: int, service: str = "") -> int:
    channel = Channel("127.0.0.1", port)
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=5)
    finally:
        channel.close()
    assert reply is not None
    return int(reply.status)


async def test_the_health_port_answers_serving_in_plaintext_and_serves_nothing_else(tmp_path: Path) -> None:
    port = free_port_block(1)
    facility = await start_facility(tmp_path, "a", health_port=port)
    try:
        assert await _check(port) == HealthCheckResponse.SERVING  # what a probe without `service` asks
        assert await _check(port, "scistream.v1.Control") == HealthCheckResponse.SERVING
        channel = Channel("127.0.0.1", port)
        try:
            with pytest.raises(GRPCError) as raised:
                await api.ControlStub(channel).list_sessions(api.ListSessionsRequest(), timeout=5)
        finally:
            channel.close()
        # grpclib's server answers UNIMPLEMENTED ("Method not found") in a headers-only response without
        # a content-type, which grpclib's client reports as UNKNOWN: either way the call was not served.
        assert raised.value.status in (Status.UNIMPLEMENTED, Status.UNKNOWN)
        assert await _check(port) == HealthCheckResponse.SERVING
    finally:
        await facility.appliance.stop()
    # A stopped appliance no longer answers its probes.
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


async def test_a_health_port_in_use_fails_the_start_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable, match=f"cannot listen on health port {port}"):
            await start_facility(tmp_path, "a", health_port=port)
    # The state directory was released: another appliance can have it.
    facility = await start_facility(tmp_path, "a")
    await facility.appliance.stop()
