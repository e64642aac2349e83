"""Configuration precedence: flags over SCISTREAM_* variables over the YAML file over defaults."""

from pathlib import Path

import pytest

from appliance.cli.units import parse_duration, parse_rate
from appliance.config import load_settings
from appliance.errors import InvalidArgument


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCISTREAM_PORT_RANGE", raising=False)
    settings = load_settings()
    assert settings.listen == "0.0.0.0:5000"
    assert settings.port_range == "5100-5200"
    assert settings.wireguard_port == 51820


def test_yaml_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "appliance.yaml"
    config.write_text("port_range: 6000-6100\nlisten: 127.0.0.1:7000\nauth: none\n")
    monkeypatch.setenv("SCISTREAM_PORT_RANGE", "6200-6300")
    settings = load_settings(config, listen="127.0.0.1:7001")
    assert settings.auth == "none"  # from the file
    assert settings.port_range == "6200-6300"  # environment beats the file
    assert settings.listen == "127.0.0.1:7001"  # flag beats both


def test_missing_config_file_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("flags", [{"port_range": "9-1"}, {"listen": "nohost"}, {"auth": "magic"}])
def test_bad_setting_is_invalid_argument(flags: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        load_settings(**flags)


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    config.write_text("listn: 127.0.0.1:7000\n")
    with pytest.raises(InvalidArgument, match="listn"):
        load_settings(config)


def test_advertise_defaults_to_a_reachable_host() -> None:
    assert load_settings(listen="0.0.0.0:5000").advertise_address == "127.0.0.1:5000"
    assert load_settings(listen="0.0.0.0:5000", advertise="gw.example.org").advertise_address == (
        "gw.example.org:5000"
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "bps"), [("100", 100), ("500M", 500_000_000), ("10G", 10**10), ("1.5gbps", 1.5e9)]
)
def test_rates(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "fast", "-1s", "0"])
def test_bad_duration_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_duration(text)


def test_quic_max_packet_size_caps_path_mtu_discovery_in_both_quic_drivers() -> None:
    from appliance.control.server import build_drivers
    from appliance.sessions.model import Mode

    settings = load_settings(quic_max_packet_size=1452)
    drivers = build_drivers(settings.workers, quic_max_packet_size=settings.quic_max_packet_size)
    assert drivers[Mode.QUIC]._config.max_datagram_size == 1452  # type: ignore[attr-defined]
    assert drivers[Mode.AUTO]._quic._config.max_datagram_size == 1452  # type: ignore[attr-defined]


def test_quic_max_packet_size_below_the_quic_minimum_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="quic_max_packet_size"):
        load_settings(quic_max_packet_size=1000)
