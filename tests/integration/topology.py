"""Two facilities in network namespaces joined by a "wan" veth pair, and appliances running in them.

Facility A (198.18.0.1) hosts the producer app and the producer-side appliance; facility B (198.18.0.2)
the consumer app and the consumer-side appliance. Every name carries this run's id, so parallel runs and
leftovers of crashed runs never collide, and teardown (or the session-end sweep) removes them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

WAN_IPS = {"a": "198.18.0.1", "b": "198.18.0.2"}
WAN_PREFIX = 24
CONTROL_PORT = 5000
PORT_RANGE = "5100-5120"
SCISTREAM = Path(sys.executable).parent / "scistream"
RUN_DIR = Path("/run/scistream-itest")  # one pid file per test run, to sweep runs that died

# Each pytest process is one "run": namespaces are ss<a|b>-<run id (3 hex)><serial (3 hex)>.
RUN_ID = secrets.token_hex(2)[:3]
_serial = 0


def _ns_prefixes(run_id: str) -> tuple[str, str]:
    return (f"ssa-{run_id}", f"ssb-{run_id}")


def host_run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Runs a command in the root namespace, capturing text output."""
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Polls `predicate` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def wait_equal(get: Callable[[], T], expected: T, timeout: float, what: str) -> None:
    """Polls `get()` until it equals `expected`; on timeout the assertion shows the last value."""
    deadline = time.monotonic() + timeout
    while (value := get()) != expected:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {value!r} != {expected!r}")
        time.sleep(0.1)


def _clean_env(token: str | None) -> dict[str, str]:
    """Our environment without SCISTREAM_* (a developer's settings must not leak into tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    if token is not None:
        env["SCISTREAM_TOKEN"] = token
    return env


@dataclass
class Facility:
    """One facility: a network namespace with loopback and the "wan" interface up."""

    name: str
    ns: str
    wan_ip: str
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *[str(c) for c in cmd]]

    def run(
        self, *cmd: str | Path, check: bool = True, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs `cmd` inside the namespace and waits; text stdout/stderr are captured."""
        return subprocess.run(
            self._argv([str(c) for c in cmd]),
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            env=env if env is not None else _clean_env(None),
        )

    def spawn(self, *cmd: str | Path, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Starts `cmd` inside the namespace in its own process group; killed at teardown.

        Output goes to `log` (stdout and stderr together) or is discarded.
        """
        out: Any = subprocess.DEVNULL
        if log is not None:
            out = log.open("ab")
        try:
            proc = subprocess.Popen(
                self._argv([str(c) for c in cmd]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_clean_env(None),
            )
        finally:
            if log is not None:
                out.close()
        self.processes.append(proc)
        return proc

    def cli(
        self, *args: str | Path, token: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`scistream ARGS` inside the namespace; never raises on a non-zero exit status."""
        return self.run(SCISTREAM, *args, check=False, timeout=timeout, env=_clean_env(token))

    def pids(self) -> set[int]:
        """Every process whose network namespace is this one."""
        out = host_run("ip", "netns", "pids", self.ns, check=False).stdout
        return {int(p) for p in out.split()}

    def listening_ports(self) -> set[tuple[str, int]]:
        """(protocol, port) of every TCP listener and bound UDP socket in the namespace."""
        out = self.run("ss", "-H", "-lntu").stdout
        found: set[tuple[str, int]] = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 5:
                found.add((fields[0], int(fields[4].rsplit(":", 1)[1])))
        return found

    def wait_listening(self, proto: str, port: int, timeout: float = 10) -> None:
        wait_until(
            lambda: (proto, port) in self.listening_ports(),
            timeout,
            what=f"{proto} port {port} in {self.ns}",
        )

    def kill_all(self) -> None:
        """Kills what we spawned (whole process groups), then anything else left in the namespace."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Topology:
    a: Facility
    b: Facility

    @property
    def facilities(self) -> tuple[Facility, Facility]:
        return (self.a, self.b)


def _register_run() -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / RUN_ID).write_text(str(os.getpid()))


def create_topology(workdir: Path, mtu: int | None = None) -> Topology:
    """Two fresh namespaces with a veth pair between them (of `mtu` bytes, else the veth default
    of 1,500); removes what it made if a step fails."""
    global _serial
    _serial += 1
    _register_run()
    suffix = f"{RUN_ID}{_serial:03x}"
    facilities = {
        side: Facility(side, f"ss{side}-{suffix}", WAN_IPS[side], workdir / side) for side in ("a", "b")
    }
    topology = Topology(facilities["a"], facilities["b"])
    try:
        for f in topology.facilities:
            f.workdir.mkdir(parents=True, exist_ok=True)
            host_run("ip", "netns", "add", f.ns)
        a, b = topology.a, topology.b
        veth = ["type", "veth", "peer", "name", "wan", "netns", b.ns]
        host_run("ip", "link", "add", "wan", "netns", a.ns, *veth)
        for f in topology.facilities:
            host_run("ip", "-n", f.ns, "link", "set", "lo", "up")
            host_run("ip", "-n", f.ns, "addr", "add", f"{f.wan_ip}/{WAN_PREFIX}", "dev", "wan")
            if mtu is not None:
                host_run("ip", "-n", f.ns, "link", "set", "wan", "mtu", str(mtu))
            host_run("ip", "-n", f.ns, "link", "set", "wan", "up")
    except BaseException:
        destroy_topology(topology)
        raise
    return topology


def destroy_topology(topology: Topology) -> None:
    """Kills every process in both namespaces and deletes them (the veth pair goes with them)."""
    for f in topology.facilities:
        f.kill_all()
    for f in topology.facilities:
        delete_namespace(f.ns)


def delete_namespace(ns: str) -> None:
    for pid in host_run("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    for _ in range(50):
        if host_run("ip", "netns", "del", ns, check=False).returncode == 0 or ns not in namespaces():
            return
        time.sleep(0.1)


def namespaces() -> list[str]:
    out = host_run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(run_id: str = RUN_ID, *, stale_runs: bool = False) -> list[str]:
    """Deletes the namespaces of `run_id` (and, with stale_runs, of runs whose process died)."""
    run_ids = {run_id}
    if stale_runs and RUN_DIR.is_dir():
        for pid_file in RUN_DIR.iterdir():
            with contextlib.suppress(ValueError, OSError):
                if not _alive(int(pid_file.read_text())):
                    run_ids.add(pid_file.name)
    prefixes = tuple(p for r in run_ids for p in _ns_prefixes(r))
    removed = [ns for ns in namespaces() if ns.startswith(prefixes)]
    for ns in removed:
        delete_namespace(ns)
    for r in run_ids:
        with contextlib.suppress(FileNotFoundError):
            (RUN_DIR / r).unlink()
    return removed


# ---- appliances -------------------------------------------------------------------------------


class Appliance:
    """`scistream server` in a facility, with TLS and token authentication, and its tokens.

    `admin_token` belongs to subject "alice" (role admin), `bob_token` to subject "bob" (no roles).
    """

    def __init__(self, facility: Facility, *, port_range: str = PORT_RANGE, name: str = "appliance") -> None:
        self.facility = facility
        self.state_dir = facility.workdir / name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.state_dir / "server.log"
        self.tokens_file = self.state_dir / "tokens.yaml"
        self.port_range = port_range
        self.address = f"{facility.wan_ip}:{CONTROL_PORT}"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_token = ""
        self.bob_token = ""
        self.extra_args: list[str] = []  # more `scistream server` flags, for unusual settings

    def create_tokens(self) -> None:
        """Admin "alice" and plain "bob", with `scistream token create` (before the first start)."""
        self.admin_token = self._new_token("alice", admin=True)
        self.bob_token = self._new_token("bob")

    @property
    def ca_file(self) -> Path:
        """The control certificate the server writes on first start (self-signed, so also its CA)."""
        return self.state_dir / "tls" / "control.crt"

    @property
    def client_args(self) -> list[str]:
        return ["--server", self.address, "--ca", str(self.ca_file)]

    def _new_token(self, subject: str, admin: bool = False) -> str:
        args = ["token", "create", "--tokens-file", str(self.tokens_file), "--subject", subject]
        if admin:
            args += ["--role", "admin"]
        done = subprocess.run(
            [str(SCISTREAM), *args], capture_output=True, text=True, timeout=30, env=_clean_env(None)
        )
        assert done.returncode == 0, f"token create failed: {done.stderr}"
        return done.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 15) -> None:
        """Starts the server and waits until `scistream health` answers SERVING."""
        self.spawn()
        self.wait_healthy(timeout)

    def spawn(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = self.facility.spawn(
            SCISTREAM,
            "server",
            "--listen",
            self.address,
            "--advertise",
            self.facility.wan_ip,
            "--state-dir",
            self.state_dir,
            "--auth",
            "tokens",
            "--tokens-file",
            self.tokens_file,
            "--port-range",
            self.port_range,
            "--log-format",
            "json",
            *self.extra_args,
            log=self.log_file,
        )

    def wait_healthy(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"appliance exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ca_file.is_file():
                done = self.facility.cli("health", *self.client_args, "--timeout", "2", timeout=10)
                if done.returncode == 0:
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"appliance not healthy after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit status."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=5)

    def restart(self, timeout: float = 15) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.is_file():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def cli(self, command: str, *args: str, token: str | None = "admin") -> subprocess.CompletedProcess[str]:
        """`scistream COMMAND --server … --ca … ARGS` in this facility; token "admin" (default) or
        any token string, or None for none."""
        if token == "admin":
            token = self.admin_token
        return self.facility.cli(command, *self.client_args, *args, token=token)

    def json(self, command: str, *args: str, token: str | None = "admin") -> Any:
        """Like `cli` with `--json`; asserts success and returns the parsed output."""
        done = self.cli(command, "--json", *args, token=token)
        assert done.returncode == 0, (
            f"scistream {command} failed ({done.returncode}): {done.stderr}\n{self.log_tail()}"
        )
        return json.loads(done.stdout)

    def sessions(self) -> Any:
        return self.json("ls")

    def status(self, session_id: str) -> Any:
        return self.json("status", session_id)

    def wait_state(self, session_id: str, state: str, timeout: float = 10) -> Any:
        def reached() -> Any:
            current = self.status(session_id)
            return current if current["state"] == state else None

        return wait_until(reached, timeout, interval=0.2, what=f"session {session_id} to be {state}")


def start_appliances(*appliances: Appliance, timeout: float = 15) -> None:
    """Creates the tokens of, and starts, several appliances at once (their start-up overlaps)."""
    with ThreadPoolExecutor(len(appliances)) as pool:
        list(pool.map(Appliance.create_tokens, appliances))
    for appliance in appliances:
        appliance.spawn()
    for appliance in appliances:
        appliance.wait_healthy(timeout)


class ApplianceFactory:
    """Starts appliances in facilities; the fixture stops them all at teardown."""

    def __init__(self) -> None:
        self.started: list[Appliance] = []

    def __call__(self, *facilities: Facility, port_range: str = PORT_RANGE) -> list[Appliance]:
        appliances = [Appliance(f, port_range=port_range) for f in facilities]
        self.started += appliances
        start_appliances(*appliances)
        return appliances

    def stop_all(self) -> None:
        for appliance in self.started:
            appliance.stop()
            # Shown by pytest only when the test failed.
            print(f"--- log of the appliance in {appliance.facility.ns} ---\n{appliance.log_tail(60)}")


def ports_of(addresses: Sequence[str]) -> list[int]:
    """The ports of "host:port" strings."""
    return [int(a.rsplit(":", 1)[1]) for a in addresses]


def split_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


# ---- the producer and consumer apps -----------------------------------------------------------

IPERF_PORT = 5201
PRODUCER_DEST = f"127.0.0.1:{IPERF_PORT}"


def start_iperf_server(facility: Facility, port: int = IPERF_PORT) -> subprocess.Popen[bytes]:
    """The producer app: `iperf3 -s` on 127.0.0.1:port, ready when this returns."""
    log = facility.workdir / f"iperf3-server-{port}.log"
    proc = facility.spawn("iperf3", "-s", "-B", "127.0.0.1", "-p", str(port), log=log)
    facility.wait_listening("tcp", port)
    return proc


def run_iperf_client(
    facility: Facility,
    entry_point: str,
    *,
    seconds: int = 2,
    udp: bool = False,
    bitrate: str = "50M",
    length: int | None = None,
    streams: int = 1,
    timeout: float = 30,
) -> dict[str, Any]:
    """The consumer app: `iperf3 -c` through an entry point; returns iperf3's JSON report.

    Raises AssertionError (with iperf3's own error) if it fails.
    """
    host, port = split_address(entry_point)
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "--json", "--connect-timeout", "5000"]
    if udp:
        cmd += ["-u", "-b", bitrate]
    if length:
        cmd += ["-l", str(length)]
    if streams > 1:
        cmd += ["-P", str(streams)]
    done = facility.run(*cmd, check=False, timeout=timeout)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {"error": f"no JSON from iperf3: {done.stdout[-500:]} {done.stderr[-500:]}"}
    if done.returncode != 0 or "error" in report:
        raise AssertionError(f"iperf3 client failed ({done.returncode}): {report.get('error')}")
    return report


def tcp_exchange(facility: Facility, entry_point: str, timeout: float = 5) -> str:
    """Connects to `entry_point` from inside `facility`, sends a line and reads what comes back.

    stdout is "CONNECTED" then "EOF" or "DATA <n>" (bytes read before EOF or timeout), or "REFUSED".
    """
    host, port = split_address(entry_point)
    script = (
        "import socket,sys\n"
        f"s=socket.socket(); s.settimeout({timeout})\n"
        f"try: s.connect(({host!r},{port}))\n"
        "except OSError: print('REFUSED'); sys.exit(0)\n"
        "print('CONNECTED')\n"
        "try:\n"
        "  s.sendall(b'hello\\n'); d=s.recv(65536)\n"
        "  print('DATA %d' % len(d) if d else 'EOF')\n"
        "except socket.timeout: print('TIMEOUT')\n"
        "except OSError as e: print('RESET', e)\n"
    )
    return facility.run(sys.executable, "-c", script, timeout=timeout + 10).stdout.strip()


def send_garbage_datagrams(facility: Facility, target: str, count: int = 200) -> None:
    """Sends `count` datagrams of random bytes (various sizes) to `target` from inside `facility`."""
    host, port = split_address(target)
    script = (
        "import os,socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"for i in range({count}):\n"
        f"  s.sendto(os.urandom(1+(i*97)%1400),({host!r},{port}))\n"
    )
    facility.run(sys.executable, "-c", script)


def drop_arriving(facility: Facility, table: str, *match: str) -> None:
    """nftables in `facility` drops UDP packets arriving over the wan link that also match `match`
    (nft expressions; none: every UDP packet), in a table of their own."""
    facility.run("nft", "add", "table", "inet", table)
    facility.run(
        "nft", "add", "chain", "inet", table, "input",
        "{ type filter hook input priority 0 ; policy accept ; }",
    )  # fmt: skip
    facility.run("nft", "add", "rule", "inet", table, "input", "iifname", "wan",
                 "meta", "l4proto", "udp", *match, "drop")  # fmt: skip


def have_tools() -> str | None:
    """None when the integration tests can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if shutil.which("iperf3") is None:
        return "needs iperf3"
    if shutil.which("ss") is None:
        return "needs ss (iproute2)"
    probe = f"ssp-{secrets.token_hex(3)}"
    if host_run("ip", "netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` does not work here"
    host_run("ip", "netns", "del", probe, check=False)
    return None


def json_log_lines(appliance: Appliance) -> Iterator[dict[str, Any]]:
    """The appliance's JSON log records (lines that are not JSON are skipped)."""
    for line in appliance.log_file.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                yield record


TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def assert_cli_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A failed CLI call: non-zero exit, exactly one line on stderr, no traceback, and (if given) one of
    `needles` in that line (case-insensitive). Returns the line."""
    assert done.returncode != 0, f"expected a failure, got exit 0 with: {done.stdout}"
    assert not TRACEBACK.search(done.stderr), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {done.stderr!r}"
    if needles:
        assert any(n.lower() in lines[0].lower() for n in needles), lines[0]
    return lines[0]


def fingerprint_of_cert(path: Path) -> str:
    """SHA-256 of the DER form of a PEM certificate, as hex (what --fingerprint takes)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def assert_upload_counted(
    producer: Appliance, producer_id: str, consumer: Appliance, consumer_id: str
) -> None:
    """After the consumer app sent bulk data to the producer app (iperf3 -c at B): every mode counts
    `bytes_in` as what came from the local app and `bytes_out` as what went to it, so the consumer
    side took in more than it delivered and the producer side delivered more than it took in."""

    def counted(appliance: Appliance, session_id: str, upload_side: bool) -> Any:
        s = appliance.status(session_id)
        big, small = (s["bytes_in"], s["bytes_out"]) if upload_side else (s["bytes_out"], s["bytes_in"])
        return s if big > small > 0 else None

    wait_until(lambda: counted(consumer, consumer_id, True), 5, 0.2, "consumer side: in > out > 0")
    wait_until(lambda: counted(producer, producer_id, False), 5, 0.2, "producer side: out > in > 0")
