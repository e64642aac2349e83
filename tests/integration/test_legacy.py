"""SciStream 1.2.1 compatibility across two facilities: `s2uc` scripts and `s2cs`, iperf3 through the
listeners, release and SIGTERM freeing every socket."""

from __future__ import annotations

import ast
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from .topology import (
    CONTROL_PORT,
    IPERF_PORT,
    PORT_RANGE,
    Appliance,
    Facility,
    run_iperf_client,
    start_iperf_server,
    wait_equal,
    wait_until,
)

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
S2UC, S2CS, SCISTREAM = BIN / "s2uc", BIN / "s2cs", BIN / "scistream"


def s2uc(facility: Facility, server: str, cert: Path, *args: str, token: str | None = None) -> list[str]:
    """`s2uc ARGS --s2cs server --server_cert cert` in `facility`; asserts success, returns stdout lines."""
    cmd: list[str | Path] = [S2UC, *args, "--s2cs", server, "--server_cert", str(cert)]
    if token:
        cmd += ["--token", token]
    done = facility.run(*cmd, check=False, timeout=60)
    assert done.returncode == 0, f"s2uc {args[0]} failed: {done.stdout}{done.stderr}"
    return done.stdout.splitlines()


def listeners(lines: list[str]) -> list[str]:
    line = next(x for x in lines if x.startswith("Listeners: "))
    value = ast.literal_eval(line.removeprefix("Listeners: "))
    return [str(v) for v in value]


class S2cs:
    """`s2cs` with 1.2.1 options (no --client_secret: no token checked, as in 1.2.1) in a facility."""

    def __init__(self, facility: Facility, *extra: str) -> None:
        self.facility = facility
        self.state_dir = facility.workdir / "s2cs"
        self.log = facility.workdir / "s2cs.log"
        self.address = f"{facility.wan_ip}:{CONTROL_PORT}"
        self.process = facility.spawn(
            S2CS,
            "--listener_ip",
            facility.wan_ip,
            "--port",
            str(CONTROL_PORT),
            "--port_range",
            PORT_RANGE,
            "--type",
            "StunnelSubprocess",
            "--state-dir",
            self.state_dir,
            *extra,
            log=self.log,
        )
        self.cert = self.state_dir / "tls" / "control.crt"

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"s2cs exited: {self.log.read_text()}")
            if not self.cert.is_file():
                return False
            args = ["health", "--server", self.address, "--ca", str(self.cert), "--timeout", "2"]
            return facility.run(SCISTREAM, *args, check=False).returncode == 0

        wait_until(healthy, 15, interval=0.1, what="s2cs to serve")

    def sigterm(self, timeout: float = 10) -> int:
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def test_s2uc_scripts_carry_iperf3_between_two_appliances_and_release_frees_every_socket(
    appliance_a: Appliance, appliance_b: Appliance, facility_a: Facility, facility_b: Facility
) -> None:
    before = {f.ns: f.listening_ports() for f in (facility_a, facility_b)}
    start_iperf_server(facility_a)
    before[facility_a.ns] = facility_a.listening_ports()
    inbound = s2uc(
        facility_a,
        appliance_a.address,
        appliance_a.ca_file,
        "inbound-request",
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        str(IPERF_PORT),
        "--num_conn",
        "1",
        token=appliance_a.admin_token,
    )
    uid = inbound[1].split()[0]
    producer_listeners = listeners(inbound)
    assert producer_listeners == [f"{facility_a.wan_ip}:5100"]

    outbound = s2uc(
        facility_b,
        appliance_b.address,
        appliance_b.ca_file,
        "outbound-request",
        "--num_conn",
        "2",
        uid,
        ",".join(producer_listeners),
        token=appliance_b.admin_token,
    )
    entry_points = listeners(outbound)
    assert len(entry_points) == 2

    report = run_iperf_client(facility_b, entry_points[0], seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0

    s2uc(facility_b, appliance_b.address, appliance_b.ca_file, "release", uid, token=appliance_b.admin_token)
    for f in (facility_a, facility_b):
        wait_equal(f.listening_ports, before[f.ns], 5, f"the session's sockets in {f.ns} to close")


def test_s2cs_with_1_2_1_options_honours_consumer_receiver_ports_and_stops_cleanly_on_sigterm(
    facility_a: Facility, facility_b: Facility
) -> None:
    a, b = S2cs(facility_a), S2cs(facility_b)
    start_iperf_server(facility_a)
    inbound = s2uc(
        facility_a,
        a.address,
        a.cert,
        "inbound_request",
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        "5201",
    )
    assert inbound[1].split()[2:] == ["NO_AUTH", "PROD"]
    uid = inbound[1].split()[0]
    outbound = s2uc(
        facility_b,
        b.address,
        b.cert,
        "outbound_request",
        "--num_conn",
        "1",
        "--receiver_ports",
        "6000",
        uid,
        listeners(inbound)[0],
    )
    assert listeners(outbound) == [f"{facility_b.wan_ip}:6000"]
    report = run_iperf_client(facility_b, f"{facility_b.wan_ip}:6000", seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0

    # A req still waiting for its hello must not hold the stop up.
    waiting_log = facility_b.workdir / "waiting-req.log"
    script = _WAITING_REQ.format(address=b.address, cert=str(b.cert))
    waiting = facility_b.spawn(sys.executable, "-c", script, log=waiting_log)
    wait_until(lambda: "never-hello" in b.log.read_text(), 10, what="the req to arrive")
    started = time.monotonic()
    assert b.sigterm() == 0
    assert time.monotonic() - started < 5
    waiting.wait(timeout=10)
    assert waiting_log.read_text().split()[0] in ("UNAVAILABLE", "CANCELLED"), waiting_log.read_text()
    assert a.sigterm() == 0
    for f in (facility_a, facility_b):
        assert not {p for p in f.listening_ports() if p[1] != IPERF_PORT}, f.listening_ports()


# A 1.2.1 client whose req waits for a hello that never comes; prints the status it ends with.
_WAITING_REQ = """
import asyncio
from grpclib.exceptions import GRPCError
from appliance.api import scistream as legacy
from appliance.control.channel import Trust, open_channel
async def main():
    channel = await open_channel("{address}", Trust(ca_file=__import__("pathlib").Path("{cert}")))
    stub = legacy.ControlStub(channel, timeout=30)
    try:
        await stub.req(legacy.Request(uid="never-hello", role="CONS", num_conn=1))
        print("OK")
    except GRPCError as exc:
        print(exc.status.name)
    except Exception as exc:
        print("CANCELLED", exc)
    channel.close()
asyncio.run(main())
"""
