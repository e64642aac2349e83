"""A chaos campaign: create/release cycles over quic, tls and wireguard with faults injected at random,
and after every cycle a check that nothing leaked.

Two real appliances (`scistream server`) in network namespaces, driven through the real CLI (the
integration tests' topology). Each cycle picks a mode and a fault with a seeded random generator (the
seed is printed, so a run can be repeated), opens a session, injects the fault, ends the session and
waits until both appliances are back to nothing: no port of the data range bound, no wireguard-go, no
process in the namespace but the appliance, its children and the test app, no `ssw*` interface,
nftables table or UAPI socket, no secret or undelivered Leave in the store, no session that is not
RELEASED or FAILED (the appliances run with a short `--peer-grace`). What is still there after the
settling time is a leak.

    .venv/bin/python -m tests.chaos.campaign --cycles 1000 --seed 7     (or scripts/chaos …)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.dataplane.wireguard.driver import PREFIX, appliance_tag
from appliance.dataplane.wireguard.rules import TABLE_PREFIX
from appliance.dataplane.wireguard.uapi import SOCKET_DIR
from appliance.sessions.ports import PortRange
from tests.integration.topology import (
    PORT_RANGE,
    Appliance,
    Facility,
    Topology,
    create_topology,
    destroy_topology,
    host_run,
    start_appliances,
    sweep,
    tcp_exchange,
)

MODES = ("quic", "tls", "wireguard")
FAULTS = (
    "none",
    "sigkill-producer",
    "sigkill-consumer",
    "sigterm-producer",
    "sigterm-consumer",
    "release-while-peer-down",
    "short-lease",
    "refused-destination",
    "double-join",
)
ECHO_PORT = 7000
REFUSED_PORT = 7999  # nothing listens there
TERMINAL = ("RELEASED", "FAILED")
ECHO_SERVER = (
    "import socket,threading\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    f"s.bind(('127.0.0.1',{ECHO_PORT})); s.listen(128)\n"
    "def echo(c):\n"
    "  with c:\n"
    "    while d := c.recv(65536): c.sendall(d)\n"
    "while True:\n"
    "  c,_=s.accept(); threading.Thread(target=echo,args=(c,),daemon=True).start()\n"
)


class CycleError(Exception):
    """The appliances did something a cycle does not allow (not a leak: a wrong answer)."""


@dataclass
class Result:
    cycle: int
    mode: str
    fault: str
    leaks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outcome: str = ""  # after a restart: whether the session survived it


def _wait(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Campaign:
    def __init__(self, topology: Topology, grace: float, rng: random.Random) -> None:
        self.topology = topology
        self.grace = grace
        self.rng = rng
        self.a = Appliance(topology.a)  # producer side
        self.b = Appliance(topology.b)  # consumer side
        for appliance in (self.a, self.b):
            appliance.extra_args = ["--peer-grace", f"{grace}s"]
        start_appliances(self.a, self.b)
        self.echo_pid = topology.a.spawn(sys.executable, "-c", ECHO_SERVER).pid
        topology.a.wait_listening("tcp", ECHO_PORT)
        self.ports = PortRange.parse(PORT_RANGE)

    # ---- one cycle -------------------------------------------------------------------------

    def cycle(self, number: int) -> Result:
        mode, fault = self.rng.choice(MODES), self.rng.choice(FAULTS)
        result = Result(number, mode, fault)
        began = time.monotonic()
        try:
            result.outcome = getattr(self, "_" + fault.replace("-", "_"))(mode) or ""
        except (CycleError, AssertionError) as exc:
            result.errors.append(str(exc).splitlines()[0][:300])
            self._recover()
        result.leaks = self._settle()
        if result.leaks:
            self._recover()
        result.seconds = time.monotonic() - began
        return result

    def _open(self, mode: str, *inbound: str, dest: str = f"127.0.0.1:{ECHO_PORT}") -> tuple[Any, Any]:
        producer = self.a.json("inbound", "--dest", dest, "--mode", mode, *inbound)
        consumer = self.b.json("outbound", producer["ticket"])
        return producer, consumer

    def _carries(self, consumer: Any, timeout: float = 30) -> None:
        if not self._carried(consumer, timeout):
            raise CycleError(f"entry point {consumer['entry_points'][0]} does not carry the session")

    def _carried(self, consumer: Any, timeout: float) -> bool:
        """Whether the entry point carries the session within `timeout` (False at once if the
        consumer side's session ends meanwhile)."""
        entry = consumer["entry_points"][0]

        def done() -> str:
            if tcp_exchange(self.topology.b, entry, 3) == "CONNECTED\nDATA 6":
                return "carries"
            return "ended" if self.b.status(consumer["session_id"])["state"] in TERMINAL else ""

        return bool(_wait(done, timeout, 0.5) == "carries")

    def _release_somewhere(self, producer: Any, consumer: Any) -> None:
        side, record = self.rng.choice([(self.a, producer), (self.b, consumer)])
        done = side.cli("release", record["session_id"])
        if done.returncode != 0 and "already" not in done.stderr:
            raise CycleError(f"release failed: {done.stderr.strip()}")

    def _none(self, mode: str) -> None:
        producer, consumer = self._open(mode)
        self._carries(consumer)
        self._release_somewhere(producer, consumer)

    def _kill_and_restart(self, mode: str, victim: str, sig: signal.Signals) -> str:
        """The session survives a restart shorter than --peer-grace; after a longer one the peer may
        have ended it (then both sides must end: the leak check sees to that)."""
        producer, consumer = self._open(mode)
        self._carries(consumer)
        appliance, record = (self.a, producer) if victim == "producer" else (self.b, consumer)
        began = time.monotonic()
        self._signal(appliance, sig)
        appliance.start()
        down_for = time.monotonic() - began
        state = appliance.status(record["session_id"])["state"]
        if state == "ACTIVE" and self._carried(consumer, 30):
            self._release_somewhere(producer, consumer)
            return "survived"
        if down_for < self.grace - 1:
            raise CycleError(f"the session did not survive a {down_for:.1f} s restart of the {victim} side")
        return "ended: down longer than --peer-grace"

    def _sigkill_producer(self, mode: str) -> str:
        return self._kill_and_restart(mode, "producer", signal.SIGKILL)

    def _sigkill_consumer(self, mode: str) -> str:
        return self._kill_and_restart(mode, "consumer", signal.SIGKILL)

    def _sigterm_producer(self, mode: str) -> str:
        return self._kill_and_restart(mode, "producer", signal.SIGTERM)

    def _sigterm_consumer(self, mode: str) -> str:
        return self._kill_and_restart(mode, "consumer", signal.SIGTERM)

    def _release_while_peer_down(self, mode: str) -> None:
        producer, consumer = self._open(mode)
        (releaser, record), (down, _) = self.rng.sample([(self.a, producer), (self.b, consumer)], 2)
        self._signal(down, self.rng.choice([signal.SIGKILL, signal.SIGTERM]))
        released = releaser.json("release", record["session_id"])
        if released["state"] != "RELEASED":
            raise CycleError(f"release while the peer is down gave {released['state']}")
        time.sleep(self.rng.uniform(0, self.grace))
        down.start()

    def _short_lease(self, mode: str) -> None:
        producer, consumer = self._open(mode, "--ttl", "2s")
        self._carries(consumer)
        ended = _wait(lambda: self.a.status(producer["session_id"])["state"] in TERMINAL, 10)
        if not ended:
            raise CycleError("a 2 s lease did not end the producer side's session")

    def _refused_destination(self, mode: str) -> None:
        producer, consumer = self._open(mode, dest=f"127.0.0.1:{REFUSED_PORT}")
        outcome = tcp_exchange(self.topology.b, consumer["entry_points"][0], 3)
        if "DATA" in outcome:
            raise CycleError(f"a refused destination answered: {outcome}")
        self._release_somewhere(producer, consumer)

    def _double_join(self, mode: str) -> None:
        producer, consumer = self._open(mode)
        again = self.b.cli("outbound", producer["ticket"])
        if again.returncode == 0:
            raise CycleError("a ticket was joined twice")
        self._carries(consumer)
        self._release_somewhere(producer, consumer)

    @staticmethod
    def _signal(appliance: Appliance, sig: signal.Signals) -> None:
        """SIGKILL hits the appliance alone (what it runs lives on, as after a crash); SIGTERM is the
        clean stop."""
        if sig is signal.SIGTERM:
            appliance.stop()
            return
        assert appliance.process is not None
        os.kill(appliance.process.pid, signal.SIGKILL)
        appliance.process.wait(timeout=10)

    # ---- after each cycle ------------------------------------------------------------------

    def _settle(self) -> list[str]:
        """Waits (--peer-grace and a margin) until nothing is left; returns what still is."""
        found = _wait(lambda: not self.leaks(), self.grace * 3 + 20, 0.5)
        return [] if found else self.leaks()

    def leaks(self) -> list[str]:
        found: list[str] = []
        for appliance in (self.a, self.b):
            found += [f"{appliance.facility.name}: {what}" for what in self._leaks_of(appliance)]
        return found

    def _leaks_of(self, appliance: Appliance) -> list[str]:
        facility = appliance.facility
        found = [
            f"port {proto}/{port} bound" for proto, port in facility.listening_ports() if port in self.ports
        ]
        processes = _processes(facility)
        found += [f"wireguard-go pid {pid}" for pid, argv in processes if argv[:1] == ["wireguard-go"]]
        owner = appliance.process.pid if appliance.process else -1
        relays = {
            module: [pid for pid, argv in processes if module in argv]
            for module in ("appliance.dataplane.tlsrelay.worker", "appliance.dataplane.quicworker")
        }
        found += [
            f"stray process pid {pid}: {' '.join(argv)[:80]}"
            for pid, argv in processes
            if pid not in (owner, self.echo_pid) and argv[:1] != ["wireguard-go"] and _parent(pid) != owner
        ]
        for module, pids in relays.items():  # the appliances run with the default --workers
            if len(pids) > (os.cpu_count() or 1):
                found.append(f"{len(pids)} relay processes ({module}), more than --workers")
        links = host_run("ip", "-n", facility.ns, "-o", "link", "show").stdout
        found += [
            f"interface {line.split(':')[1].strip()}" for line in links.splitlines() if f": {PREFIX}" in line
        ]
        tables = facility.run("nft", "list", "tables").stdout
        found += [f"nft {line.strip()}" for line in tables.splitlines() if TABLE_PREFIX + PREFIX in line]
        tag = PREFIX + appliance_tag(str(appliance.state_dir.resolve()))
        found += (
            [f"UAPI socket {p.name}" for p in SOCKET_DIR.glob(f"{tag}*.sock")] if SOCKET_DIR.is_dir() else []
        )
        found += [f"file {p.name}" for p in (appliance.state_dir / "wireguard").glob("*") if p.is_file()]
        found += _store_leaks(appliance.state_dir / "sessions.db")
        return found

    def _recover(self) -> None:
        """After a wrong answer or a leak: release what is left and restart both appliances, so the
        next cycle starts clean (what was wrong is already counted)."""
        for appliance in (self.a, self.b):
            if appliance.process is None or appliance.process.poll() is not None:
                with contextlib.suppress(AssertionError):
                    appliance.start()
            with contextlib.suppress(AssertionError, ValueError):
                for session in appliance.sessions():
                    if session["state"] not in TERMINAL:
                        appliance.cli("release", session["session_id"])
        for appliance in (self.a, self.b):
            with contextlib.suppress(AssertionError):
                appliance.restart()

    def close(self) -> None:
        for appliance in (self.a, self.b):
            appliance.stop()


def _processes(facility: Facility) -> list[tuple[int, list[str]]]:
    found = []
    for pid in facility.pids():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            found.append((pid, [os.path.basename(argv[0]), *argv[1:]]))
    return found


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def _store_leaks(path: Path) -> list[str]:
    if not path.exists():
        return ["sessions.db missing"]
    found = []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        for session_id, state in db.execute("SELECT session_id, state FROM sessions"):
            if state not in TERMINAL:
                found.append(f"session {session_id} is {state}")
        secrets = db.execute("SELECT count(*) FROM secrets").fetchone()[0]
        if secrets:
            found.append(f"{secrets} session secrets kept")
        with contextlib.suppress(sqlite3.OperationalError):  # a store without the leaves table
            leaves = db.execute("SELECT count(*) FROM leaves").fetchone()[0]
            if leaves:
                found.append(f"{leaves} Leaves undelivered")
    return found


@dataclass
class Summary:
    seed: int
    results: list[Result]

    @property
    def leaks(self) -> int:
        return sum(len(r.leaks) for r in self.results)

    @property
    def errors(self) -> int:
        return sum(len(r.errors) for r in self.results)

    def lines(self) -> list[str]:
        faults = Counter(r.fault for r in self.results)
        modes = Counter(r.mode for r in self.results)
        outcomes = Counter(r.outcome for r in self.results if r.outcome)
        took = sum(r.seconds for r in self.results)
        return [
            f"seed {self.seed}: {len(self.results)} cycles in {took:.0f} s, "
            f"{self.leaks} leaks, {self.errors} errors",
            "modes: " + ", ".join(f"{k} {v}" for k, v in sorted(modes.items())),
            "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())),
            "after restarts: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        ]


def run(
    cycles: int,
    seed: int,
    grace: float,
    workdir: Path,
    report: Callable[[str], None],
    max_seconds: float = float("inf"),
) -> Summary:
    """Runs `cycles` cycles (fewer if `max_seconds` run out first) and reports each as it ends."""
    deadline = time.monotonic() + max_seconds
    rng = random.Random(seed)
    report(f"chaos campaign: seed {seed}, {cycles} cycles, --peer-grace {grace}s")
    topology = create_topology(workdir)
    results: list[Result] = []
    try:
        campaign = Campaign(topology, grace, rng)
        try:
            for number in range(1, cycles + 1):
                if time.monotonic() > deadline:
                    report(f"stopped after {number - 1} cycles: --max-minutes reached")
                    break
                result = campaign.cycle(number)
                results.append(result)
                status = "ok" if not (result.leaks or result.errors) else "LEAK/ERROR"
                took = f"{result.seconds:5.1f} s {status} {result.outcome}"
                report(f"cycle {number:4d} {result.mode:9s} {result.fault:24s} {took}")
                for line in result.errors:
                    report(f"    error: {line}")
                for line in result.leaks:
                    report(f"    leak: {line}")
        finally:
            campaign.close()
    finally:
        destroy_topology(topology)
    summary = Summary(seed, results)
    for line in summary.lines():
        report(line)
    return summary


def _print(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument(
        "--peer-grace", type=float, default=3.0, help="seconds (the appliances' --peer-grace)"
    )
    parser.add_argument("--max-minutes", type=float, default=0, help="stop after this long (0: no limit)")
    args = parser.parse_args(argv)
    limit = args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    try:
        with tempfile.TemporaryDirectory(prefix="scistream-chaos-") as tmp:
            summary = run(args.cycles, seed, args.peer_grace, Path(tmp), _print, limit)
    finally:
        sweep()
    return 1 if summary.leaks or summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
