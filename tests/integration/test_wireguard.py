"""WireGuard mode for real, with the userspace backend (wireguard-go) between two network namespaces:
iperf3 over TCP and UDP, isolation, clean release, restart after SIGKILL, wireguard-go dying mid-session,
and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest

from appliance.dataplane.wireguard.kernel import kernel_supported

from .topology import (
    PRODUCER_DEST,
    SCISTREAM,
    Appliance,
    ApplianceFactory,
    Facility,
    Topology,
    assert_cli_error,
    assert_upload_counted,
    host_run,
    run_iperf_client,
    start_appliances,
    start_iperf_server,
    tcp_exchange,
    wait_until,
)

pytestmark = pytest.mark.integration

WG = ("--mode", "wireguard")


def wg_links(facility: Facility) -> list[str]:
    out = host_run("ip", "-n", facility.ns, "-o", "link", "show").stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ": ssw" in line]


def ruleset(facility: Facility) -> str:
    return facility.run("nft", "list", "ruleset").stdout


def wireguard_go(facility: Facility) -> list[int]:
    """PIDs of wireguard-go processes in the facility's namespace."""
    found = []
    for pid in facility.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            continue
        if cmdline.startswith(b"wireguard-go\0"):
            found.append(pid)
    return found


def open_session(a: Appliance, b: Appliance, *args: str) -> tuple[dict[str, object], dict[str, object]]:
    producer = a.json("inbound", "--dest", PRODUCER_DEST, *WG, *args)
    consumer = b.json("outbound", str(producer["ticket"]))
    return producer, consumer


def entry(consumer: dict[str, object]) -> str:
    points = consumer["entry_points"]
    assert isinstance(points, list)
    return str(points[0])


def test_tcp_and_udp_iperf3_run_through_wireguard_sessions(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    # Bound to every address: UDP answers then leave from the address the datagram reached.
    facility_a.spawn("iperf3", "-s", "-p", PRODUCER_DEST.rsplit(":", 1)[1])
    facility_a.wait_listening("tcp", int(PRODUCER_DEST.rsplit(":", 1)[1]))
    producer, consumer = open_session(appliance_a, appliance_b)
    assert producer["mode"] == "wireguard" and consumer["state"] == "ACTIVE"
    tcp = run_iperf_client(facility_b, entry(consumer), seconds=2)
    assert tcp["end"]["sum_received"]["bits_per_second"] > 0
    assert_upload_counted(appliance_a, str(producer["session_id"]), appliance_b, str(consumer["session_id"]))

    port = entry(consumer).rsplit(":", 1)[1]
    udp_producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST, *WG, "--protocol", "udp")
    appliance_b.json("outbound", str(udp_producer["ticket"]), "--entry-port", port)
    udp = run_iperf_client(facility_b, entry(consumer), seconds=2, udp=True, bitrate="50M", length=1200)
    assert udp["end"]["sum_received"]["bytes"] > 0

    status = appliance_b.status(str(consumer["session_id"]))
    assert status["bytes_in"] > 0 and status["bytes_out"] > 0  # counters come from the device
    assert appliance_a.status(str(producer["session_id"]))["bytes_in"] > 0


def test_a_facility_with_ipv6_disabled_runs_sessions_over_ipv4(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:
    for key in ("all", "default"):
        topology.b.run("sysctl", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")  # as Docker does
    a, b = appliance_factory(topology.a, topology.b)
    start_iperf_server(topology.a)
    _, consumer = open_session(a, b)
    report = run_iperf_client(topology.b, entry(consumer), seconds=1)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
    assert "no IPv6 tunnel address" in b.log_tail(100)


def test_the_consumer_side_reaches_only_its_sessions_destinations(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    """Even with its WireGuard device reconfigured to send anything into the tunnel."""
    start_iperf_server(facility_a)
    other = "10.99.0.1"  # another service at facility A, not a destination of the session
    facility_a.run("ip", "addr", "add", f"{other}/32", "dev", "lo")
    facility_a.spawn(sys.executable, "-m", "http.server", "7777", "--bind", "0.0.0.0")
    facility_a.wait_listening("tcp", 7777)
    _, consumer = open_session(appliance_a, appliance_b)
    (ifname,) = wg_links(facility_b)
    peer_key = facility_b.run("wg", "show", ifname, "peers").stdout.split()[0]
    tunnel_ip = facility_b.run("wg", "show", ifname, "allowed-ips").stdout.split()[1].split("/")[0]
    # The consumer side turns hostile: its device now routes everything of A's into the tunnel.
    facility_b.run("wg", "set", ifname, "peer", peer_key, "allowed-ips", f"{tunnel_ip}/32,{other}/32")
    facility_b.run("ip", "route", "add", f"{other}/32", "dev", ifname)

    assert tcp_exchange(facility_b, entry(consumer)).startswith("CONNECTED")  # the session still works
    for target in (f"{tunnel_ip}:7777", f"{other}:7777", f"{tunnel_ip}:5000"):
        outcome = tcp_exchange(facility_b, target, timeout=2)
        assert not outcome.startswith("CONNECTED"), f"{target} was reachable through the tunnel"
    assert "drop" in ruleset(facility_a)


def test_release_removes_devices_rules_and_processes_on_both_sides(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    before = {f.ns: ruleset(f) for f in (facility_a, facility_b)}
    _, consumer = open_session(appliance_a, appliance_b)
    devices = wg_links(facility_a) + wg_links(facility_b)
    assert len(devices) == 2
    assert wireguard_go(facility_a) and wireguard_go(facility_b)

    appliance_b.json("release", str(consumer["session_id"]))

    for facility in (facility_a, facility_b):
        wait_until(lambda f=facility: not wg_links(f), 10, what=f"no WireGuard links in {facility.ns}")
        assert ruleset(facility) == before[facility.ns]
        assert wireguard_go(facility) == []
    assert not any(os.path.exists(f"/var/run/wireguard/{name}.sock") for name in devices)
    assert ("tcp", int(entry(consumer).rsplit(":", 1)[1])) not in facility_b.listening_ports()


def test_sigterm_removes_everything_and_the_restart_restores_the_session(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer, consumer = open_session(appliance_a, appliance_b)

    assert appliance_a.stop() == 0
    assert wg_links(facility_a) == [] and wireguard_go(facility_a) == []
    assert "scistream" not in ruleset(facility_a)

    appliance_a.start()
    assert appliance_a.status(str(producer["session_id"]))["state"] == "ACTIVE"
    report = run_iperf_client(facility_b, entry(consumer), seconds=2, timeout=40)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def _sigkill(appliance: Appliance) -> None:
    """Kills the appliance alone: its wireguard-go processes live on, as after a crash."""
    assert appliance.process is not None
    os.kill(appliance.process.pid, signal.SIGKILL)
    appliance.process.wait(timeout=10)


def test_restart_after_sigkill_restores_the_session_with_one_device(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    _, consumer = open_session(appliance_a, appliance_b)
    _sigkill(appliance_b)
    assert wireguard_go(facility_b)  # orphaned

    appliance_b.start()

    assert appliance_b.status(str(consumer["session_id"]))["state"] == "ACTIVE"
    assert len(wg_links(facility_b)) == 1 and len(wireguard_go(facility_b)) == 1
    report = run_iperf_client(facility_b, entry(consumer), seconds=2, timeout=40)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_restart_after_sigkill_removes_what_belongs_to_no_live_session(
    appliance_a: Appliance, appliance_b: Appliance, facility_b: Facility
) -> None:
    before = ruleset(facility_b)
    open_session(appliance_a, appliance_b)
    _sigkill(appliance_b)
    (appliance_b.state_dir / "sessions.db").unlink()  # the session is gone, its device and rules are not

    appliance_b.start()

    assert wg_links(facility_b) == [] and wireguard_go(facility_b) == []
    assert ruleset(facility_b) == before


def test_wireguard_go_dying_mid_session_is_restored(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    producer, consumer = open_session(appliance_a, appliance_b)
    run_iperf_client(facility_b, entry(consumer), seconds=1)
    counted = appliance_a.status(str(producer["session_id"]))["bytes_in"]
    (old,) = wireguard_go(facility_a)

    os.kill(old, signal.SIGKILL)

    def restored() -> bool:
        pids = wireguard_go(facility_a)
        return len(pids) == 1 and pids[0] != old and len(wg_links(facility_a)) == 1

    wait_until(restored, 15, what="a new wireguard-go for the session")
    status = appliance_a.status(str(producer["session_id"]))
    assert status["state"] == "ACTIVE"
    assert status["bytes_in"] >= counted  # the counters carry on across the new process
    report = run_iperf_client(facility_b, entry(consumer), seconds=2, timeout=40)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_a_session_whose_wireguard_go_cannot_come_back_ends_failed_on_both_sides(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:
    wrapper = topology.a.workdir / "wireguard-go"
    wrapper.write_text('#!/bin/sh\nexec wireguard-go "$@"\n')
    wrapper.chmod(0o755)
    a, b = Appliance(topology.a), Appliance(topology.b)
    a.extra_args = ["--wireguard-go", str(wrapper)]
    appliance_factory.started += [a, b]
    start_appliances(a, b)
    producer, consumer = open_session(a, b)
    wrapper.unlink()  # wireguard-go can no longer be started

    for pid in wireguard_go(topology.a):
        os.kill(pid, signal.SIGKILL)

    failed = a.wait_state(str(producer["session_id"]), "FAILED", timeout=20)
    assert "unreachable" in failed["reason"]
    assert wg_links(topology.a) == [] and "scistream" not in ruleset(topology.a)
    ended = wait_until(
        lambda: b.status(str(consumer["session_id"]))["state"] in ("RELEASED", "FAILED"), 20, what="B ends"
    )
    assert ended
    wait_until(lambda: wg_links(topology.b) == [], 10, what="B's device removed")


def test_an_exhausted_tunnel_address_pool_is_resource_exhausted(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:
    a, b = Appliance(topology.a), Appliance(topology.b)
    b.extra_args = ["--wireguard-pool", "100.64.7.0/30"]  # room for one session
    appliance_factory.started += [a, b]
    start_appliances(a, b)
    open_session(a, b)
    second = a.json("inbound", "--dest", PRODUCER_DEST, *WG)

    done = b.cli("outbound", str(second["ticket"]))

    assert_cli_error(done, "no free tunnel address block")
    assert len(b.sessions()) == 1
    assert a.status(str(second["session_id"]))["state"] == "PENDING"  # the ticket was not spent


def test_mode_wireguard_without_a_backend_is_refused_and_no_session_is_made(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:
    a = Appliance(topology.a)
    a.extra_args = ["--wireguard-go", "/nonexistent/wireguard-go"]
    appliance_factory.started.append(a)
    start_appliances(a)

    done = a.cli("inbound", "--dest", PRODUCER_DEST, *WG)

    assert_cli_error(done, "mode wireguard is not available")
    assert a.sessions() == []
    assert "wireguard-go" in a.log_tail()  # the log says why, once


@pytest.mark.parametrize(
    ("backend", "needle"), [("userspace", "/nonexistent/wireguard-go"), ("kernel", "kernel module")]
)
def test_an_explicit_backend_that_cannot_work_stops_the_start_with_one_line(
    facility_a: Facility, backend: str, needle: str
) -> None:
    if backend == "kernel" and kernel_supported() is None:
        pytest.skip("this kernel has WireGuard")
    done = facility_a.cli(
        "server", "--listen", "127.0.0.1:5999", "--state-dir", facility_a.workdir / "x", "--auth", "none",
        "--insecure", "--wireguard-backend", backend, "--wireguard-go", "/nonexistent/wireguard-go",
    )  # fmt: skip
    line = assert_cli_error(done, needle)
    assert f"--wireguard-backend {backend}" in line


@pytest.mark.skipif(shutil.which("capsh") is None, reason="needs capsh (libcap2-bin)")
def test_an_appliance_without_net_admin_names_it(facility_a: Facility) -> None:
    server = f"{SCISTREAM} server --listen 127.0.0.1:5999 --state-dir {facility_a.workdir / 'x'} --auth none"
    server += " --insecure --wireguard-backend userspace"
    done = facility_a.run("capsh", "--drop=cap_net_admin", "--", "-c", server, check=False)
    assert_cli_error(done, "NET_ADMIN")


def test_a_join_with_a_malformed_public_key_is_refused(appliance_a: Appliance, facility_b: Facility) -> None:
    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST, *WG)
    script = f"""
import asyncio
from appliance.api.scistream import v1 as api
from appliance.control.peer_client import GrpcPeerLink
from appliance.errors import ApplianceError
from appliance.sessions import ticket as tk
from appliance.sessions.manager import join_transcript

async def main():
    t = tk.Ticket.decode({str(producer["ticket"])!r})
    peer = GrpcPeerLink(t.producer_address, t.producer_fingerprint, 5)
    c = await peer.challenge(api.ChallengeRequest(session_id=t.session_id))
    r = api.JoinRequest(session_id=t.session_id, client_nonce=tk.new_nonce(), server_nonce=c.server_nonce,
        consumer_session_id="x", consumer_address="198.18.0.2:5000", data_certificate=b"cert",
        wireguard=api.WireGuardPeer(public_key=b"short", tunnel_addresses=["100.64.0.2/30"]))
    r.proof = tk.mac(t.secret, tk.JOIN_LABEL, *join_transcript(r))
    try:
        await peer.join(r)
        print("ACCEPTED")
    except ApplianceError as exc:
        print(type(exc).__name__, exc.message)
    peer.close()

asyncio.run(main())
"""
    out = facility_b.run(sys.executable, "-c", script, timeout=30).stdout.strip()
    assert out.startswith("InvalidArgument") and "malformed WireGuard public key" in out, out
    assert appliance_a.status(str(producer["session_id"]))["state"] == "PENDING"


@pytest.mark.skipif(bool(kernel_supported()), reason=f"kernel backend: {kernel_supported()}")
def test_kernel_backend_carries_a_session(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:  # pragma: no cover - needs the wireguard kernel module
    a, b = Appliance(topology.a), Appliance(topology.b)
    for appliance in (a, b):
        appliance.extra_args = ["--wireguard-backend", "kernel"]
    appliance_factory.started += [a, b]
    start_appliances(a, b)
    start_iperf_server(topology.a)
    _, consumer = open_session(a, b)
    time.sleep(0.1)
    report = run_iperf_client(topology.b, entry(consumer), seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
