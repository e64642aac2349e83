"""WireGuard paths: wireguard-go configured by hand with `wg` (the yardstick), and our WireGuard mode.

The yardstick is what an operator would type (ENVIRONMENT.md §2): one wireguard-go per facility, keys
from `wg genkey`, one peer each, a /24 of tunnel addresses, no NAT; iperf3 connects to A's tunnel
address. Our mode adds per-session keys, nftables DNAT/masquerade and the isolation filter.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

from appliance.dataplane.wireguard import sockbuf
from bench.paths import IPERF_PORT, ApplianceMode, BenchPath, Target
from tests.integration.topology import Facility, Topology

LISTEN_PORT = 51820
TUNNEL_IPS = {"a": "10.200.0.1", "b": "10.200.0.2"}


class WireGuardByHand(BenchPath):
    name = "wireguard-go"
    label = "wireguard-go by hand (wg, no NAT)"

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, topology: Topology) -> Target:
        a, b = topology.a, topology.b
        # UAPI sockets live in one /var/run for every namespace: names must be unique on the host.
        names = {f.name: f"wgh{f.name}{f.ns[-6:]}" for f in (a, b)}
        keys = {f.name: _keypair(f) for f in (a, b)}
        for f in (a, b):
            self._processes.append(f.spawn("wireguard-go", "-f", names[f.name]))
        for f in (a, b):
            _wait_socket(f, names[f.name])
        for f, peer in ((a, b), (b, a)):
            ifname = names[f.name]
            key_file = f.workdir / "wg.key"
            key_file.write_text(keys[f.name][0])
            key_file.chmod(0o600)
            command = ["wg", "set", ifname, "private-key", str(key_file), "peer", keys[peer.name][1]]
            command += ["allowed-ips", f"{TUNNEL_IPS[peer.name]}/32"]
            if f is a:
                command[3:3] = ["listen-port", str(LISTEN_PORT)]
            else:
                command += ["endpoint", f"{a.wan_ip}:{LISTEN_PORT}"]
            f.run(*command)
            f.run("ip", "addr", "add", f"{TUNNEL_IPS[f.name]}/24", "dev", ifname)
            f.run("ip", "link", "set", ifname, "up")
        self.tune()
        return Target(TUNNEL_IPS["a"], IPERF_PORT)

    def tune(self) -> None:
        """What the operator would add by hand; nothing for the plain yardstick."""

    def stop(self) -> None:
        """SIGTERM, so wireguard-go removes its socket (the topology's teardown kills with SIGKILL)."""
        for proc in self._processes:
            proc.terminate()
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class WireGuardByHandWideBuffers(WireGuardByHand):
    """The yardstick with the UDP buffers our mode gives wireguard-go (7 MiB, as newer wireguard-go sets
    itself): shows how much of a difference between the two is buffers and how much is our NAT path."""

    name = "wireguard-go-wide"
    label = "wireguard-go by hand, 7 MiB UDP buffers (wg, no NAT)"

    def tune(self) -> None:
        # `ip netns exec` execs wireguard-go: the process we spawned is wireguard-go itself.
        for proc in self._processes:
            if sockbuf.widen(proc.pid) == 0:
                raise RuntimeError(f"process {proc.pid} has no UDP socket to widen")


class WireGuardMode(ApplianceMode):
    name = "wireguard"
    label = "SciStream WireGuard mode (wireguard-go)"
    mode_name = "wireguard"


def _keypair(facility: Facility) -> tuple[str, str]:
    private = facility.run("wg", "genkey").stdout.strip()
    public = facility.run("sh", "-c", f"echo {private} | wg pubkey").stdout.strip()
    return private, public


def _wait_socket(facility: Facility, ifname: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while facility.run("test", "-S", f"/var/run/wireguard/{ifname}.sock", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go did not create {ifname}")
        time.sleep(0.05)


WIREGUARD_PATHS: dict[str, type[BenchPath]] = {
    cls.name: cls for cls in (WireGuardByHand, WireGuardByHandWideBuffers, WireGuardMode)
}
