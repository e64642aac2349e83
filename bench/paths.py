"""The data paths the harness measures. Add a path: subclass `BenchPath`, register it in `PATHS`."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from tests.integration.topology import Appliance, Topology, start_appliances

IPERF_PORT = 5201


@dataclass(frozen=True)
class Target:
    """Where the consumer app (in facility B) connects; TCP and UDP on the same port (iperf3 needs both)."""

    host: str
    port: int
    udp: bool = True  # whether UDP through this path is supported
    streams4: bool = True  # whether the 4-stream run is measured


class BenchPath(abc.ABC):
    """One way from the consumer app in B to the producer app (iperf3 -s, port 5201 in A)."""

    name: ClassVar[str]
    label: ClassVar[str]

    @abc.abstractmethod
    def start(self, topology: Topology) -> Target:
        """Builds the path on `topology` (processes it starts die with the topology)."""

    def stop(self) -> None:  # noqa: B027 - most paths die with the topology
        """Tears down what `start` made, if the topology's teardown does not."""

    def appliances(self) -> tuple[Appliance, Appliance] | None:
        """The two appliances, for paths that have them (setup latency is measured through them)."""
        return None

    def mode(self) -> str | None:
        """Our mode name (`--mode`), for the setup-latency measurement; None for yardsticks."""
        return None


class Direct(BenchPath):
    name = "direct"
    label = "direct veth (no tunnel, no encryption)"

    def start(self, topology: Topology) -> Target:
        return Target(topology.a.wan_ip, IPERF_PORT)


class ApplianceMode(BenchPath):
    """One of our modes: two appliances, a TCP session and a UDP session on the same entry port."""

    mode_name: ClassVar[str]

    def __init__(self) -> None:
        self._pair: tuple[Appliance, Appliance] | None = None

    def start(self, topology: Topology) -> Target:
        a, b = Appliance(topology.a), Appliance(topology.b)
        start_appliances(a, b)
        self._pair = (a, b)
        dest = f"127.0.0.1:{IPERF_PORT}"
        tcp = a.json("inbound", "--dest", dest, "--mode", self.mode_name)
        entry = b.json("outbound", tcp["ticket"])["entry_points"][0]
        port = entry.rsplit(":", 1)[1]
        udp = a.json("inbound", "--dest", dest, "--mode", self.mode_name, "--protocol", "udp")
        b.json("outbound", udp["ticket"], "--entry-port", port)
        host = entry.rsplit(":", 1)[0].strip("[]")
        return Target(host, int(port))

    def appliances(self) -> tuple[Appliance, Appliance] | None:
        return self._pair

    def mode(self) -> str | None:
        return self.mode_name


class QuicMode(ApplianceMode):
    name = "quic"
    label = "SciStream QUIC mode"
    mode_name = "quic"


class TlsMode(ApplianceMode):
    name = "tls"
    label = "SciStream TLS mode"
    mode_name = "tls"


PATHS: dict[str, type[BenchPath]] = {cls.name: cls for cls in (Direct, QuicMode, TlsMode)}

from bench.stunnel import STUNNEL_PATHS  # noqa: E402 - the yardsticks subclass BenchPath, defined above

PATHS.update(STUNNEL_PATHS)

from bench.wireguard import WIREGUARD_PATHS  # noqa: E402 - subclasses of the classes above

PATHS.update(WIREGUARD_PATHS)

from bench.aioquic_defaults import AIOQUIC_PATHS  # noqa: E402 - subclasses BenchPath, defined above

PATHS.update(AIOQUIC_PATHS)
