"""`--auth introspection` without the network: what an introspection answer must say, the bounded
cache, the endpoint and secret rules, the settings, and how `s2cs`'s Globus options map to it.
(tests/service/test_introspection.py runs it against a real authorization server.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from appliance.auth import GLOBUS_INTROSPECTION_ENDPOINT, authenticator_from_settings
from appliance.auth.factory import introspection_config
from appliance.auth.introspection_rules import (
    IntrospectionConfig,
    check_endpoint,
    principal_from,
    read_client_secret,
)
from appliance.auth.ttlcache import TtlCache
from appliance.cli.legacy import LEGACY_CLIENT_ID, server_flags
from appliance.config import load_settings
from appliance.errors import InvalidArgument, Unauthenticated

NOW = 1_800_000_000.0
CONFIG = IntrospectionConfig(
    endpoint="https://auth.example.org/introspect",
    client_id="appliance-id",
    client_secret="s3cret-value",
    scope="https://auth.example.org/scopes/appliance-id/scistream",
    audience="appliance-id",
    admins=frozenset({"root-id"}),
)


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "active": True,
        "scope": f"openid {CONFIG.scope}",
        "aud": ["other-service", "appliance-id"],
        "sub": "alice-id",
        "username": "alice@example.org",
        "exp": NOW + 600,
        "iat": NOW - 10,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _refusal(claims: dict[str, Any], config: IntrospectionConfig = CONFIG) -> str:
    with pytest.raises(Unauthenticated) as caught:
        principal_from(claims, config, NOW)
    return caught.value.message


# --- what an answer must say ----------------------------------------------------------------------


def test_an_active_token_with_scope_audience_and_future_expiry_is_its_subject() -> None:
    principal = principal_from(_claims(), CONFIG, NOW)
    assert principal.subject == "alice-id"
    assert not principal.is_admin


def test_the_identity_may_be_the_username_instead_of_sub() -> None:
    config = IntrospectionConfig(**{**CONFIG.__dict__, "identity": "username"})
    assert principal_from(_claims(), config, NOW).subject == "alice@example.org"


def test_a_configured_admin_subject_gets_the_admin_role() -> None:
    assert principal_from(_claims(sub="root-id"), CONFIG, NOW).is_admin


@pytest.mark.parametrize("active", [False, None, "true", 1])
def test_only_active_true_is_active(active: object) -> None:
    assert "not active" in _refusal(_claims(active=active))


def test_a_token_without_expiry_is_refused() -> None:
    assert _refusal(_claims(exp=None)) == "token has no expiry"


@pytest.mark.parametrize("exp", [NOW, NOW - 1])
def test_an_expired_token_is_refused_even_if_the_server_says_active(exp: float) -> None:
    assert _refusal(_claims(exp=exp)) == "token expired"


@pytest.mark.parametrize("exp", ["soon", True, [NOW + 60]])
def test_a_malformed_expiry_is_refused(exp: object) -> None:
    assert "not a number" in _refusal(_claims(exp=exp))


def test_a_token_not_valid_yet_is_refused_beyond_the_clock_leeway() -> None:
    assert principal_from(_claims(nbf=NOW + 10), CONFIG, NOW).subject == "alice-id"
    assert _refusal(_claims(nbf=NOW + 3600)) == "token not yet valid"


@pytest.mark.parametrize(
    "scope", [None, "", "openid", f"{CONFIG.scope}/more", f"x{CONFIG.scope}", ["openid", CONFIG.scope]]
)
def test_a_token_without_the_exact_required_scope_is_refused(scope: object) -> None:
    assert _refusal(_claims(scope=scope)) == "token lacks the required scope"


@pytest.mark.parametrize("aud", [None, "other-service", ["other-service"], [], "appliance-id-2", 7])
def test_a_token_for_another_audience_is_refused(aud: object) -> None:
    assert _refusal(_claims(aud=aud)) == "token is for another audience"


def test_the_audience_may_be_a_single_string() -> None:
    assert principal_from(_claims(aud="appliance-id"), CONFIG, NOW).subject == "alice-id"


@pytest.mark.parametrize("sub", [None, "", "two words", 42])
def test_a_token_without_a_usable_subject_is_refused(sub: object) -> None:
    assert _refusal(_claims(sub=sub)) == "token has no usable 'sub'"


def test_the_no_auth_subject_is_reserved() -> None:
    assert "reserved" in _refusal(_claims(sub="NO_AUTH"))


def test_the_client_secret_is_not_in_the_config_repr() -> None:
    assert "s3cret-value" not in repr(CONFIG)


# --- the cache ------------------------------------------------------------------------------------


def test_the_cache_keeps_a_value_until_its_expiry() -> None:
    cache: TtlCache[str, int] = TtlCache(4)
    cache.put("a", 1, expires_at=10, now=0)
    assert cache.get("a", now=9.9) == 1
    assert cache.get("a", now=10) is None
    assert len(cache) == 0


def test_the_cache_never_holds_more_than_its_size_dropping_the_least_recently_used() -> None:
    cache: TtlCache[str, int] = TtlCache(2)
    cache.put("a", 1, expires_at=100, now=0)
    cache.put("b", 2, expires_at=100, now=0)
    assert cache.get("a", now=1) == 1  # a is now more recent than b
    cache.put("c", 3, expires_at=100, now=1)
    assert len(cache) == 2
    assert cache.get("b", now=1) is None
    assert (cache.get("a", now=1), cache.get("c", now=1)) == (1, 3)


def test_the_cache_stores_nothing_already_expired() -> None:
    cache: TtlCache[str, int] = TtlCache(2)
    cache.put("a", 1, expires_at=5, now=5)
    assert len(cache) == 0


def test_the_cache_needs_room_for_one_entry() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TtlCache(0)


# --- the endpoint and the secret -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        GLOBUS_INTROSPECTION_ENDPOINT,
        "http://127.0.0.1:8080/introspect",
        "http://localhost/x",
        "http://[::1]/x",
    ],
)
def test_https_endpoints_and_plain_http_to_loopback_are_accepted(url: str) -> None:
    assert check_endpoint(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://auth.example.org/introspect", "must use https"),
        ("http://10.0.0.1/introspect", "must use https"),
        ("ftp://auth.example.org/x", "https:// URL"),
        ("auth.example.org/introspect", "https:// URL"),
        ("https://client:secret@auth.example.org/x", "must not contain credentials"),
    ],
)
def test_other_endpoints_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        check_endpoint(url)


def test_the_client_secret_file_must_be_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret-value\n")
    os.chmod(path, 0o644)
    with pytest.raises(InvalidArgument, match="make it 0600") as caught:
        read_client_secret(path)
    assert "s3cret-value" not in caught.value.message
    os.chmod(path, 0o600)
    assert read_client_secret(path) == "s3cret-value"


@pytest.mark.parametrize("content", ["", "\n", "one\ntwo\n"])
def test_the_client_secret_file_holds_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(InvalidArgument, match="on one line"):
        read_client_secret(path)


def test_a_missing_client_secret_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read the client secret file"):
        read_client_secret(tmp_path / "absent")


# --- settings ---------------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text("s3cret-value\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(autouse=True)
def _no_scistream_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SCISTREAM_"):
            monkeypatch.delenv(name)


def _settings(secret_file: Path | None, **changes: Any) -> Any:
    fields: dict[str, Any] = {
        "auth": "introspection",
        "introspection_endpoint": GLOBUS_INTROSPECTION_ENDPOINT,
        "introspection_client_id": "appliance-id",
        "introspection_client_secret_file": secret_file,
        "introspection_scope": "scistream",
    }
    fields.update(changes)
    return load_settings(**fields)


def test_settings_make_the_config_with_the_client_id_as_default_audience(secret_file: Path) -> None:
    config = introspection_config(_settings(secret_file))
    assert (config.client_id, config.client_secret, config.audience) == (
        "appliance-id",
        "s3cret-value",
        "appliance-id",
    )
    assert introspection_config(_settings(secret_file, introspection_audience="rs")).audience == "rs"


@pytest.mark.parametrize(
    ("missing", "flag"),
    [
        ("introspection_endpoint", "--introspection-endpoint"),
        ("introspection_client_id", "--introspection-client-id"),
        ("introspection_scope", "--introspection-scope"),
    ],
)
def test_a_missing_introspection_setting_is_named(secret_file: Path, missing: str, flag: str) -> None:
    with pytest.raises(InvalidArgument, match=flag):
        authenticator_from_settings(_settings(secret_file, **{missing: None}))


def test_the_secret_comes_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCISTREAM_INTROSPECTION_CLIENT_SECRET", "from-env")
    assert introspection_config(_settings(None)).client_secret == "from-env"
    assert "from-env" not in repr(_settings(None))


def test_no_secret_or_two_secrets_are_refused(secret_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="exactly one"):
        introspection_config(_settings(None))
    monkeypatch.setenv("SCISTREAM_INTROSPECTION_CLIENT_SECRET", "from-env")
    with pytest.raises(InvalidArgument, match="exactly one"):
        introspection_config(_settings(secret_file))


def test_a_plain_http_endpoint_off_this_host_is_refused_at_start(secret_file: Path) -> None:
    with pytest.raises(InvalidArgument, match="must use https"):
        authenticator_from_settings(
            _settings(secret_file, introspection_endpoint="http://auth.example.org/introspect")
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [("introspection_cache_ttl", 3600), ("introspection_cache_ttl", -1), ("introspection_timeout", 0)],
)
def test_the_cache_ttl_and_timeout_are_bounded(secret_file: Path, field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=field):
        _settings(secret_file, **{field: value})


# --- s2cs: 1.2.1's Globus options -------------------------------------------------------------------


def _s2cs(**changes: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
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
        "state_dir": Path("/tmp/unused"),
    }
    options.update(changes)
    return server_flags(**options)


def test_s2cs_client_secret_means_globus_introspection_with_1_2_1_scope() -> None:
    flags = _s2cs(client_id="my-client", client_secret="s3cret-value")
    config = introspection_config(load_settings(**flags))
    assert config.endpoint == "https://auth.globus.org/v2/oauth2/token/introspect"
    assert config.client_id == config.audience == "my-client"
    assert config.client_secret == "s3cret-value"
    assert config.scope == "https://auth.globus.org/scopes/my-client/scistream"


def test_s2cs_client_secret_without_client_id_uses_1_2_1_default_client_id() -> None:
    flags = _s2cs(client_secret="s3cret-value")
    assert flags["auth"] == "introspection"
    assert flags["introspection_client_id"] == LEGACY_CLIENT_ID


def test_s2cs_client_secret_file_and_environment_secret_mean_introspection(
    secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = _s2cs(client_secret_file=secret_file)
    assert introspection_config(load_settings(**flags)).client_secret == "s3cret-value"
    monkeypatch.setenv("SCISTREAM_INTROSPECTION_CLIENT_SECRET", "from-env")
    assert _s2cs()["auth"] == "introspection"


def test_s2cs_introspection_endpoint_and_scope_from_the_environment_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCISTREAM_INTROSPECTION_ENDPOINT", "http://127.0.0.1:9/introspect")
    monkeypatch.setenv("SCISTREAM_INTROSPECTION_SCOPE", "custom")
    config = introspection_config(load_settings(**_s2cs(client_secret="s3cret-value")))
    assert (config.endpoint, config.scope) == ("http://127.0.0.1:9/introspect", "custom")


def test_s2cs_explicit_auth_wins_over_client_secret() -> None:
    flags = _s2cs(client_secret="s3cret-value", auth="tokens")
    assert flags["auth"] == "tokens"
    assert "introspection_client_secret" not in flags
