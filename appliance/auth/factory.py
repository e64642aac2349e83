"""Choosing the authenticator from configuration (`--auth none|tokens|jwt|introspection`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.auth.introspection_rules import IntrospectionConfig, check_endpoint, read_client_secret
from appliance.auth.jwt_auth import JwtAuth
from appliance.auth.noauth import NoAuth
from appliance.auth.principal import Authenticator
from appliance.auth.tokens import TokenFileAuth
from appliance.errors import InvalidArgument

if TYPE_CHECKING:
    from appliance.config import Settings

AUTH_KINDS = ("none", "tokens", "jwt", "introspection")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")  # as the CLI and SCISTREAM_* settings spell it


def _existing(path: Path | None, option: str, kind: str) -> Path:
    if path is None:
        raise InvalidArgument(f"--auth {kind} needs {_flag(option)}")
    if not path.is_file():
        raise InvalidArgument(f"{_flag(option)} {path} does not exist or is not a file")
    return path


def build_authenticator(
    kind: str,
    *,
    tokens_file: Path | None = None,
    jwks_file: Path | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    leeway_seconds: float = 30.0,
    introspection: IntrospectionConfig | None = None,
) -> Authenticator:
    """The authenticator for `kind`, its files loaded and checked now.

    Raises InvalidArgument, naming the option or file, for an unknown kind, a missing option, or a
    file that is missing or malformed. `none` accepts everyone as admin: the caller must warn loudly.
    """
    if kind == "none":
        return NoAuth()
    if kind == "tokens":
        return TokenFileAuth(_existing(tokens_file, "tokens_file", kind))
    if kind == "jwt":
        if leeway_seconds < 0:
            raise InvalidArgument(f"leeway_seconds must not be negative, got {leeway_seconds}")
        return JwtAuth(
            _existing(jwks_file, "jwks_file", kind),
            issuer=issuer,
            audience=audience,
            leeway_seconds=leeway_seconds,
        )
    if kind == "introspection":
        if introspection is None:
            raise InvalidArgument("--auth introspection needs --introspection-endpoint and its settings")
        # Here: its HTTP and OAuth libraries load only in an appliance that uses them.
        from appliance.auth.introspection import IntrospectionAuth

        return IntrospectionAuth(introspection)
    raise InvalidArgument(f"unknown auth kind {kind!r}; expected one of {', '.join(AUTH_KINDS)}")


def introspection_config(settings: Settings) -> IntrospectionConfig:
    """The `introspection_*` settings, checked: InvalidArgument names the first missing or bad one."""
    s = settings
    endpoint = _required(s.introspection_endpoint, "introspection_endpoint")
    client_id = _required(s.introspection_client_id, "introspection_client_id")
    scope = _required(s.introspection_scope, "introspection_scope")
    if s.introspection_ca is not None:
        _existing(s.introspection_ca, "introspection_ca", "introspection")
    return IntrospectionConfig(
        endpoint=check_endpoint(endpoint),
        client_id=client_id,
        client_secret=_client_secret(s),
        scope=scope,
        audience=s.introspection_audience or client_id,
        identity=s.introspection_identity,
        admins=frozenset(s.introspection_admins),
        ca_file=s.introspection_ca,
        timeout=s.introspection_timeout,
        cache_ttl=s.introspection_cache_ttl,
        cache_size=s.introspection_cache_size,
    )


def _required(value: str | None, option: str) -> str:
    if not value:
        raise InvalidArgument(f"--auth introspection needs {_flag(option)}")
    return value


def _client_secret(s: Settings) -> str:
    """The client secret from its 0600 file or from the setting (environment, YAML), not both."""
    secret, path = s.introspection_client_secret, s.introspection_client_secret_file
    if (secret is None) == (path is None):
        raise InvalidArgument(
            "--auth introspection needs the client secret in exactly one of "
            "--introspection-client-secret-file FILE or SCISTREAM_INTROSPECTION_CLIENT_SECRET"
        )
    if path is not None:
        return read_client_secret(path)
    assert secret is not None  # by the test above
    value = secret.get_secret_value().strip()
    if not value:
        raise InvalidArgument("SCISTREAM_INTROSPECTION_CLIENT_SECRET is empty")
    return value


def authenticator_from_settings(settings: Settings) -> Authenticator:
    """The authenticator `settings` configure (see build_authenticator)."""
    s = settings
    return build_authenticator(
        s.auth,
        tokens_file=s.tokens_file,
        jwks_file=s.jwks_file,
        issuer=s.jwt_issuer,
        audience=s.jwt_audience,
        introspection=introspection_config(s) if s.auth == "introspection" else None,
    )
