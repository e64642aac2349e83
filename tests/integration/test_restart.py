"""An appliance restart restores its active sessions with the same ports (DESIGN.md §7)."""

from __future__ import annotations

import pytest

from .topology import PRODUCER_DEST, Appliance, Facility, run_iperf_client, start_iperf_server

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
