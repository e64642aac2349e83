"""deploy/swarm/stack.yaml on a real single-node Docker Swarm: two stacks of it on this host (a producer
side and a consumer side, each on its own ports and state directory), a producer app (`iperf3 -s`) on the
host, and the `scistream` CLI and iperf3 client on the host as a user would run them.

The swarm is made here when the engine has none (`docker swarm init` on 127.0.0.1) and left again at the
end; an existing swarm is kept, and only the node label this module added is taken off again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container

from .topology import ROOT, wait_until

STACK_FILE = ROOT / "deploy" / "swarm" / "stack.yaml"
SCISTREAM = Path(sys.executable).parent / "scistream"
GATEWAY_LABEL = "scistream.gateway"
# The ports of one stack: control port, then a data port range; 40 per stack, two stacks and iperf3.
PORTS_PER_STACK = 40


def docker_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout.strip()


@contextmanager
def single_node_swarm() -> Iterator[str]:
    """This engine as a swarm manager whose node carries the gateway label; yields the node id."""
    state = docker_cli("info", "--format", "{{.Swarm.LocalNodeState}}")
    created = state == "inactive"
    if created:
        docker_cli("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
    node = docker_cli("info", "--format", "{{.Swarm.NodeID}}")
    labels = docker_cli("node", "inspect", node, "--format", "{{json .Spec.Labels}}")
    labelled = GATEWAY_LABEL not in json.loads(labels or "{}")
    if labelled:
        docker_cli("node", "update", "--label-add", f"{GATEWAY_LABEL}=true", node)
    try:
        yield node
    finally:
        if created:
            docker_cli("swarm", "leave", "--force", check=False)
            # `swarm init` made this bridge; leaving keeps it.
            docker_cli("network", "rm", "docker_gwbridge", check=False)
        elif labelled:
            docker_cli("node", "update", "--label-rm", GATEWAY_LABEL, node, check=False)


def port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with closing(socket.socket(socket.AF_INET, kind)) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def free_port_block(size: int, start: int = 21000, stop: int = 29000) -> int:
    """The first port of `size` consecutive ports that nothing on this host holds (TCP or UDP)."""
    base = start + (os.getpid() % 50) * size  # parallel runs start their search apart
    candidates: list[int] = [*range(base, stop - size, size), *range(start, base, size)]
    for first in candidates:
        if all(port_is_free(p) for p in range(first, first + size)):
            return first
    raise RuntimeError(f"no {size} free ports between {start} and {stop}")


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@dataclass
class Stack:
    """One deployment of deploy/swarm/stack.yaml: stack `name`, control port `port`, state in `state`."""

    name: str
    image: str
    port: int
    state: Path
    tokens: Path
    client: docker.DockerClient = field(default_factory=docker.from_env)

    @property
    def service(self) -> str:
        return f"{self.name}_appliance"

    @property
    def port_range(self) -> str:
        return f"{self.port + 2}-{self.port + PORTS_PER_STACK - 1}"  # port + 1: WireGuard

    def deploy(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)  # a bind mount's source must exist on the node
        env = {
            "SCISTREAM_IMAGE": self.image,
            "SCISTREAM_TOKENS": str(self.tokens),
            "SCISTREAM_STATE_DIR_HOST": str(self.state),
            "SCISTREAM_LISTEN": f"0.0.0.0:{self.port}",
            "SCISTREAM_PORT_RANGE": self.port_range,
            "SCISTREAM_WIREGUARD_PORT": str(self.port + 1),
            "SCISTREAM_PEER_GRACE": "60",
            "SCISTREAM_HEALTH_INTERVAL": "2s",
            "SCISTREAM_UPDATE_MONITOR": "5s",
        }
        docker_cli("stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), self.name, env=env)

    def remove(self) -> None:
        docker_cli("stack", "rm", self.name, check=False)

    def leftovers(self) -> list[str]:
        """Services, containers, secrets and networks of this stack that still exist."""
        label = f"com.docker.stack.namespace={self.name}"
        found = []
        for kind in ("service", "secret", "network"):
            names = docker_cli(kind, "ls", "--filter", f"label={label}", "--format", "{{.Name}}")
            found += [f"{kind} {n}" for n in names.splitlines() if n]
        containers = self.client.containers.list(all=True, filters={"label": label}, sparse=True)
        return found + [f"container {c.id[:12]}" for c in containers]

    def tasks(self) -> list[dict[str, Any]]:
        out = docker_cli("service", "ps", self.service, "--no-trunc", "--format", "{{json .}}")
        return [json.loads(line) for line in out.splitlines() if line]

    def container(self) -> Container:
        """The running container of the service's one task (a global service on a one-node swarm)."""
        filters = {"label": f"com.docker.swarm.service.name={self.service}", "status": "running"}
        # sparse: no inspect of each listed container, one of which may be going away during an update
        found = self.client.containers.list(filters=filters, sparse=True)
        assert len(found) == 1, f"expected one running {self.service} container, found {len(found)}"
        return self.client.containers.get(found[0].id)

    def health(self) -> str:
        try:
            container = self.container()
        except (AssertionError, docker.errors.NotFound):
            return "no container"
        return str(container.attrs["State"].get("Health", {}).get("Status", "none"))

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_until(lambda: self.health() == "healthy", timeout, f"{self.service} healthy")

    def exec(self, *command: str) -> str:
        code, output = self.container().exec_run(list(command))
        text = (output or b"").decode(errors="replace")
        assert code == 0, f"{' '.join(command)} in {self.service}: {text}"
        return text

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.state / "tls" / "control.crt")

    def scistream(self, token: str, *args: str) -> Any:
        """`scistream ARGS --json` from the host against this appliance, pinned by its fingerprint."""
        command = [str(SCISTREAM), *args, "--server", f"127.0.0.1:{self.port}", "--json"]
        command += ["--fingerprint", self.fingerprint, "--token", token]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"scistream {' '.join(args)}: {result.stderr.strip()}")
        return json.loads(result.stdout)


def connect(producer: Stack, consumer: Stack, token: str, dest: str) -> dict[str, Any]:
    """`scistream connect` from the host, as a user at facility B would run it."""
    command = [
        str(SCISTREAM),
        "connect",
        "--producer",
        f"127.0.0.1:{producer.port}",
        "--consumer",
        f"127.0.0.1:{consumer.port}",
        "--producer-fingerprint",
        producer.fingerprint,
        "--consumer-fingerprint",
        consumer.fingerprint,
        "--dest",
        dest,
        "--token",
        token,
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"scistream connect: {result.stderr.strip()}")
    session: dict[str, Any] = json.loads(result.stdout)
    return session


def iperf(port: int, seconds: int = 2) -> dict[str, Any]:
    """iperf3 from the host to an entry point on the host; the JSON report ({} when iperf3 printed none)."""
    command = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    command += ["--connect-timeout", "5000"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 30)
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return report


def received_bytes(report: dict[str, Any]) -> int:
    if not report or "error" in report:
        return 0
    return int(report["end"]["sum_received"]["bytes"])
