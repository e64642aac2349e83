"""Bad input through the CLI: a non-zero exit, a one-line error on stderr, and no change of state."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .topology import (
    PRODUCER_DEST,
    Appliance,
    ApplianceFactory,
    Facility,
    Topology,
    assert_cli_error,
    run_iperf_client,
    start_iperf_server,
)

pytestmark = pytest.mark.integration

NOT_FOUND = ("not found",)
AUTH_ERRORS = ("token", "unauthenticated", "authorization", "authenticat")


@contextmanager
def state_unchanged(*appliances: Appliance) -> Iterator[None]:
    """Asserts that `ls --json` (as admin) of every appliance is the same after the block as before.
    `packet_size` is left out: it is a live measurement (path MTU discovery, reported by the relay
    processes every half second), not state a request could change."""

    def snapshot() -> list[list[dict[str, object]]]:
        return [
            [{k: v for k, v in s.items() if k != "packet_size"} for s in a.sessions()] for a in appliances
        ]

    before = snapshot()
    yield
    assert snapshot() == before


def tampered(ticket: str) -> str:
    """The ticket with one character of its payload part changed."""
    prefix, payload, check = ticket.split(".")
    middle = len(payload) // 2
    flipped = "B" if payload[middle] != "B" else "C"
    return ".".join([prefix, payload[:middle] + flipped + payload[middle + 1 :], check])


@pytest.mark.parametrize("dest", ["foo", "host:99999", ""], ids=["no-port", "port-out-of-range", "empty"])
def test_malformed_destination_is_refused(appliance_a: Appliance, dest: str) -> None:
    with state_unchanged(appliance_a):
        done = appliance_a.cli("inbound", "--dest", dest, "--json")
    assert_cli_error(done, "destination", "port", "host")


def test_status_of_an_unknown_session_is_not_found(appliance_a: Appliance) -> None:
    with state_unchanged(appliance_a):
        done = appliance_a.cli("status", str(uuid.uuid4()))
    assert_cli_error(done, *NOT_FOUND)


def test_release_of_an_unknown_session_is_not_found(appliance_a: Appliance) -> None:
    with state_unchanged(appliance_a):
        done = appliance_a.cli("release", str(uuid.uuid4()))
    assert_cli_error(done, *NOT_FOUND)


def test_release_of_a_released_session_says_it_already_ended(appliance_a: Appliance) -> None:
    session = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    appliance_a.json("release", session["session_id"])

    with state_unchanged(appliance_a):
        done = appliance_a.cli("release", session["session_id"])
    assert_cli_error(done, "already")


def test_tampered_ticket_is_refused(appliance_a: Appliance, appliance_b: Appliance) -> None:
    session = appliance_a.json("inbound", "--dest", PRODUCER_DEST)

    with state_unchanged(appliance_a, appliance_b):
        done = appliance_b.cli("outbound", tampered(session["ticket"]))
    assert_cli_error(done, "ticket")
    assert appliance_a.status(session["session_id"])["state"] == "PENDING"


def test_truncated_ticket_is_refused(appliance_a: Appliance, appliance_b: Appliance) -> None:
    ticket = appliance_a.json("inbound", "--dest", PRODUCER_DEST)["ticket"]

    with state_unchanged(appliance_a, appliance_b):
        in_payload = appliance_b.cli("outbound", ticket[: len(ticket) // 2])
        in_check = appliance_b.cli("outbound", ticket[:-3])
    assert_cli_error(in_payload, "ticket")
    assert_cli_error(in_check, "ticket")


def test_ticket_joined_twice_is_refused_and_the_first_join_keeps_working(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    start_iperf_server(facility_a)
    ticket = appliance_a.json("inbound", "--dest", PRODUCER_DEST)["ticket"]
    first = appliance_b.json("outbound", ticket)

    with state_unchanged(appliance_a, appliance_b):
        done = appliance_b.cli("outbound", ticket)
    assert_cli_error(done, "already")

    report = run_iperf_client(facility_b, first["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_missing_token_is_refused(appliance_a: Appliance) -> None:
    with state_unchanged(appliance_a):
        done = appliance_a.cli("inbound", "--dest", PRODUCER_DEST, token=None)
    assert_cli_error(done, *AUTH_ERRORS)


def test_invalid_token_is_refused(appliance_a: Appliance) -> None:
    with state_unchanged(appliance_a):
        done = appliance_a.cli("inbound", "--dest", PRODUCER_DEST, token="sst_not-a-real-token")
    assert_cli_error(done, *AUTH_ERRORS)


def test_another_subject_cannot_see_my_session(appliance_a: Appliance) -> None:
    session = appliance_a.json("inbound", "--dest", PRODUCER_DEST)

    with state_unchanged(appliance_a):
        done = appliance_a.cli("status", session["session_id"], token=appliance_a.bob_token)
        listed = appliance_a.json("ls", token=appliance_a.bob_token)
    assert_cli_error(done, *NOT_FOUND)
    assert session["session_id"] not in [s["session_id"] for s in listed]


def test_another_subject_cannot_release_my_session(appliance_a: Appliance) -> None:
    session = appliance_a.json("inbound", "--dest", PRODUCER_DEST)

    with state_unchanged(appliance_a):
        done = appliance_a.cli("release", session["session_id"], token=appliance_a.bob_token)
    assert_cli_error(done, *NOT_FOUND)
    assert appliance_a.status(session["session_id"])["state"] == "PENDING"


def test_exhausted_port_range_is_refused_and_earlier_sessions_keep_working(
    topology: Topology, appliance_factory: ApplianceFactory
) -> None:
    # A producer-side session takes one data port: a 2-port range holds two sessions.
    [a] = appliance_factory(topology.a, port_range="5100-5101")
    [b] = appliance_factory(topology.b)
    start_iperf_server(topology.a)
    first = a.json("inbound", "--dest", PRODUCER_DEST)
    second = a.json("inbound", "--dest", PRODUCER_DEST)

    with state_unchanged(a):
        done = a.cli("inbound", "--dest", PRODUCER_DEST)
    assert_cli_error(done, "no free port", "exhausted")

    assert [a.status(s["session_id"])["state"] for s in (first, second)] == ["PENDING", "PENDING"]
    joined = b.json("outbound", first["ticket"])
    report = run_iperf_client(topology.b, joined["entry_points"][0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_health_local_finds_the_appliance_from_its_own_configuration(appliance_a: Appliance) -> None:
    """What the container's healthcheck runs: the listen address and the certificate come from the
    appliance's YAML configuration, not from client flags."""
    facility = appliance_a.facility
    config = facility.workdir / "health.yaml"
    config.write_text(f"listen: {appliance_a.address}\nstate_dir: {appliance_a.state_dir}\n")
    done = facility.cli("health", "--local", "--config", config, "--timeout", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SERVING"


def test_health_local_without_the_certificate_says_which_file_is_missing(appliance_a: Appliance) -> None:
    facility = appliance_a.facility
    config = facility.workdir / "health-bad.yaml"
    config.write_text(f"listen: {appliance_a.address}\nstate_dir: {facility.workdir / 'nowhere'}\n")
    done = facility.cli("health", "--local", "--config", config, "--timeout", "5")
    line = assert_cli_error(done, "certificate")
    assert "nowhere" in line
