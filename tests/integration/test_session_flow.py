"""A session end to end: inbound at the producer side, outbound at the consumer side, traffic, release.

The producer app is `iperf3 -s` on 127.0.0.1:5201 in facility A; the consumer app is `iperf3 -c` in
facility B, pointed at the entry point the consumer-side appliance returns.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    assert_upload_counted,
    fingerprint_of_cert,
    run_iperf_client,
    start_iperf_server,
    wait_equal,
    wait_until,
)

pytestmark = pytest.mark.integration

CONTRACT_INBOUND = {"session_id", "ticket", "mode", "protocol", "state", "destinations", "data_endpoints"}
CONTRACT_OUTBOUND = {"session_id", "mode", "protocol", "state", "entry_points"}


def open_session(a: Appliance, b: Appliance, *inbound_args: str, outbound_args: tuple[str, ...] = ()) -> Any:
    """inbound at `a` then outbound at `b`; returns (producer half, consumer half) as printed."""
    producer = a.json("inbound", "--dest", PRODUCER_DEST, *inbound_args)
    consumer = b.json("outbound", producer["ticket"], *outbound_args)
    return producer, consumer


def assert_traffic_counted(appliance: Appliance, session_id: str) -> None:
    def counted() -> Any:
        s = appliance.status(session_id)
        return s if s["bytes_in"] > 0 and s["bytes_out"] > 0 else None

    session = wait_until(counted, 5, interval=0.2, what=f"traffic counters of {session_id}")
    assert session["state"] == "ACTIVE"


def test_inbound_prints_a_pending_session_with_ticket_and_data_endpoint(appliance_a: Appliance) -> None:
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)

    assert producer.keys() >= CONTRACT_INBOUND
    assert producer["ticket"].startswith("sst1.")
    assert producer["mode"] == "quic"
    assert producer["protocol"] == "tcp"
    assert producer["state"] == "PENDING"
    assert producer["destinations"] == [PRODUCER_DEST]
    assert producer["data_endpoints"] == [f"{appliance_a.facility.wan_ip}:5100"]
    assert appliance_a.status(producer["session_id"])["state"] == "PENDING"


def test_outbound_activates_both_sides_and_carries_tcp(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer, consumer = open_session(appliance_a, appliance_b)
    assert consumer.keys() >= CONTRACT_OUTBOUND
    assert consumer["state"] == "ACTIVE"
    assert consumer["protocol"] == "tcp"
    assert len(consumer["entry_points"]) == 1

    report = run_iperf_client(facility_b, consumer["entry_points"][0], seconds=3)

    assert report["end"]["sum_received"]["bits_per_second"] > 0
    assert_traffic_counted(appliance_a, producer["session_id"])
    assert_traffic_counted(appliance_b, consumer["session_id"])
    assert_upload_counted(appliance_a, producer["session_id"], appliance_b, consumer["session_id"])


def test_udp_session_carries_iperf3_next_to_a_tcp_session_on_the_same_entry_port(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    # iperf3 -u needs its TCP control connection and its UDP data on the same port: one TCP session
    # and one UDP session, both to the producer app's port, both with entry port P (TCP and UDP
    # port numbers are separate namespaces).
    entry_port = "5110"
    start_iperf_server(facility_a)
    _, control = open_session(
        appliance_a, appliance_b, "--num-conn", "1", outbound_args=("--entry-port", entry_port)
    )
    _, data = open_session(
        appliance_a,
        appliance_b,
        "--protocol",
        "udp",
        "--num-conn",
        "1",
        outbound_args=("--entry-port", entry_port),
    )
    assert data["protocol"] == "udp"
    assert control["entry_points"] == data["entry_points"]

    # -l 1200: iperf3 otherwise sizes UDP datagrams by the control connection's MSS (~64 KiB on lo)
    report = run_iperf_client(facility_b, data["entry_points"][0], seconds=3, udp=True, length=1200)

    received = report["end"]["sum_received"]
    assert received["bytes"] > 0, received
    assert_traffic_counted(appliance_b, data["session_id"])


def test_connect_sets_up_both_sides_in_one_command_with_a_ca_bundle(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    bundle = facility_b.workdir / "both-cas.pem"
    bundle.write_text(appliance_a.ca_file.read_text() + appliance_b.ca_file.read_text())
    start_iperf_server(facility_a)

    done = facility_b.cli(
        "connect",
        "--producer",
        appliance_a.address,
        "--consumer",
        appliance_b.address,
        "--dest",
        PRODUCER_DEST,
        "--ca",
        bundle,
        "--producer-token",
        appliance_a.admin_token,
        "--consumer-token",
        appliance_b.admin_token,
        "--json",
    )
    assert done.returncode == 0, done.stderr

    halves = json.loads(done.stdout)
    assert halves["producer"]["state"] in ("PENDING", "ACTIVE")
    assert "ticket" not in halves["producer"]
    assert halves["consumer"]["state"] == "ACTIVE"
    assert appliance_a.status(halves["producer"]["session_id"])["state"] == "ACTIVE"
    report = run_iperf_client(facility_b, halves["consumer"]["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_connect_accepts_pinned_fingerprints_of_both_appliances(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)

    done = facility_b.cli(
        "connect",
        "--producer",
        appliance_a.address,
        "--consumer",
        appliance_b.address,
        "--dest",
        PRODUCER_DEST,
        "--producer-fingerprint",
        fingerprint_of_cert(appliance_a.ca_file),
        "--consumer-fingerprint",
        fingerprint_of_cert(appliance_b.ca_file),
        "--producer-token",
        appliance_a.admin_token,
        "--consumer-token",
        appliance_b.admin_token,
        "--json",
    )
    assert done.returncode == 0, done.stderr

    entry_point = json.loads(done.stdout)["consumer"]["entry_points"][0]
    report = run_iperf_client(facility_b, entry_point, seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_release_on_the_consumer_side_releases_the_producer_side(
    appliance_a: Appliance, appliance_b: Appliance
) -> None:
    producer, consumer = open_session(appliance_a, appliance_b)

    released = appliance_b.json("release", consumer["session_id"])

    assert released["state"] == "RELEASED"
    appliance_a.wait_state(producer["session_id"], "RELEASED", timeout=5)


def test_release_on_the_producer_side_releases_the_consumer_side(
    appliance_a: Appliance, appliance_b: Appliance
) -> None:
    producer, consumer = open_session(appliance_a, appliance_b)

    released = appliance_a.json("release", producer["session_id"])

    assert released["state"] == "RELEASED"
    appliance_b.wait_state(consumer["session_id"], "RELEASED", timeout=5)


def test_release_closes_every_socket_of_the_session(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    before = {f.ns: f.listening_ports() for f in (facility_a, facility_b)}
    producer, consumer = open_session(appliance_a, appliance_b)
    run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)
    assert ("udp", 5100) in facility_a.listening_ports()
    assert ("tcp", 5100) in facility_b.listening_ports()

    appliance_b.json("release", consumer["session_id"])
    appliance_a.wait_state(producer["session_id"], "RELEASED", timeout=5)

    for f in (facility_a, facility_b):
        wait_equal(f.listening_ports, before[f.ns], 5, f"the session's sockets in {f.ns} to close")


def test_release_leaves_no_extra_processes(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    before = {f.ns: f.pids() for f in (facility_a, facility_b)}
    producer, consumer = open_session(appliance_a, appliance_b)
    run_iperf_client(facility_b, consumer["entry_points"][0], seconds=2)

    appliance_b.json("release", consumer["session_id"])
    appliance_a.wait_state(producer["session_id"], "RELEASED", timeout=5)

    for f in (facility_a, facility_b):
        wait_equal(f.pids, before[f.ns], 5, f"only the appliance and the apps in {f.ns}")


def test_released_ports_are_handed_out_again_lowest_first(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    first_producer, first = open_session(appliance_a, appliance_b)
    _, second = open_session(appliance_a, appliance_b)
    assert first_producer["data_endpoints"] == [f"{facility_a.wan_ip}:5100"]
    assert first["entry_points"] == [f"{facility_b.wan_ip}:5100"]
    assert second["entry_points"] == [f"{facility_b.wan_ip}:5101"]

    appliance_b.json("release", first["session_id"])
    appliance_a.wait_state(first_producer["session_id"], "RELEASED", timeout=5)
    third_producer, third = open_session(appliance_a, appliance_b)

    assert third_producer["data_endpoints"] == first_producer["data_endpoints"]
    assert third["entry_points"] == first["entry_points"]
    report = run_iperf_client(facility_b, third["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
