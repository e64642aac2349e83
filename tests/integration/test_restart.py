"""An appliance restart restores its active sessions with the same ports (DESIGN.md §7)."""

from __future__ import annotations

import os
import signal

import pytest

from .topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    run_iperf_client,
    start_iperf_server,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_consumer_side_restart_restores_the_session_on_the_same_entry_point(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    consumer = appliance_b.json("outbound", producer["ticket"])

    appliance_b.restart()

    restored = appliance_b.status(consumer["session_id"])
    assert restored["state"] == "ACTIVE"
    assert restored["entry_points"] == consumer["entry_points"]
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_producer_side_restart_restores_the_session_and_new_connections_work(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    consumer = appliance_b.json("outbound", producer["ticket"])

    appliance_a.restart()

    restored = appliance_a.status(producer["session_id"])
    assert restored["state"] == "ACTIVE"
    assert restored["data_endpoints"] == producer["data_endpoints"]
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_sigterm_stops_the_appliance_cleanly_and_frees_its_sockets(
    appliance_a: Appliance, appliance_b: Appliance, facility_b: Facility
) -> None:
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    appliance_b.json("outbound", producer["ticket"])

    assert appliance_b.stop() == 0

    assert facility_b.listening_ports() == set()


def _carries(facility: Facility, entry_point: str) -> bool:
    try:
        report = run_iperf_client(facility, entry_point, seconds=1)
    except AssertionError:
        return False
    return bool(report["end"]["sum_received"]["bits_per_second"] > 0)


@pytest.mark.parametrize("mode", ["quic", "tls", "wireguard"])
def test_producer_sigkill_and_restart_keeps_the_session_on_the_same_entry_points(
    mode: str, appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    """A crash, not a clean stop: what the killed process ran (wireguard-go) is still there when the
    new one restores the session, and must not stop it from binding the same data endpoint."""
    start_iperf_server(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST, "--mode", mode)
    consumer = appliance_b.json("outbound", producer["ticket"])
    assert appliance_a.process is not None
    os.kill(appliance_a.process.pid, signal.SIGKILL)
    appliance_a.process.wait(timeout=10)

    appliance_a.start()

    restored = appliance_a.status(producer["session_id"])
    assert restored["state"] == "ACTIVE", restored
    assert restored["data_endpoints"] == producer["data_endpoints"]
    entry = consumer["entry_points"][0]
    wait_until(lambda: _carries(facility_b, entry), 60, interval=1, what=f"{mode} entry point to carry")
    assert appliance_b.status(consumer["session_id"])["state"] == "ACTIVE"
