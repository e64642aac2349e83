"""QUIC mode finds the largest packet the path between the facilities carries, and falls back
when large packets stop arriving (path MTU discovery with black-hole detection)."""

from __future__ import annotations

import pytest

from .topology import (
    PRODUCER_DEST,
    Appliance,
    Facility,
    Topology,
    drop_arriving,
    run_iperf_client,
    start_iperf_server,
    wait_until,
)

pytestmark = pytest.mark.integration


def set_mtu(topology: Topology, mtu: int) -> None:
    for f in topology.facilities:
        f.run("ip", "link", "set", "wan", "mtu", str(mtu))


def drop_udp_larger_than(facility: Facility, length: int) -> None:
    """nftables in `facility` drops UDP packets over `length` bytes arriving on the wan link, as a
    tunnel or a router with a smaller MTU that sends no ICMP would.

    A veth hands a GSO burst to the other namespace unsegmented, so nftables would see (and drop)
    the whole burst as one large packet; `gso_max_segs 1` makes the sender's kernel segment it
    first, as it does for a real NIC, so the rule sees the datagrams that would be on the wire.
    """
    facility.run("ip", "link", "set", "wan", "gso_max_segs", "1")
    drop_arriving(facility, "scistream_mtu", "meta", "length", "gt", str(length))


def open_quic_session(a: Appliance, b: Appliance) -> tuple[str, str, str]:
    producer = a.json("inbound", "--dest", PRODUCER_DEST, "--mode", "quic")
    consumer = b.json("outbound", producer["ticket"])
    return producer["session_id"], consumer["session_id"], consumer["entry_points"][0]


def packet_sizes(a: Appliance, b: Appliance, producer_id: str, consumer_id: str) -> tuple[int, int]:
    return a.status(producer_id)["packet_size"], b.status(consumer_id)["packet_size"]


def carries_data(facility_b: Facility, entry_point: str, seconds: int = 1) -> float:
    report = run_iperf_client(facility_b, entry_point, seconds=seconds)
    received = float(report["end"]["sum_received"]["bytes"])
    assert received > 0
    return received


@pytest.mark.parametrize(("mtu", "expected"), [(1500, 1452), (9000, 8952)])
def test_both_sides_use_the_largest_packet_the_path_carries(
    topology: Topology, appliance_a: Appliance, appliance_b: Appliance, mtu: int, expected: int
) -> None:
    set_mtu(topology, mtu)
    start_iperf_server(topology.a)
    producer_id, consumer_id, entry = open_quic_session(appliance_a, appliance_b)
    carries_data(topology.b, entry)
    wait_until(
        lambda: packet_sizes(appliance_a, appliance_b, producer_id, consumer_id) == (expected, expected),
        10,
        what=f"packet size {expected} on both sides",
    )


def test_a_path_that_drops_large_datagrams_settles_on_a_size_that_gets_through(
    topology: Topology, appliance_a: Appliance, appliance_b: Appliance
) -> None:
    set_mtu(topology, 9000)  # the route says 9000; something on the path carries only 1500
    for f in topology.facilities:
        drop_udp_larger_than(f, 1500)
    start_iperf_server(topology.a)
    producer_id, consumer_id, entry = open_quic_session(appliance_a, appliance_b)
    carries_data(topology.b, entry, seconds=2)

    def settled() -> bool:
        sizes = packet_sizes(appliance_a, appliance_b, producer_id, consumer_id)
        # IPv4 packets of 1,500 bytes get through: UDP payloads of up to 1,472
        return all(1200 < size <= 1472 for size in sizes)

    wait_until(settled, 15, what="a packet size between 1200 and 1472 on both sides")
    carries_data(topology.b, entry)


def test_large_packets_vanishing_mid_session_fall_back_and_the_session_carries_on(
    topology: Topology, appliance_a: Appliance, appliance_b: Appliance
) -> None:
    set_mtu(topology, 9000)
    start_iperf_server(topology.a)
    producer_id, consumer_id, entry = open_quic_session(appliance_a, appliance_b)
    carries_data(topology.b, entry)
    wait_until(
        lambda: packet_sizes(appliance_a, appliance_b, producer_id, consumer_id)[1] == 8952,
        10,
        what="jumbo packets from the consumer side",
    )

    for f in topology.facilities:  # a black hole: no ICMP, the packets just vanish
        drop_udp_larger_than(f, 1500)
    carries_data(topology.b, entry, seconds=3)

    wait_until(
        lambda: packet_sizes(appliance_a, appliance_b, producer_id, consumer_id)[1] <= 1472,
        15,
        what="the consumer side back at a size the path carries",
    )
    assert appliance_b.status(consumer_id)["state"] == "ACTIVE"
    carries_data(topology.b, entry)
