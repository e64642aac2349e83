"""The data plane under adverse conditions: a destination that is not listening, garbage datagrams."""

from __future__ import annotations

import pytest

from .topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    run_iperf_client,
    send_garbage_datagrams,
    start_iperf_server,
    tcp_exchange,
)

pytestmark = pytest.mark.integration


def test_refused_destination_closes_the_connection_and_the_session_works_once_the_app_listens(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    consumer = appliance_b.json("outbound", producer["ticket"])

    outcome = tcp_exchange(facility_b, consumer["entry_points"][0])

    # The entry point accepts, and the connection ends (EOF or reset) when the destination refuses;
    # no data, and no connection left hanging.
    assert outcome.splitlines()[0] in ("CONNECTED", "REFUSED"), outcome
    assert outcome.splitlines()[-1].split()[0] in ("EOF", "RESET", "REFUSED"), outcome
    assert appliance_a.status(producer["session_id"])["state"] == "ACTIVE"
    assert appliance_b.status(consumer["session_id"])["state"] == "ACTIVE"

    start_iperf_server(facility_a)
    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_garbage_datagrams_at_the_data_endpoint_do_not_disturb_the_session(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    consumer = appliance_b.json("outbound", producer["ticket"])

    send_garbage_datagrams(facility_b, producer["data_endpoints"][0])

    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
    assert appliance_a.status(producer["session_id"])["state"] == "ACTIVE"
    assert appliance_a.process is not None and appliance_a.process.poll() is None
