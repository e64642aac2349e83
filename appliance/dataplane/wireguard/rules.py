"""nftables rules of one session, in a table of its own (`inet scistream_IFACE`), replaced and deleted
atomically. Tables of others (Docker's, the host's) are never touched.

Consumer side: entry point → DNAT to the producer side's tunnel address, port TUNNEL_PORT_BASE + i
(locally originated connections too, hence the output hook), masqueraded to our tunnel address; nothing
but replies may come in from the tunnel. Producer side: tunnel address:TUNNEL_PORT_BASE + i → DNAT to
destination i (masqueraded when it is on another host); anything else from the tunnel is dropped.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

from appliance.errors import Unavailable

TABLE_PREFIX = "scistream_"
TUNNEL_PORT_BASE = 10000
NFT = "nft"


def _family(ip: str) -> tuple[str, str]:
    """(nft payload keyword, meta nfproto) for an address."""
    return ("ip6", "ipv6") if ipaddress.ip_address(ip).version == 6 else ("ip", "ipv4")


def _target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _table(name: str, chains: dict[str, tuple[str, list[str]]]) -> str:
    out = [f"table inet {name} {{"]
    for chain, (hook, rules) in chains.items():
        out.append(f"  chain {chain} {{")
        out.append(f"    {hook}; policy accept;")
        out += [f"    {rule}" for rule in rules]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


NAT_PRE = "type nat hook prerouting priority dstnat"
NAT_OUT = "type nat hook output priority -100"
NAT_POST = "type nat hook postrouting priority srcnat"
NAT_IN = "type nat hook input priority 100"
FILTER_IN = "type filter hook input priority filter"
FILTER_FWD = "type filter hook forward priority filter"


@dataclass(frozen=True)
class ProducerRules:
    ifname: str
    protocol: str  # "tcp" | "udp"
    tunnel_ips: tuple[str, ...]  # this side's tunnel addresses (one per family)
    destinations: tuple[tuple[str, int], ...]  # resolved (IP, port), in session order

    def render(self) -> str:
        dnat: list[str] = []
        local: list[str] = []
        guard: list[str] = []
        quoted = f'"{self.ifname}"'
        for tunnel_ip in self.tunnel_ips:
            fam, _ = _family(tunnel_ip)
            ports = []
            for index, (ip, port) in enumerate(self.destinations):
                if _family(ip)[0] != fam:
                    continue
                tunnel_port = TUNNEL_PORT_BASE + index
                ports.append(str(tunnel_port))
                dnat.append(
                    f"iifname {quoted} {fam} daddr {tunnel_ip} {self.protocol} dport {tunnel_port} "
                    f"dnat {fam} to {_target(ip, port)}"
                )
                # UDP to a destination on this host: the source becomes the destination address, so a
                # server bound to a wildcard address answers from the address conntrack expects. (Not
                # TCP: accepted sockets answer from the right address, and a loopback source would
                # let the app pick a 64 KiB MSS that the tunnel cannot carry.)
                if self.protocol != "udp":
                    continue
                local.append(
                    f"iifname {quoted} {fam} daddr {ip} {self.protocol} dport {port} ct status dnat "
                    f"ct original {fam} daddr {tunnel_ip} snat {fam} to {ip}"
                )
            if ports:
                allowed = ", ".join(ports)
                guard.append(
                    f"iifname {quoted} meta l4proto {self.protocol} ct status dnat "
                    f"ct original {fam} daddr {tunnel_ip} ct original proto-dst {{ {allowed} }} accept"
                )
        guard.append(f"iifname {quoted} drop")
        return _table(
            table_name(self.ifname),
            {
                "nat_pre": (NAT_PRE, dnat),
                "nat_in": (NAT_IN, local),
                "nat_post": (NAT_POST, [f"iifname {quoted} oifname != {quoted} ct status dnat masquerade"]),
                "guard_in": (FILTER_IN, guard),
                "guard_fwd": (FILTER_FWD, guard),
            },
        )


@dataclass(frozen=True)
class ConsumerRules:
    ifname: str
    protocol: str
    bind_ip: str  # "" or a wildcard: every local address
    entry_ports: tuple[int, ...]
    peer_tunnel_ips: tuple[str, ...]  # the producer side's tunnel addresses (one per family)
    destination_count: int

    def render(self) -> str:
        dnat: list[str] = []
        wildcard = self.bind_ip in ("", "0.0.0.0", "::")
        for index, port in enumerate(self.entry_ports):
            tunnel_port = TUNNEL_PORT_BASE + index % max(1, self.destination_count)
            for peer_ip in self.peer_tunnel_ips:
                fam, proto = _family(peer_ip)
                if wildcard:
                    match = f"meta nfproto {proto} fib daddr type local"
                elif _family(self.bind_ip)[0] == fam:
                    match = f"{fam} daddr {self.bind_ip}"
                else:
                    continue
                dnat.append(
                    f"{match} {self.protocol} dport {port} dnat {fam} to {_target(peer_ip, tunnel_port)}"
                )
        quoted = f'"{self.ifname}"'
        guard = [f"iifname {quoted} ct state established,related accept", f"iifname {quoted} drop"]
        return _table(
            table_name(self.ifname),
            {
                "nat_pre": (NAT_PRE, dnat),
                "nat_out": (NAT_OUT, dnat),
                "nat_post": (NAT_POST, [f"oifname {quoted} masquerade"]),
                "guard_in": (FILTER_IN, guard),
                "guard_fwd": (FILTER_FWD, guard),
            },
        )


def table_name(ifname: str) -> str:
    return f"{TABLE_PREFIX}{ifname}"


def _nft(script: str, what: str) -> None:
    try:
        done = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"cannot run nft to {what}: {exc}") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise Unavailable(f"nft refused to {what}: {first}")


def apply(ifname: str, ruleset: str) -> None:
    """Installs (or atomically replaces) the session's table."""
    name = table_name(ifname)
    # Declaring the table first makes the delete valid whether or not it existed: one transaction.
    _nft(f"table inet {name}\ndelete table inet {name}\n{ruleset}", f"install {name}")


def delete(ifname: str) -> None:
    name = table_name(ifname)
    _nft(f"table inet {name}\ndelete table inet {name}\n", f"delete {name}")


def tables(prefix: str) -> list[str]:
    """Interface names of our tables whose interface starts with `prefix`."""
    try:
        done = subprocess.run([NFT, "list", "tables", "inet"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith(TABLE_PREFIX + prefix):
            found.append(parts[2][len(TABLE_PREFIX) :])
    return found
