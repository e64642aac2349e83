"""SciStream 1.2.1 compatibility: what the uid derives, how tokens are read, s2cs and s2uc."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.auth import parse_authorization
from appliance.cli.legacy import MOCK_UID, s2cs, s2uc, server_flags
from appliance.config import load_settings
from appliance.errors import InvalidArgument
from appliance.sessions import ticket as tk
from appliance.sessions.legacy import secret_for, session_id_for
from appliance.sessions.model import Side


def test_both_appliances_derive_the_same_ids_and_secret_from_a_uid() -> None:
    assert session_id_for("u", Side.PRODUCER) == session_id_for("u", Side.PRODUCER)
    assert secret_for("u") == secret_for("u")
    assert len(secret_for("u")) == tk.SECRET_BYTES


def test_each_side_and_each_uid_gets_its_own_id_and_secret() -> None:
    ids = {session_id_for(uid, side) for uid in ("u", "v") for side in Side}
    assert len(ids) == 4
    assert secret_for("u") != secret_for("v")


def test_the_session_id_does_not_reveal_the_secret() -> None:
    assert secret_for("u").hex() not in session_id_for("u", Side.PRODUCER).replace("-", "")


@pytest.mark.parametrize(
    ("value", "token"),
    [("INVALID_TOKEN", None), ("Bearer INVALID_TOKEN", None), ("abc", "abc"), ("Bearer abc", "abc")],
)
def test_invalid_token_means_no_token_and_bare_tokens_are_accepted(value: str, token: str | None) -> None:
    assert parse_authorization(value) == token


def _flags(**changes: object) -> dict[str, object]:
    options: dict[str, object] = {
        "listener_ip": "0.0.0.0",
        "port": 5000,
        "port_range": None,
        "server_type": "Haproxy",
        "mode": None,
        "server_crt": None,
        "server_key": None,
        "client_secret": "",
        "auth": None,
        "ssl": True,
        "verbose": False,
        "advertise": None,
        "state_dir": None,
    }
    options.update(changes)
    return server_flags(**options)  # type: ignore[arg-type]


def test_s2cs_proxy_types_mean_the_default_legacy_mode_which_is_tls_over_tcp_like_stunnel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SCISTREAM_LEGACY_MODE", raising=False)
    for kind in ("Haproxy", "Nginx", "StunnelSubprocess", "S2DS"):
        assert _flags(server_type=kind)["legacy_mode"] is None  # the setting's default decides
    assert load_settings().legacy_mode == "tls"
    monkeypatch.setenv("SCISTREAM_LEGACY_MODE", "quic")
    assert load_settings(**_flags(server_type="Haproxy")).legacy_mode == "quic"


def test_s2cs_type_or_mode_may_name_one_of_our_modes() -> None:
    assert _flags(server_type="tls")["legacy_mode"] == "tls"
    assert _flags(server_type="Haproxy", mode="wireguard")["legacy_mode"] == "wireguard"


def test_s2cs_refuses_an_unknown_type() -> None:
    with pytest.raises(InvalidArgument, match="--type"):
        _flags(server_type="Squid")


def test_s2cs_listens_on_every_address_and_advertises_listener_ip_as_1_2_1_does() -> None:
    flags = _flags(listener_ip="10.0.0.1", port=6000, port_range="7000-7010")
    assert flags["listen"] == "[::]:6000"
    assert flags["advertise"] == "10.0.0.1"
    assert flags["port_range"] == "7000-7010"
    settings = load_settings(**flags)
    assert settings.advertise_address == "10.0.0.1:6000"


def test_s2cs_advertise_wins_over_listener_ip() -> None:
    assert _flags(listener_ip="10.0.0.1", advertise="gw.example.org")["advertise"] == "gw.example.org"
    assert _flags(listener_ip="0.0.0.0")["advertise"] is None


def test_s2cs_state_dir_defaults_to_one_per_control_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCISTREAM_STATE_DIR", raising=False)
    assert _flags(port=5000)["state_dir"] == Path("/var/lib/scistream/s2cs-5000")
    assert _flags(port=6000)["state_dir"] == Path("/var/lib/scistream/s2cs-6000")
    assert _flags(port=6000, state_dir=Path("/tmp/x"))["state_dir"] == Path("/tmp/x")


def test_s2cs_state_dir_from_the_environment_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCISTREAM_STATE_DIR", "/srv/s2cs")
    assert _flags(port=6000)["state_dir"] is None
    assert load_settings(**_flags(port=6000)).state_dir == Path("/srv/s2cs")


def test_scistream_server_state_dir_default_is_still_var_lib_scistream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SCISTREAM_STATE_DIR", raising=False)
    assert load_settings().state_dir == Path("/var/lib/scistream")


def test_s2cs_without_client_secret_checks_no_token_as_in_1_2_1() -> None:
    assert _flags()["auth"] == "none"


def test_s2cs_client_secret_means_globus_introspection_unless_auth_says_otherwise() -> None:
    # Issue 14: 1.2.1's --client_secret (Globus Auth) maps to --auth introspection.
    assert _flags(client_secret="s3cret")["auth"] == "introspection"
    assert _flags(client_secret="s3cret", auth="tokens")["auth"] == "tokens"


def test_s2cs_uses_server_crt_and_key_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _flags()["tls_cert"] is None
    (tmp_path / "server.crt").write_text("c")
    (tmp_path / "server.key").write_text("k")
    flags = _flags()
    assert (flags["tls_cert"], flags["tls_key"]) == (Path("server.crt"), Path("server.key"))


def test_s2cs_ssl_false_is_a_plaintext_control_channel() -> None:
    assert _flags(ssl=False)["insecure"] is True
    assert _flags()["insecure"] is None


def test_s2cs_accepts_both_port_range_spellings() -> None:
    runner = CliRunner()
    for spelling in ("--port_range", "--port-range"):
        result = runner.invoke(s2cs, [spelling, "bad", "--state-dir", "/nonexistent/x"])
        assert result.exit_code == 2
        assert "port range 'bad'" in result.output


def test_s2cs_version() -> None:
    result = CliRunner().invoke(s2cs, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("s2cs, version: ")


@pytest.mark.parametrize(
    "command", ["inbound-request", "inbound_request", "outbound-request", "outbound_request", "release"]
)
def test_s2uc_accepts_hyphen_and_underscore_command_spellings(command: str) -> None:
    result = CliRunner().invoke(s2uc, [command, "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "option",
    ["--s2cs", "--server_cert", "--num_conn", "--rate", "--remote_ip", "--receiver_ports", "--scope"],
)
def test_s2uc_inbound_request_takes_the_1_2_1_options(option: str) -> None:
    assert option in CliRunner().invoke(s2uc, ["inbound_request", "--help"]).output


def test_s2uc_without_the_server_certificate_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "server.crt"
    result = CliRunner().invoke(s2uc, ["inbound_request", "--mock", "True", "--server_cert", str(missing)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "uid; s2cs; access_token; role",
        f"{MOCK_UID} localhost:5000 NO_AUTH PROD",
    ]
    assert result.stderr.count("\n") == 1 and "server certificate" in result.stderr


def test_s2uc_never_prints_the_token(tmp_path: Path) -> None:
    args = ["release", "u", "--server_cert", str(tmp_path / "none.crt"), "--token", "sst_secret"]
    result = CliRunner().invoke(s2uc, ["inbound_request", "--token", "sst_secret", "--server_cert", "/x"])
    assert "sst_secret" not in result.output
    assert " REDACTED PROD" in result.stdout
    assert "sst_secret" not in CliRunner().invoke(s2uc, args).output


def test_s2uc_refuses_bad_receiver_ports(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        s2uc, ["inbound_request", "--receiver_ports", "50,x", "--server_cert", str(tmp_path / "c")]
    )
    assert result.exit_code == 1
    assert "--receiver_ports" in result.stderr
