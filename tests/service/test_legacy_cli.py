"""`s2uc` (as a subprocess) against two in-process appliances: 1.2.1's commands and output lines."""

from __future__ import annotations

import ast
import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.sessions.legacy import session_id_for
from appliance.sessions.manager import SYSTEM
from appliance.sessions.model import Side, State

from .conftest import Facility, echo_through
from .test_legacy import legacy_pair

S2UC = Path(sys.executable).parent / "s2uc"
Pair = tuple[Facility, Facility]


@dataclass
class Done:
    status: int
    stdout: str
    stderr: str

    def listeners(self) -> list[str]:
        """The list in the `Listeners: [...]` line, parsed as a 1.2.1 script would."""
        line = next(x for x in self.stdout.splitlines() if x.startswith("Listeners: "))
        value = ast.literal_eval(line.removeprefix("Listeners: "))
        assert isinstance(value, list)
        return [str(v) for v in value]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    async with legacy_pair(tmp_path) as facilities:
        yield facilities


async def s2uc(f: Facility, *args: str, subject: str = "alice") -> Done:
    proc = await asyncio.create_subprocess_exec(
        str(S2UC),
        *args,
        "--s2cs",
        f.address,
        "--server_cert",
        str(f.ca_file),
        "--token",
        f.tokens[subject],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def _state(f: Facility, uid: str, side: Side) -> State:
    assert f.appliance.manager is not None
    return f.appliance.manager.get(SYSTEM, session_id_for(uid, side)).state


async def test_inbound_request_prints_the_uid_line_and_listeners(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    host, port = echo_server.split(":")
    done = await s2uc(a, "inbound_request", "--remote_ip", host, "--receiver_ports", port, "--num_conn", "1")
    assert done.status == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "uid; s2cs; access_token; role"
    uid, s2cs, token, role = lines[1].split()
    assert (s2cs, token, role) == (a.address, "REDACTED", "PROD")
    assert a.tokens["alice"] not in done.stdout
    assert len(done.listeners()) == 1
    assert _state(a, uid, Side.PRODUCER) is State.PENDING


async def test_outbound_request_joins_and_release_ends_both_sides(pair: Pair, echo_server: str) -> None:
    a, b = pair
    host, port = echo_server.split(":")
    inbound = await s2uc(a, "inbound-request", "--remote_ip", host, "--receiver_ports", port)
    uid = inbound.stdout.splitlines()[1].split()[0]
    producer_listeners = ",".join(inbound.listeners())

    outbound = await s2uc(b, "outbound_request", "--num_conn", "2", uid, producer_listeners)
    assert outbound.status == 0, outbound.stderr
    assert outbound.stdout.splitlines()[1] == f"{uid} {b.address} REDACTED CONS"
    entry_points = outbound.listeners()
    assert len(entry_points) == 2
    assert await echo_through(entry_points[1], b"through s2uc") == b"through s2uc"

    done = await s2uc(b, "release", uid)
    assert (done.status, done.stdout.strip()) == (0, "Release completed")
    assert _state(b, uid, Side.CONSUMER) is State.RELEASED
    for _ in range(50):
        if _state(a, uid, Side.PRODUCER) is State.RELEASED:
            break
        await asyncio.sleep(0.05)
    assert _state(a, uid, Side.PRODUCER) is State.RELEASED


async def test_mock_uid_twice_is_a_one_line_already_exists_error(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    host, port = echo_server.split(":")
    args = ("inbound_request", "--mock", "True", "--remote_ip", host, "--receiver_ports", port)
    assert (await s2uc(a, *args)).status == 0
    again = await s2uc(a, *args)
    assert again.status == 1
    assert again.stderr.startswith("Error: ") and again.stderr.count("\n") == 1
    assert "already" in again.stderr


async def test_release_of_an_unknown_uid_fails_with_one_line(pair: Pair) -> None:
    a, _ = pair
    done = await s2uc(a, "release", "no-such-uid")
    assert done.status == 1
    assert done.stderr.strip() == "Error: uid no-such-uid not found"
