"""The DaemonSet's pod of deploy/kubernetes run by Docker the way a kubelet would run it: no cluster can
run here, so this is the closest check that the manifests, the image and the appliance fit together.

From daemonset.yaml, configmap.yaml and a real tokens file in place of the placeholder Secret: the init
container (its command, capabilities and mounts) fills the in-memory tokens volume, then the appliance
container starts with the pod's args, capabilities, environment and mounts (the ConfigMap's settings file,
the tokens volume, a host directory as the hostPath state). Then the pod's gRPC probe is sent as the kubelet
sends it, in plaintext to the probe's port, and a user calls the control port with a token. Only the network
differs: the container has its own (Docker's default bridge) instead of the node's, so that the test holds
no host port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.models.containers import Container
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from .swarm import SCISTREAM
from .topology import IMAGE, ROOT, wait_until

pytestmark = pytest.mark.e2e
MANIFESTS = ROOT / "deploy" / "kubernetes"


def _manifest(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MANIFESTS / name).read_text())
    return doc


def _binds(container: dict[str, Any], sources: dict[str, str]) -> dict[str, dict[str, str]]:
    """Docker volume bindings for a container spec's volumeMounts, from volume name to host source."""
    return {
        sources[m["name"]]: {"bind": m["mountPath"], "mode": "ro" if m.get("readOnly") else "rw"}
        for m in container["volumeMounts"]
    }


def _health(host: str, port: int) -> int:
    async def check() -> int:
        channel = Channel(host, port)  # plaintext, as the kubelet's gRPC probe
        try:
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=5)
        finally:
            channel.close()
        assert reply is not None
        return int(reply.status)

    try:
        return asyncio.run(check())
    except (TimeoutError, OSError, GRPCError, StreamTerminatedError):
        return -1


@pytest.fixture
def pod(image: str, tmp_path: Path) -> Iterator[tuple[Container, dict[str, Any], str]]:
    client = docker.from_env()
    spec = _manifest("daemonset.yaml")["spec"]["template"]["spec"]
    (init,), (main,) = spec["initContainers"], spec["containers"]
    settings_dir, secret_dir, state_dir = tmp_path / "settings", tmp_path / "secret", tmp_path / "state"
    for directory in (settings_dir, secret_dir, state_dir):
        directory.mkdir()
    for key, text in _manifest("configmap.yaml")["data"].items():
        (settings_dir / key).write_text(text)
    # The operator's Secret: a tokens file with one real token (mode as the Secret volume's defaultMode).
    tokens = secret_dir / "tokens.yaml"
    made = [str(SCISTREAM), "token", "create", "--tokens-file", str(tokens), "--subject", "k8s-test"]
    token = subprocess.run(made, capture_output=True, text=True, check=True).stdout.strip()
    tokens.chmod(0o400)
    tokens_volume = client.volumes.create(f"scistream-k8s-tokens-{os.getpid()}")
    sources = {
        "settings": str(settings_dir),
        "tokens-secret": str(secret_dir),
        "tokens": tokens_volume.name,
        "state": str(state_dir),
    }
    assert {v["name"] for v in spec["volumes"]} == set(sources)
    container = None
    try:
        client.containers.run(
            IMAGE,
            entrypoint=init["command"][:1],
            command=init["command"][1:],
            cap_drop=init["securityContext"]["capabilities"]["drop"],
            cap_add=init["securityContext"]["capabilities"]["add"],
            volumes=_binds(init, sources),
            remove=True,
        )
        container = client.containers.run(
            IMAGE,
            command=main["args"],
            cap_add=main["securityContext"]["capabilities"]["add"],
            environment={"SCISTREAM_ADVERTISE": "127.0.0.1"},  # status.hostIP: the node's address
            volumes=_binds(main, sources),
            name=f"scistream-k8s-pod-{os.getpid()}",
            detach=True,
        )
        container.reload()
        yield container, main, token
    finally:
        if container is not None:
            container.remove(force=True)
        tokens_volume.remove(force=True)


def test_the_daemonset_pod_passes_its_grpc_probe_and_serves_users_with_its_tokens(
    pod: tuple[Container, dict[str, Any], str], tmp_path: Path
) -> None:
    container, main, token = pod
    address = container.attrs["NetworkSettings"]["IPAddress"]
    probe_port = main["readinessProbe"]["grpc"]["port"]
    wait_until(lambda: _health(address, probe_port) == HealthCheckResponse.SERVING, 60, "the gRPC probe")
    # The appliance's user holds only NET_ADMIN, and reads the tokens file the init container wrote.
    code, out = container.exec_run(["sh", "-c", "stat -c '%u %a' /run/scistream-secrets/tokens.yaml"])
    assert code == 0 and out.decode().split() == ["10001", "400"]
    code, out = container.exec_run(
        ["sh", "-c", "for d in /proc/[0-9]*; do grep -E '^CapEff' $d/status; done"]
    )
    assert f"{1 << 12:016x}" in out.decode()
    # A user with the token lists sessions over the TLS control port, pinned by the certificate's
    # fingerprint, which is in the state directory on the "node".
    cert = tmp_path / "state" / "tls" / "control.crt"
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    listed = subprocess.run(
        [str(SCISTREAM), "ls", "--server", f"{address}:5000", "--fingerprint", fingerprint, "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SCISTREAM_TOKEN": token},
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    # A token the Secret does not hold is refused.
    refused = subprocess.run(
        [str(SCISTREAM), "ls", "--server", f"{address}:5000", "--fingerprint", fingerprint],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SCISTREAM_TOKEN": token[:-4] + "AAAA"},
    )
    assert refused.returncode != 0 and refused.stderr.startswith("error:"), refused.stderr
    assert "invalid token" in refused.stderr
