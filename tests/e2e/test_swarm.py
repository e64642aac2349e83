"""deploy/swarm/stack.yaml on a real single-node Docker Swarm: deploy, a session through it, a rolling
update to a new image that keeps the ACTIVE session carrying traffic (the restore path), and removal.

Facility A (producer side) and facility B (consumer side) are two deployments of the same stack file on
this one node, each on its own ports and state directory; the producer app (`iperf3 -s`) and the user
(`scistream` CLI, `iperf3 -c`) are on the host, as on a gateway node. Assertions never depend on timing:
the update's duration is printed (pytest -s), not checked.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .swarm import (
    PORTS_PER_STACK,
    SCISTREAM,
    Stack,
    connect,
    docker_cli,
    free_port_block,
    iperf,
    received_bytes,
    single_node_swarm,
)
from .topology import IMAGE, wait_until

pytestmark = pytest.mark.e2e
UPDATE_LABEL = "org.scistream.test.update"


class Pool:
    """Both stacks, the producer app, the user's token and the session the tests share."""

    def __init__(self, a: Stack, b: Stack, token: str, dest_port: int) -> None:
        self.a, self.b, self.token, self.dest_port = a, b, token, dest_port
        self.session: dict[str, Any] = {}

    def states(self) -> tuple[str, str]:
        producer = self.a.scistream(self.token, "status", self.session["producer"]["session_id"])
        consumer = self.b.scistream(self.token, "status", self.session["consumer"]["session_id"])
        return producer["state"], consumer["state"]

    @property
    def entry_port(self) -> int:
        return int(str(self.session["consumer"]["entry_points"][0]).rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def pool(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tag = IMAGE
    work = tmp_path_factory.mktemp("swarm")
    tokens = work / "tokens.yaml"
    created = subprocess.run(
        [str(SCISTREAM), "token", "create", "--tokens-file", str(tokens), "--subject", "swarm-test"],
        capture_output=True,
        text=True,
        check=True,
    )
    token = created.stdout.strip()
    first = free_port_block(2 * PORTS_PER_STACK + 1)
    name = f"scistream-swarm-{os.getpid()}"
    a = Stack(f"{name}-a", tag, first, work / "state-a", tokens)
    b = Stack(f"{name}-b", tag, first + PORTS_PER_STACK, work / "state-b", tokens)
    dest_port = first + 2 * PORTS_PER_STACK
    producer_app = subprocess.Popen(
        ["iperf3", "-s", "-p", str(dest_port), "--rcv-timeout", "5000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with single_node_swarm():
            try:
                for stack in (a, b):
                    stack.deploy()
                for stack in (a, b):
                    stack.wait_healthy()
                yield Pool(a, b, token, dest_port)
            finally:
                for stack in (a, b):
                    stack.remove()
                wait_until(lambda: not a.leftovers() and not b.leftovers(), 120, "the stacks removed")
                docker_cli("image", "rm", f"{tag}-swarm-update", check=False)
    finally:
        producer_app.terminate()
        producer_app.wait(10)


def test_the_stack_runs_one_unprivileged_appliance_per_gateway_node_with_state_on_the_node(
    pool: Pool,
) -> None:
    for stack in (pool.a, pool.b):
        mode = docker_cli("service", "inspect", stack.service, "--format", "{{json .Spec.Mode}}")
        assert '"Global"' in mode
        running = [t for t in stack.tasks() if t["CurrentState"].startswith("Running")]
        assert len(running) == 1
        container = stack.container()
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert stack.health() == "healthy"
        show = "for d in /proc/[0-9]*; do "
        show += '[ "$(cat $d/comm)" = scistream ] && grep -E "^(Uid|CapEff)" $d/status; done'
        shown = stack.exec("sh", "-c", show)
        fields = dict(line.split(":", 1) for line in shown.splitlines())
        assert fields["Uid"].split() == ["10001"] * 4
        assert int(fields["CapEff"], 16) == 1 << 12  # CAP_NET_ADMIN only
        # Swarm passes no devices: the entrypoint made the container's own TUN node for the appliance.
        assert stack.exec("stat", "-c", "%F %t:%T %G", "/dev/net/tun").split() == [
            "character",
            "special",
            "file",
            "a:c8",
            "scistream",
        ]
        # The tokens file is a Swarm secret only the appliance's user can read.
        assert stack.exec("stat", "-c", "%a %U", "/run/secrets/scistream-tokens").split() == [
            "400",
            "scistream",
        ]
        # State on the node: what the restore path and pinned fingerprints need survives the container.
        assert (stack.state / "sessions.db").is_file() and (stack.state / "tls" / "control.crt").is_file()
        assert stack.scistream(pool.token, "health") == {"status": "SERVING"}


def test_a_session_through_the_swarm_appliances_carries_iperf3(pool: Pool) -> None:
    pool.session = connect(pool.a, pool.b, pool.token, f"127.0.0.1:{pool.dest_port}")
    assert pool.states() == ("ACTIVE", "ACTIVE")
    assert received_bytes(iperf(pool.entry_port)) > 0


def test_a_rolling_update_to_a_new_image_keeps_the_active_session_carrying_traffic(pool: Pool) -> None:
    assert pool.session, "needs the session of the previous test"
    old = pool.a.container()
    new_image = f"{pool.a.image}-swarm-update"
    # A different image (its own id), made from the one under test without a registry or a rebuild.
    subprocess.run(
        ["docker", "build", "-q", "-t", new_image, "-"],
        input=f"FROM {pool.a.image}\nLABEL {UPDATE_LABEL}=1\n",
        text=True,
        capture_output=True,
        check=True,
    )
    started = time.monotonic()
    docker_cli(
        "service", "update", "--image", new_image, "--no-resolve-image", "--detach=false", pool.a.service
    )
    print(f"docker service update --image: {time.monotonic() - started:.1f} s")
    pool.a.wait_healthy()
    new = pool.a.container()
    assert new.id != old.id  # the appliance really was stopped and started again
    assert new.image.labels.get(UPDATE_LABEL) == "1"
    spec = docker_cli(
        "service", "inspect", pool.a.service, "--format", "{{.Spec.TaskTemplate.ContainerSpec.Image}}"
    )
    assert spec == new_image
    # The new appliance restored the session from the state directory on the node.
    logs = new.logs().decode(errors="replace")
    assert pool.session["producer"]["session_id"] in logs and "session restored" in logs
    assert pool.states() == ("ACTIVE", "ACTIVE")
    wait_until(lambda: received_bytes(iperf(pool.entry_port)) > 0, 90, "traffic through the restored session")
    assert pool.states() == ("ACTIVE", "ACTIVE")


def test_release_then_stack_rm_leaves_nothing(pool: Pool) -> None:
    assert pool.session, "needs the session of the previous tests"
    pool.b.scistream(pool.token, "release", pool.session["consumer"]["session_id"])
    wait_until(lambda: pool.states() == ("RELEASED", "RELEASED"), 30, "both sides RELEASED")
    for stack in (pool.a, pool.b):
        stack.remove()
    wait_until(lambda: not pool.a.leftovers() and not pool.b.leftovers(), 120, "the stacks removed")
    assert pool.a.leftovers() == [] and pool.b.leftovers() == []
    # The node's state directory outlives the stack (a redeploy restores from it).
    assert (pool.a.state / "sessions.db").is_file()
