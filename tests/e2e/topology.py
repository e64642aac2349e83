"""The compose `demo` profile as a Python object: two facilities' appliances in containers, a producer app
(`iperf3 -s`) behind A, a consumer behind B, joined by the `wan` network.

Used by the end-to-end tests and by `scripts/demo`, so the demo shows what the tests check. The topology
is brought up and down with compose (the file users run); everything else goes through the `docker`
Python SDK: health, exec, network faults, restarts, kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container
from docker.models.networks import Network

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SCISTREAM_IMAGE", "scistream/appliance:latest")
CONTROL_PORT = 5000
IPERF_PORT = 5201
STATE_CERT = "/var/lib/scistream/tls/control.crt"


def docker_problem() -> str | None:
    """Why Docker cannot be used here, or None."""
    if shutil.which("docker") is None:
        return "no docker client (scripts/bootstrap installs it with SCISTREAM_DOCKER=1)"
    if compose_command() is None:
        return "no docker compose (v2 plugin) or docker-compose (v1)"
    try:
        docker.from_env().ping()
    except docker.errors.DockerException as exc:
        return f"no Docker engine: {exc}"
    return None


def compose_command() -> list[str] | None:
    """`docker compose` (v2) if present, else Debian's `docker-compose` (v1); SCISTREAM_COMPOSE overrides."""
    if os.environ.get("SCISTREAM_COMPOSE"):
        return os.environ["SCISTREAM_COMPOSE"].split()
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if v2.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def build_image() -> str:
    """Builds (or reuses) the appliance image with images/build; returns what it printed."""
    result = subprocess.run(
        [str(ROOT / "images" / "build"), IMAGE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"images/build failed:\n{result.stdout}")
    return result.stdout.strip()


@dataclass(frozen=True)
class Exec:
    code: int
    output: str


@dataclass
class Demo:
    """One instance of the demo profile, as compose project `project` on subnets `net`.0-2.0/24."""

    project: str = "scistream-demo"
    net: str = "10.201"
    peer_grace: float = 60.0
    client: docker.DockerClient = field(default_factory=docker.from_env)
    _pins: dict[str, str] = field(default_factory=dict)

    # ---- addresses -------------------------------------------------------------------------

    @property
    def a_wan(self) -> str:
        return f"{self.net}.0.10"

    @property
    def b_wan(self) -> str:
        return f"{self.net}.0.20"

    @property
    def b_site(self) -> str:
        """Facility B's address on its own site network, where the consumer app reaches entry points."""
        return f"{self.net}.2.20"

    @property
    def producer_dest(self) -> str:
        return f"{self.net}.1.100:{IPERF_PORT}"

    # ---- lifecycle -------------------------------------------------------------------------

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = compose_command()
        assert command is not None, "no compose"
        env = {
            **os.environ,
            "SCISTREAM_IMAGE": IMAGE,
            "SCISTREAM_DEMO_NET": self.net,
            "SCISTREAM_PEER_GRACE": str(self.peer_grace),
        }
        full = [*command, "-f", str(ROOT / "compose.yaml"), "-p", self.project, "--profile", "demo", *args]
        result = subprocess.run(full, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed:\n{result.stdout}{result.stderr}")
        return result

    def up(self, timeout: float = 120) -> None:
        """Starts both facilities and both apps; returns once both appliances are healthy."""
        self.compose("up", "-d", "--no-build", "facility-a", "facility-b", "producer", "consumer")
        for service in ("facility-a", "facility-b"):
            self.wait_healthy(service, timeout)

    def down(self) -> None:
        """Removes every container, network and volume of the project (also after a failed `up`)."""
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        self._pins.clear()
        label = f"com.docker.compose.project={self.project}"
        for container in self.client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters={"label": label}):
            network.remove()
        for volume in self.client.volumes.list(filters={"label": label}):
            volume.remove(force=True)

    def leftovers(self) -> list[str]:
        """Names of containers, networks and volumes of this project that still exist."""
        label = {"label": f"com.docker.compose.project={self.project}"}
        return [
            *(c.name for c in self.client.containers.list(all=True, filters=label)),
            *(n.name for n in self.client.networks.list(filters=label)),
            *(v.name for v in self.client.volumes.list(filters=label)),
        ]

    # ---- containers ------------------------------------------------------------------------

    def container(self, service: str) -> Container:
        filters = {
            "label": [f"com.docker.compose.project={self.project}", f"com.docker.compose.service={service}"]
        }
        found = self.client.containers.list(all=True, filters=filters)
        assert len(found) == 1, f"expected one {service} container, found {len(found)}"
        return found[0]

    def health(self, service: str) -> str:
        container = self.container(service)
        container.reload()
        return str(container.attrs["State"].get("Health", {}).get("Status", "none"))

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        wait_until(lambda: self.health(service) == "healthy", timeout, f"{service} healthy")

    def exec(self, service: str, *command: str) -> Exec:
        code, output = self.container(service).exec_run(list(command), demux=False)
        return Exec(int(code), (output or b"").decode(errors="replace"))

    def fingerprint(self, service: str) -> str:
        """SHA-256 of the appliance's control certificate, as users pin it (it lives in the volume, so
        restarts keep it)."""
        if service not in self._pins:
            pem = self.exec(service, "cat", STATE_CERT)
            assert pem.code == 0, pem.output
            self._pins[service] = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.output)).hexdigest()
        return self._pins[service]

    def scistream(self, service: str, *args: str) -> Any:
        """`scistream ARGS --json` inside an appliance container, against that appliance."""
        result = self.exec(service, "scistream", *args, "--json")
        if result.code != 0:
            raise RuntimeError(f"scistream {' '.join(args)} in {service}: {result.output.strip()}")
        return json.loads(result.output)

    def local(self, service: str, *args: str) -> Any:
        """A client command at the appliance of `service` itself, pinned by its fingerprint."""
        pin = ("--server", f"127.0.0.1:{CONTROL_PORT}", "--fingerprint", self.fingerprint(service))
        return self.scistream(service, *args, *pin)

    # ---- sessions --------------------------------------------------------------------------

    def connect(self, *options: str) -> dict[str, Any]:
        """`scistream connect` from facility B's container: producer side A, consumer side B."""
        result: dict[str, Any] = self.scistream(
            "facility-b",
            "connect",
            "--producer",
            f"{self.a_wan}:{CONTROL_PORT}",
            "--consumer",
            f"127.0.0.1:{CONTROL_PORT}",
            "--producer-fingerprint",
            self.fingerprint("facility-a"),
            "--consumer-fingerprint",
            self.fingerprint("facility-b"),
            "--dest",
            self.producer_dest,
            *options,
        )
        return result

    def status(self, service: str, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.local(service, "status", session_id)
        return result

    def release(self, service: str, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.local(service, "release", session_id)
        return result

    def iperf(
        self, entry_port: int, seconds: int = 3, udp: bool = False, bitrate: str = "", check: bool = True
    ) -> dict[str, Any]:
        """iperf3 from the consumer container to facility B's entry point; the JSON report."""
        args = ["iperf3", "-c", self.b_site, "-p", str(entry_port), "-t", str(seconds), "-J"]
        args += ["--connect-timeout", "5000"]
        if udp:
            args += ["-u", "-l", "1200", "-b", bitrate or "20M"]
        result = self.exec("consumer", *args)
        report: dict[str, Any] = json.loads(result.output) if result.output.strip().startswith("{") else {}
        if check and (result.code != 0 or "error" in report):
            raise RuntimeError(f"iperf3 failed: {report.get('error') or result.output.strip()}")
        return report

    # ---- faults ----------------------------------------------------------------------------

    def network(self, name: str) -> Network:
        labels = [f"com.docker.compose.project={self.project}", f"com.docker.compose.network={name}"]
        found = self.client.networks.list(filters={"label": labels})
        assert len(found) == 1, f"expected one {name} network, found {len(found)}"
        return found[0]

    def disconnect_wan(self, service: str) -> None:
        self.network("wan").disconnect(self.container(service))

    def reconnect_wan(self, service: str, address: str) -> None:
        self.network("wan").connect(self.container(service), ipv4_address=address)


def entry_port(session: dict[str, Any]) -> int:
    return int(str(session["consumer"]["entry_points"][0]).rsplit(":", 1)[1])


def received_mbits(report: dict[str, Any]) -> float:
    end = report["end"]
    summary = end.get("sum_received") or end.get("sum")
    return float(summary["bits_per_second"]) / 1e6


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
