"""WireGuard mode's pure parts: keys, the tunnel address pool, nftables rules, UAPI lines, saved state."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.dataplane.wireguard import keys, sockbuf
from appliance.dataplane.wireguard.backend import DeviceConfig, PeerConfig
from appliance.dataplane.wireguard.driver import WireGuardDriver, appliance_tag
from appliance.dataplane.wireguard.kernel import KernelBackend, kernel_supported, peer_attrs
from appliance.dataplane.wireguard.pool import AddressPool, host_address, parse_pool
from appliance.dataplane.wireguard.rules import ConsumerRules, ProducerRules
from appliance.dataplane.wireguard.tunnel import WireGuardState, blocks_of
from appliance.dataplane.wireguard.uapi import peer_stats
from appliance.dataplane.wireguard.userspace import uapi_items
from appliance.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted

net = ipaddress.ip_network


# ---- keys ------------------------------------------------------------------------------------------


def test_both_sides_derive_the_same_preshared_key_from_the_session_secret() -> None:
    secret = bytes(range(32))
    assert keys.derive_preshared_key(secret) == keys.derive_preshared_key(bytes(secret))
    assert len(keys.derive_preshared_key(secret)) == 32
    assert keys.derive_preshared_key(secret) != keys.derive_preshared_key(b"another secret")


def test_each_session_gets_a_fresh_key_pair() -> None:
    first, second = keys.generate_private_key(), keys.generate_private_key()
    assert first != second
    assert len(keys.public_key(first)) == 32 and keys.public_key(first) != keys.public_key(second)


@pytest.mark.parametrize("key", [b"", b"\x01" * 31, b"\x01" * 33, b"\x00" * 32])
def test_malformed_public_keys_are_invalid_arguments(key: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed WireGuard public key"):
        keys.check_public_key(key)


# ---- pool ------------------------------------------------------------------------------------------


def test_default_pool_is_cgnat_and_ula() -> None:
    v4, v6 = parse_pool("100.64.0.0/10,fd5c:5157:7e00::/48")
    assert v4 == net("100.64.0.0/10") and v6.is_private


@pytest.mark.parametrize(
    "text", ["", "fd00::/64", "100.64.0.0/31", "100.64.0.1/24", "10.0.0.0/8,100.64.0.0/10", "nonsense"]
)
def test_bad_pools_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_pool(text)


def test_a_session_gets_one_block_per_family_and_the_sides_take_its_first_two_hosts() -> None:
    pool = AddressPool(parse_pool("100.64.0.0/29,fd00::/120"))
    v4, v6 = pool.allocate("s1")
    assert v4.prefixlen == 30 and v6.prefixlen == 126
    assert host_address(v4, 1) == f"{v4.network_address + 1}/30"
    assert pool.owned_by("s1") == [v4, v6]


def test_blocks_are_never_shared_and_come_back_after_release() -> None:
    pool = AddressPool(parse_pool("100.64.0.0/29"))
    first, second = pool.allocate("s1"), pool.allocate("s2")
    assert first != second
    with pytest.raises(ResourceExhausted, match="no free tunnel address block"):
        pool.allocate("s3")
    pool.release("s1")
    assert pool.allocate("s3") == first


def test_blocks_on_the_hosts_own_networks_are_skipped() -> None:
    pool = AddressPool(parse_pool("100.64.0.0/29"), host_networks=lambda: [net("100.64.0.0/30")])
    assert pool.allocate("s1") == (net("100.64.0.4/30"),)
    with pytest.raises(ResourceExhausted):
        pool.allocate("s2")


def test_claiming_a_proposed_block_checks_it_is_free_here() -> None:
    pool = AddressPool(parse_pool("100.64.0.0/29"), host_networks=lambda: [net("100.64.0.4/30")])
    assert pool.claim("s1", [net("100.64.0.0/30")]) == (net("100.64.0.0/30"),)
    with pytest.raises(AlreadyExists):
        pool.claim("s2", [net("100.64.0.0/30")])
    with pytest.raises(AlreadyExists):
        pool.claim("s2", [net("100.64.0.4/30")])
    with pytest.raises(InvalidArgument, match="outside"):
        pool.claim("s2", [net("10.0.0.0/30")])


def test_tunnel_addresses_must_be_the_right_host_of_a_block() -> None:
    assert blocks_of(("100.64.0.2/30",), consumer=True) == [net("100.64.0.0/30")]
    assert blocks_of(("100.64.0.1/30", "fd00::1/126"), consumer=False)[1] == net("fd00::/126")
    for bad in [("100.64.0.1/30",), ("100.64.0.2/24",), ("fd00::2/126",), ("garbage",), ()]:
        with pytest.raises(InvalidArgument):
            blocks_of(bad, consumer=True)


# ---- rules -----------------------------------------------------------------------------------------


def test_producer_rules_lead_tunnel_ports_to_destinations_and_drop_everything_else() -> None:
    text = ProducerRules(
        "sswabcd12345678", "tcp", ("100.64.0.1",), (("127.0.0.1", 5201), ("10.1.0.5", 80))
    ).render()
    assert "table inet scistream_sswabcd12345678 {" in text
    assert 'iifname "sswabcd12345678" ip daddr 100.64.0.1 tcp dport 10000 dnat ip to 127.0.0.1:5201' in text
    assert "tcp dport 10001 dnat ip to 10.1.0.5:80" in text
    # Local delivery: the source becomes the destination address, so wildcard UDP servers answer right.
    assert "snat" not in text  # TCP: accepted sockets answer from the address they were reached at
    assert "ct original ip daddr 100.64.0.1 ct original proto-dst { 10000, 10001 } accept" in text
    assert text.count('iifname "sswabcd12345678" drop') == 2  # input and forward


def test_producer_rules_make_local_udp_destinations_see_themselves_as_the_source() -> None:
    text = ProducerRules("sswabcd12345678", "udp", ("100.64.0.1",), (("127.0.0.1", 5201),)).render()
    local = "ip daddr 127.0.0.1 udp dport 5201 ct status dnat ct original ip daddr 100.64.0.1"
    assert f"{local} snat ip to 127.0.0.1" in text


def test_consumer_rules_dnat_entry_points_round_robin_onto_the_producers_tunnel_ports() -> None:
    rules = ConsumerRules("sswabcd12345678", "udp", "", (5100, 5101, 5102), ("100.64.0.1", "fd00::1"), 2)
    text = rules.render()
    assert "meta nfproto ipv4 fib daddr type local udp dport 5100 dnat ip to 100.64.0.1:10000" in text
    assert "udp dport 5101 dnat ip to 100.64.0.1:10001" in text
    assert "udp dport 5102 dnat ip to 100.64.0.1:10000" in text
    assert "udp dport 5100 dnat ip6 to [fd00::1]:10000" in text
    assert "hook output" in text  # apps on the gateway itself
    assert 'oifname "sswabcd12345678" masquerade' in text


def test_consumer_rules_for_one_bind_address_match_only_it() -> None:
    text = ConsumerRules("sswx", "tcp", "198.18.0.2", (5100,), ("100.64.0.1", "fd00::1"), 1).render()
    assert "ip daddr 198.18.0.2 tcp dport 5100 dnat ip to 100.64.0.1:10000" in text
    assert "ip6" not in text.split("nat_out")[0].split("nat_pre")[1]


# ---- backends --------------------------------------------------------------------------------------


def _config() -> DeviceConfig:
    peer = PeerConfig(b"\x02" * 32, b"\x03" * 32, ("100.64.0.1/32",), ("198.18.0.1", 5100), 25)
    return DeviceConfig(b"\x01" * 32, 0, peer)


def test_uapi_lines_use_hex_keys_and_replace_peers_and_allowed_ips() -> None:
    items = uapi_items(_config())
    assert items[0] == ("private_key", "01" * 32)
    assert ("replace_peers", "true") in items and ("replace_allowed_ips", "true") in items
    assert ("public_key", "02" * 32) in items and ("preshared_key", "03" * 32) in items
    assert ("endpoint", "198.18.0.1:5100") in items and ("allowed_ip", "100.64.0.1/32") in items
    assert [k for k, _ in items].index("public_key") > [k for k, _ in items].index("listen_port")


# A stand-in for wireguard-go: one UDP and one TCP socket; prints their receive buffers when asked.
_HOLDER = """
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
print("ready", flush=True)
sys.stdin.readline()
print(*(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in (udp, tcp)))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="forcing buffer sizes needs CAP_NET_ADMIN")
def test_wireguard_go_udp_sockets_get_wide_buffers_from_outside_and_nothing_else_changes() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert sockbuf.widen(holder.pid, 4 << 20) == 1  # the UDP socket only
        udp, tcp = holder.communicate("\n", timeout=10)[0].split()
    finally:
        holder.kill()
        holder.wait()
    assert int(udp) == 2 * (4 << 20)  # the kernel doubles what it is asked for (bookkeeping overhead)
    assert int(tcp) < 4 << 20


def test_widening_a_process_that_is_gone_is_an_os_error() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    with pytest.raises(OSError):
        sockbuf.widen(done.pid)


def test_kernel_peer_attributes_use_base64_keys() -> None:
    attrs = peer_attrs(_config())
    assert attrs is not None
    assert attrs["public_key"] == "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="
    assert attrs["endpoint_addr"] == "198.18.0.1" and attrs["endpoint_port"] == 5100
    assert peer_attrs(DeviceConfig(b"\x01" * 32)) is None


def test_uapi_counters_sum_peers_and_read_the_last_handshake() -> None:
    reply = [
        ("private_key", "00"),
        ("public_key", "02"),
        ("last_handshake_time_sec", "1700000000"),
        ("last_handshake_time_nsec", "500000000"),
        ("rx_bytes", "1000"),
        ("tx_bytes", "2000"),
        ("errno", "0"),
    ]
    stats = peer_stats(reply)
    assert (stats.rx_bytes, stats.tx_bytes, stats.last_handshake) == (1000, 2000, 1700000000.5)


def test_saved_state_round_trips() -> None:
    state = WireGuardState(
        "sswx", "producer", "01" * 32, 5100, ["100.64.0.1/30"], "02" * 32, ["100.64.0.2/30"]
    )
    assert WireGuardState.decode(state.encode()) == state


def test_interface_names_fit_linux_and_are_unique_per_appliance() -> None:
    pool = AddressPool(parse_pool("100.64.0.0/29"))
    a = WireGuardDriver(KernelBackend(), pool, appliance_tag("/var/lib/a"))
    b = WireGuardDriver(KernelBackend(), pool, appliance_tag("/var/lib/b"))
    name = a.ifname("4b0a2f3c-0000-4000-8000-000000000000")
    assert len(name) <= 15 and name.startswith("ssw")
    assert name != b.ifname("4b0a2f3c-0000-4000-8000-000000000000")
    assert name != a.ifname("4b0a2f3c-0000-4000-8000-000000000001")
    assert a.auto_eligible  # kernel: auto may pick WireGuard


@pytest.mark.skipif(kernel_supported() is None, reason="this kernel has WireGuard")
async def test_the_kernel_backend_says_why_it_cannot_work_here() -> None:
    why = kernel_supported()
    assert why is not None and "wireguard" in why


# ---- host requirements -----------------------------------------------------------------------------


def test_a_missing_net_admin_capability_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.dataplane.wireguard as wireguard

    monkeypatch.setattr(wireguard, "_has_net_admin", lambda: False)
    why = wireguard.missing_requirement("userspace")
    assert why is not None and "NET_ADMIN" in why


def test_a_missing_tun_device_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import appliance.dataplane.wireguard as wireguard

    monkeypatch.setattr(wireguard, "_has_net_admin", lambda: True)
    monkeypatch.setattr(wireguard.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(wireguard, "TUN", tmp_path / "tun")
    why = wireguard.missing_requirement("userspace")
    assert why is not None and "/dev/net/tun" in why


def test_auto_without_any_backend_offers_no_wireguard_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import appliance.dataplane.wireguard as wireguard

    monkeypatch.setattr(wireguard, "_has_net_admin", lambda: False)
    assert wireguard.build_driver("auto", "100.64.0.0/10", tmp_path) is None
    with pytest.raises(FailedPrecondition, match=r"--wireguard-backend userspace: .*NET_ADMIN"):
        wireguard.build_driver("userspace", "100.64.0.0/10", tmp_path)
