"""End to end, with a real Docker engine: the appliance image and the compose demo profile.

Facility A's appliance (producer side) and facility B's (consumer side) run in containers on their own
networks, joined by `wan`; iperf3 runs from the consumer container through a session to the producer
container. The faults are real: a wan link cut with `docker network disconnect`, an appliance
container restarted, an appliance container killed. Assertions never depend on timing or throughput.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .conftest import PEER_GRACE
from .topology import Demo, entry_port, wait_until

QUIC_IDLE_TIMEOUT = 30.0  # quic_relay.RelayConfig.idle_timeout: a dead peer's connection lasts this long
ENDED = ("RELEASED", "FAILED")


def states(demo: Demo, session: dict[str, Any]) -> tuple[str, str]:
    """(producer side, consumer side) state of a session opened with `demo.connect`."""
    producer = demo.status("facility-a", session["producer"]["session_id"])
    consumer = demo.status("facility-b", session["consumer"]["session_id"])
    return producer["state"], consumer["state"]


def traffic_flows(demo: Demo, port: int) -> bool:
    report = demo.iperf(port, seconds=1, check=False)
    return bool(report) and "error" not in report and report["end"]["sum_received"]["bytes"] > 0


def test_the_appliance_runs_unprivileged_with_only_net_admin(demo: Demo) -> None:
    show = 'for d in /proc/[0-9]*; do [ "$(cat $d/comm)" = scistream ] && grep -E "^(Uid|CapEff)" $d/status; '
    show += "done"
    result = demo.exec("facility-a", "sh", "-c", show)
    fields = dict(line.split(":", 1) for line in result.output.splitlines())
    assert fields["Uid"].split() == ["10001"] * 4  # user scistream: real, effective, saved, filesystem
    assert int(fields["CapEff"], 16) == 1 << 12  # CAP_NET_ADMIN, nothing else


def test_both_appliances_turn_healthy_and_serving(demo: Demo) -> None:
    assert (demo.health("facility-a"), demo.health("facility-b")) == ("healthy", "healthy")
    for service in ("facility-a", "facility-b"):
        assert demo.local(service, "health") == {"status": "SERVING"}


def test_iperf3_tcp_crosses_a_quic_session_and_release_ends_both_sides(demo: Demo) -> None:
    session = demo.connect()
    assert session["consumer"]["state"] == "ACTIVE"
    assert states(demo, session) == ("ACTIVE", "ACTIVE")
    report = demo.iperf(entry_port(session), seconds=3)
    assert report["end"]["sum_received"]["bytes"] > 0
    counters = demo.status("facility-b", session["consumer"]["session_id"])
    assert counters["bytes_in"] > 0 and counters["bytes_out"] > 0
    demo.release("facility-b", session["consumer"]["session_id"])
    wait_until(lambda: states(demo, session) == ("RELEASED", "RELEASED"), 15, "both sides RELEASED")


def test_iperf3_udp_crosses_a_quic_session(demo: Demo) -> None:
    # iperf3 -u needs its TCP control connection and its UDP datagrams on the same port number: a TCP
    # session plus a UDP session whose entry point takes the same port (separate port spaces).
    control = demo.connect()
    port = entry_port(control)
    datagrams = demo.connect("--protocol", "udp", "--entry-port", str(port))
    assert entry_port(datagrams) == port
    report = demo.iperf(port, seconds=3, udp=True, bitrate="20M")
    assert report["end"]["sum"]["packets"] > report["end"]["sum"]["lost_packets"]
    for session in (control, datagrams):
        demo.release("facility-b", session["consumer"]["session_id"])


def wireguard_go_receive_buffers(demo: Demo, service: str) -> list[int]:
    """SO_RCVBUF (as the kernel reports it) of each UDP socket of a wireguard-go in the container. `ss -p`
    runs as root in the container, which sees other users' processes only with SYS_PTRACE as well."""
    out = demo.exec(service, "ss", "-H", "-uamnp").output
    entries = re.split(r"\n(?=\S)", out)  # an entry's skmem line is indented under it
    return [int(m.group(1)) for e in entries if "wireguard-go" in e and (m := re.search(r"\brb(\d+)", e))]


def test_iperf3_tcp_crosses_a_wireguard_session(demo: Demo) -> None:
    session = demo.connect("--mode", "wireguard")
    assert session["consumer"]["mode"] == "wireguard"
    report = demo.iperf(entry_port(session), seconds=3)
    assert report["end"]["sum_received"]["bytes"] > 0
    # compose.yaml's SYS_PTRACE lets the appliance widen its wireguard-go's UDP buffers in the container
    for service in ("facility-a", "facility-b"):
        buffers = wireguard_go_receive_buffers(demo, service)
        assert buffers and min(buffers) >= 7 << 20, (service, buffers)
    demo.release("facility-b", session["consumer"]["session_id"])
    wait_until(lambda: states(demo, session) == ("RELEASED", "RELEASED"), 15, "both sides RELEASED")


def test_new_connections_work_again_after_a_5_s_wan_outage(demo: Demo) -> None:
    session = demo.connect()
    port = entry_port(session)
    assert traffic_flows(demo, port)
    demo.disconnect_wan("facility-a")
    try:
        time.sleep(5)
    finally:
        demo.reconnect_wan("facility-a", demo.a_wan)
    wait_until(lambda: traffic_flows(demo, port), 60, "traffic through the session after the outage")
    assert states(demo, session) == ("ACTIVE", "ACTIVE")
    demo.release("facility-b", session["consumer"]["session_id"])


def test_a_restarted_producer_appliance_brings_the_session_back_or_fails_it_on_both_sides(
    demo: Demo,
) -> None:
    session = demo.connect()
    port = entry_port(session)
    demo.container("facility-a").restart(timeout=20)
    demo.wait_healthy("facility-a", 60)

    def settled() -> bool:
        now = states(demo, session)
        return (now == ("ACTIVE", "ACTIVE") and traffic_flows(demo, port)) or (
            now[0] in ENDED and now[1] in ENDED
        )

    # Half-alive (one side ACTIVE, the other ended) must not last past the grace period.
    wait_until(settled, QUIC_IDLE_TIMEOUT + 2 * PEER_GRACE, "the session back, or ended on both sides")
    final = states(demo, session)
    if final == ("ACTIVE", "ACTIVE"):
        demo.release("facility-b", session["consumer"]["session_id"])
    else:
        assert "FAILED" in final, final


def test_a_killed_consumer_appliance_is_noticed_and_the_producer_side_frees_the_session(demo: Demo) -> None:
    session = demo.connect()
    producer_id = session["producer"]["session_id"]
    data_port = int(str(session["producer"]["data_endpoints"][0]).rsplit(":", 1)[1])
    demo.container("facility-b").kill()

    def producer_ended() -> bool:
        return str(demo.status("facility-a", producer_id)["state"]) in ENDED

    wait_until(producer_ended, QUIC_IDLE_TIMEOUT + PEER_GRACE + 30, "the producer side to notice")
    producer = demo.status("facility-a", producer_id)
    assert producer["state"] == "FAILED"
    assert producer["reason"] == "consumer appliance unreachable"
    sockets = demo.exec("facility-a", "ss", "-Hunl", f"sport = :{data_port}")
    assert sockets.code == 0 and sockets.output.strip() == "", sockets.output

    # The consumer appliance comes back: its side of the session ends too instead of staying ACTIVE.
    demo.container("facility-b").start()
    demo.wait_healthy("facility-b", 90)
    consumer_id = session["consumer"]["session_id"]
    wait_until(
        lambda: demo.status("facility-b", consumer_id)["state"] in ENDED,
        PEER_GRACE + 30,
        "the consumer side to end",
    )
