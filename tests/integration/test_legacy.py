"""SciStream 1.2.1 compatibility across two facilities: `s2uc` scripts and `s2cs`, iperf3 through the
listeners, release and SIGTERM freeing every socket."""

from __future__ import annotations

import ast
import contextlib
import os
import random
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator
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
CLIENT_121 = Path(__file__).parents[1] / "legacy121.py"  # 1.2.1's s2uc flow (grpcio), see that file
DEFAULT_STATE_BASE = Path("/var/lib/scistream")  # the real default; s2cs uses s2cs-PORT under it


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


@pytest.fixture
def default_state_ports() -> Iterator[list[int]]:
    """Two control ports whose default state directories no one (other runs included) has used; the
    directories this test makes there are removed afterwards."""
    base_existed = DEFAULT_STATE_BASE.exists()
    ports: list[int] = []
    while len(ports) < 2:
        port = random.randint(20000, 29999)
        if port not in ports and not (DEFAULT_STATE_BASE / f"s2cs-{port}").exists():
            ports.append(port)
    try:
        yield ports
    finally:
        for port in ports:
            shutil.rmtree(DEFAULT_STATE_BASE / f"s2cs-{port}", ignore_errors=True)
        if not base_existed:
            # Only if empty: another run may be using it by now.
            with contextlib.suppress(OSError):
                DEFAULT_STATE_BASE.rmdir()


def client_121(facility: Facility, *args: str) -> list[str]:
    done = facility.run(sys.executable, CLIENT_121, *args, check=False, timeout=60)
    assert done.returncode == 0, f"1.2.1 s2uc {args[0]} failed: {done.stdout}{done.stderr}"
    return done.stdout.splitlines()


def test_two_s2cs_on_one_host_with_default_state_dirs_serve_the_1_2_1_flow_through_localhost(
    facility_a: Facility, default_state_ports: list[int]
) -> None:
    """1.2.1's quickstart on one host: two s2cs without --state-dir or --port_range, the client on
    localhost; each gets its own state directory, locked and private."""
    host = facility_a
    prod_port, cons_port = default_state_ports
    logs = [host.workdir / f"s2cs-{p}.log" for p in default_state_ports]
    producer = host.spawn(S2CS, "--listener_ip", host.wan_ip, "--port", str(prod_port), log=logs[0])
    peer = ("--peer_port", str(prod_port))  # where it reaches the producer side's control port
    consumer = host.spawn(S2CS, "--listener_ip", host.wan_ip, "--port", str(cons_port), *peer, log=logs[1])
    certs = [DEFAULT_STATE_BASE / f"s2cs-{p}" / "tls" / "control.crt" for p in default_state_ports]
    for process, log, cert, port in zip((producer, consumer), logs, certs, default_state_ports, strict=True):

        def healthy(process: object = process, log: Path = log, cert: Path = cert, port: int = port) -> bool:
            assert producer.poll() is None and consumer.poll() is None, log.read_text()
            if not cert.is_file():
                return False
            # localhost reaches it (it listens on every address) and its certificate names localhost.
            args = ["health", "--server", f"localhost:{port}", "--ca", str(cert), "--timeout", "2"]
            return host.run(SCISTREAM, *args, check=False).returncode == 0

        wait_until(healthy, 20, what=f"s2cs on port {port} to serve on localhost")
        # Its certificate names the listener address too.
        args = ["health", "--server", f"{host.wan_ip}:{port}", "--ca", str(cert), "--timeout", "5"]
        assert host.run(SCISTREAM, *args, check=False).returncode == 0
        state_dir = cert.parent.parent
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700

    start_iperf_server(host)
    inbound = client_121(
        host,
        "inbound_request",
        "--s2cs",
        f"localhost:{prod_port}",
        "--server_cert",
        str(certs[0]),
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        str(IPERF_PORT),
        "--num_conn",
        "1",
    )
    uid = inbound[1].split()[0]
    producer_listeners = listeners(inbound)
    assert [a.rsplit(":", 1)[0] for a in producer_listeners] == [host.wan_ip]
    outbound = client_121(
        host,
        "outbound_request",
        "--s2cs",
        f"localhost:{cons_port}",
        "--server_cert",
        str(certs[1]),
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        "6000",
        "--num_conn",
        "1",
        uid,
        producer_listeners[0],
    )
    assert listeners(outbound) == [f"{host.wan_ip}:6000"]
    report = run_iperf_client(host, "localhost:6000", seconds=2)
    assert report["end"]["sum_received"]["bits_per_second"] > 0

    # A third s2cs on a port already served stops at once, with one line, and leaves both alone.
    done = host.run(S2CS, "--listener_ip", host.wan_ip, "--port", str(prod_port), check=False, timeout=30)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "in use by another appliance" in done.stderr, done.stderr
    client_121(host, "release", uid, "--s2cs", f"localhost:{cons_port}", "--server_cert", str(certs[1]))
    for process in (consumer, producer):
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
